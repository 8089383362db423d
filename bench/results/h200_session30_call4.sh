#!/usr/bin/env bash
# The fourth device call of session 30 (one NVIDIA H200): the final code (the next-block prefetch of call 3 taken
# out again): the GPU tests of the code this session changed (ZQ graphs, GPTQ kernels and pipeline moves), GPTQ on
# the OPT-6.7B shape, and ZQ-Local / ZQ-Global there with their captured steps.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
timeout 150 python3 -m pytest -m gpu tests/gpu/test_gpu_zq.py tests/gpu/test_gpu_kernels.py \
    tests/gpu/test_gpu_pipeline_moves.py -q -rfE -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_final.txt" 2>&1
tail -n 4 "$OUT/gpu_tests_final.txt" | cut -c1-300; t "tests"
timeout 150 python3 bench/bench_scale.py --shape opt-6.7b --methods gptq,zq-local,zq-global --out "$OUT/scale" \
    --budget-s 140 > "$OUT/scale_stdout.txt" 2>&1; tail -n 4 "$OUT/scale_stdout.txt" | cut -c1-300; t "scale"
