#!/usr/bin/env bash
# The first device call of session 29 (one NVIDIA H200): the GPU tests of the Triton kernels (LoRC in the epilogue,
# the W8 GEMV, the swapped-operand GEMM) and of the Hessian's half-input sums, then the benchmarks that measure them.
# Run from the repository root with OUT set. No data folder is needed.
set -u
FINAL=$OUT; OUT=$OUT/r  # one tar comes back (a call returns at most 8 files)
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
timeout ${TEST_S:-250} python3 -m pytest -m gpu tests/gpu/test_gpu_w4_gemm.py tests/gpu/test_gpu_hessian.py -q -rfE \
    -p no:cacheprovider --maxfail=3 > "$OUT/gpu_tests_w4_hessian.txt" 2>&1; tail -n 4 "$OUT/gpu_tests_w4_hessian.txt"; t "tests"
timeout 170 python3 bench/bench_w4.py --parts gemm,decode --ms 1,16,64,128,256 --out "$OUT/w4.jsonl" --budget-s 150 \
    --kernels w4a16-triton,w4a16-triton-gemm,w4a16-triton-unpack,w4a16-triton+lorc8,w4a8-triton,w4a8-triton+lorc8,w8a8-triton,w8a8-int8,w4a16-tinygemm \
    --decode-schemes fp16,w4a16:triton,w4a16-lorc8:triton,w4a8:triton,w4a8-lorc8:triton,w8a8:triton \
    > "$OUT/w4_stdout.txt" 2>&1; grep -v '^{' "$OUT/w4_stdout.txt" | tail -n 45; t "w4 bench"
left=$(( ${CALL_BUDGET_S:-560} - ($(date +%s) - T0) ))
[ $left -gt 40 ] && timeout $left python3 bench/bench_scale.py --shape opt-6.7b --methods gptq --out "$OUT/scale" \
    --budget-s $(( left - 15 )) > "$OUT/scale_stdout.txt" 2>&1; tail -n 6 "$OUT/scale_stdout.txt"; t "all"
tar -C "$OUT" -cf "$FINAL/r.tar" . && rm -rf "$OUT"
