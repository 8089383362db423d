#!/usr/bin/env bash
# The third device call of session 30 (one NVIDIA H200), issue 22: GPTQ / GPTQ+LoRC on the OPT-6.7B shape with the
# next block prefetched; ZQ graphs against eager (and eager against eager) on testbed-opt; then the whole GPU suite.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
timeout 90 python3 bench/bench_scale.py --shape opt-6.7b --methods gptq,gptq+lorc --out "$OUT/scale" --budget-s 80 \
    > "$OUT/scale_stdout.txt" 2>&1; tail -n 2 "$OUT/scale_stdout.txt" | cut -c1-300; t "scale"
timeout 110 python3 bench/bench_zq_graphs.py --out "$OUT/zq_graphs.jsonl" > "$OUT/zq_graphs_stdout.txt" 2>&1
tail -n 4 "$OUT/zq_graphs_stdout.txt" | cut -c1-420; t "zq graphs bench"
timeout 140 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_gemm.py tests/gpu/test_gpu_hessian.py -q -rfE \
    -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_w4_hessian.txt" 2>&1; tail -n 3 "$OUT/gpu_tests_w4_hessian.txt"
t "w4 + hessian tests"
left=$(( ${CALL_BUDGET_S:-575} - ($(date +%s) - T0) ))
timeout $(( left > 20 ? left : 20 )) python3 -m pytest -m gpu tests/gpu -q -rfE -p no:cacheprovider --durations=10 \
    --ignore tests/gpu/test_gpu_w4_gemm.py --ignore tests/gpu/test_gpu_hessian.py \
    > "$OUT/gpu_tests_rest.txt" 2>&1; tail -n 8 "$OUT/gpu_tests_rest.txt" | cut -c1-300; t "rest of the suite"
