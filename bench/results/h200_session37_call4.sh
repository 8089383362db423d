#!/usr/bin/env bash
# (Result: LoRC layers stay on w4a8-triton, whose in-kernel LoRC decodes faster at batch 1; the selection was set back after this call.)
# Fourth device call of session 37 (one NVIDIA H200): the W4A8 kernel of call 2 (e66466f's source), LoRC layers now
# on it too (the side product after the kernel, on the quantized input) instead of w4a8-triton's in-kernel LoRC.
# Its GPU tests; per linear at 1 and 16 tokens with and without LoRC 8; decoding W4A8 + LoRC8 both ways.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$PWD/build/kernel_cache
timeout 100 python3 -m pytest -m gpu tests/gpu/test_gpu_w4a8_mma.py -q -rfE -p no:cacheprovider --durations=5 \
    > "$OUT/gpu_tests_w4a8.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_w4a8.txt" | tail -n 12 | cut -c1-400; t "w4a8 tests"
timeout 80 python3 bench/bench_w4.py --parts gemm --ms 1,16 --kernels w4a8-mma,w4a8-mma+lorc8,w4a8-triton+lorc8 \
    --budget-s 70 --out "$OUT/w4a8_gemm_h200_session37_call4.jsonl" > "$OUT/w4a8_gemm_stdout.txt" 2>&1
grep -E "^\| " "$OUT/w4a8_gemm_stdout.txt" | head -n 16; t "gemm"
timeout 100 python3 bench/bench_w4.py --parts decode --budget-s 90 \
    --decode-schemes fp16,w4a8:triton,w4a8-lorc8:triton,w4a8-lorc8:triton-nomma \
    --out "$OUT/w4a8_decode_h200_session37_call4.jsonl" > "$OUT/w4a8_decode_stdout.txt" 2>&1
grep -E "^\{" "$OUT/w4a8_decode_stdout.txt" | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('scheme'), r.get('batch'), r.get('graph_tok_s'), r.get('peak_mem_gib'), r.get('kernels'), r.get('error',''))"
t "decode"
