#!/usr/bin/env bash
# The second device call of session 29 (one NVIDIA H200): the W4 kernel tests not reached in the first call (LoRC in
# the epilogue, int8 GEMMs, split-K, act-order, packing, memory, FP8, bf16) and the Hessian test; the W4A16 GEMM
# against unpack + cuBLAS at 64-256 tokens with split-K there; decoding on the OPT-6.7B shape.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
timeout 200 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_gemm.py tests/gpu/test_gpu_hessian.py -q -rfE -p no:cacheprovider \
    -k "lorc or int8_gemm or split_k or act_order or packing or memory or fp8 or bf16 or gram" \
    > "$OUT/gpu_tests_w4_rest_hessian.txt" 2>&1; tail -n 5 "$OUT/gpu_tests_w4_rest_hessian.txt"; t "tests"
timeout 110 python3 bench/bench_w4.py --parts gemm --ms 64,128,256 --out "$OUT/w4_mid.jsonl" --budget-s 100 \
    --kernels w4a16-triton-gemm,w4a16-triton-unpack,w4a8-triton,w8a8-triton > "$OUT/w4_mid_stdout.txt" 2>&1
grep -v '^{' "$OUT/w4_mid_stdout.txt" | grep -v "built" | tail -n 25; t "w4 mid-M"
left=$(( ${CALL_BUDGET_S:-520} - ($(date +%s) - T0) ))
timeout $left python3 bench/bench_w4.py --parts decode --out "$OUT/w4_decode.jsonl" --budget-s $(( left - 10 )) \
    --decode-schemes fp16,w4a16:triton,w4a16-lorc8:triton,w4a8:triton,w4a8-lorc8:triton,w8a8:triton,w4a16:tinygemm \
    > "$OUT/w4_decode_stdout.txt" 2>&1; grep -v '^{' "$OUT/w4_decode_stdout.txt" | tail -n 12; t "decode"
tar -C "$OUT" -cf "$FINAL/r.tar" . && rm -rf "$OUT"
