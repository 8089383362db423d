#!/usr/bin/env bash
# The third device call of session 29 (one NVIDIA H200): the whole GPU suite with the Triton family as the default
# kernels (test_gpu_w4_gemm.py with one autotune config per key), the block-move change of issue 22 and the GPTQ
# time on the OPT-6.7B shape after it.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
timeout ${W4_S:-230} python3 -m pytest -m gpu tests/gpu/test_gpu_w4_gemm.py tests/gpu/test_gpu_hessian.py -q -rfE \
    -p no:cacheprovider --durations=10 > "$OUT/gpu_tests_w4_hessian.txt" 2>&1; tail -n 6 "$OUT/gpu_tests_w4_hessian.txt"
t "w4 + hessian tests"
timeout ${REST_S:-250} python3 -m pytest -m gpu tests/gpu -q -rfE -p no:cacheprovider --durations=10 \
    --ignore tests/gpu/test_gpu_w4_gemm.py --ignore tests/gpu/test_gpu_hessian.py \
    > "$OUT/gpu_tests_rest.txt" 2>&1; tail -n 6 "$OUT/gpu_tests_rest.txt"; t "rest of the suite"
left=$(( ${CALL_BUDGET_S:-530} - ($(date +%s) - T0) ))
[ $left -gt 45 ] && timeout $left python3 bench/bench_scale.py --shape opt-6.7b --methods gptq --out "$OUT/scale" \
    --budget-s $(( left - 10 )) > "$OUT/scale_stdout.txt" 2>&1; tail -n 3 "$OUT/scale_stdout.txt"; t "all"
tar -C "$OUT" -cf "$FINAL/r.tar" . && rm -rf "$OUT"
