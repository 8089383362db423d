#!/usr/bin/env bash
# First device call of session 36 (one NVIDIA H200): session 35's LoRC in the pipelined "p" body (1..16 tokens;
# the patch w4_mma_lorc_pipelined_untested_session35.patch, applied in the tree): the MMA kernel's and the
# fusions' GPU tests; per linear at 1 and 16 tokens with and without LoRC 8; decoding FP16 / W4A16 / W4A16+LoRC8.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$OUT/kcache
timeout 240 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_mma.py tests/gpu/test_gpu_fuse.py -q -rfE -x \
    -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_call1.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call1.txt" | tail -n 8 | cut -c1-300; t "tests"
timeout 110 python3 bench/bench_w4.py --parts gemm --ms 1,16 --kernels w4a16-mma,w4a16-mma+lorc8 \
    --budget-s 100 --out "$OUT/w4_gemm_h200_session36_call1.jsonl" > "$OUT/w4_gemm_stdout.txt" 2>&1
grep -E "^\| " "$OUT/w4_gemm_stdout.txt" | head -n 20; t "gemm"
timeout 120 python3 bench/bench_w4.py --parts decode --budget-s 110 \
    --decode-schemes fp16,w4a16:triton,w4a16-lorc8:triton \
    --out "$OUT/w4_decode_h200_session36_call1.jsonl" > "$OUT/w4_decode_stdout.txt" 2>&1
grep -E "^\{" "$OUT/w4_decode_stdout.txt" | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('scheme'), r.get('batch'), r.get('graph_tok_s'), r.get('peak_mem_gib'))"
t "decode"
