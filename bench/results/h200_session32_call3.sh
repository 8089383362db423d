#!/usr/bin/env bash
# Third device call of session 32 (one NVIDIA H200): the W4A16 MMA kernel with a second body for 16-128 tokens
# (a block's warps share each input slice through shared memory) and the unpack hand-off as a tuned candidate;
# its GPU tests, per linear against FP16 / the Triton kernels, decoding with and without it.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$OUT/kcache
python3 -c "
import time; t = time.time()
from ptqlab.kernels import w4_mma
print('unavailable:', w4_mma.unavailable(), f'{time.time() - t:.1f}s')" 2>&1 | tail -n 2; t "build"
timeout 170 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_mma.py -q -rfE -p no:cacheprovider --durations=5 \
    > "$OUT/gpu_tests_call3_w4_mma.txt" 2>&1
grep -E "passed|failed|Error|assert" "$OUT/gpu_tests_call3_w4_mma.txt" | tail -n 12 | cut -c1-300; t "tests"
timeout 200 python3 bench/bench_w4.py --parts gemm --ms 1,16,32,64,128 --budget-s 185 \
    --kernels w4a16-mma,w4a16-mma-asym,w4a16-triton \
    --out "$OUT/w4_gemm.jsonl" > "$OUT/w4_gemm_stdout.txt" 2>&1
grep -A 36 "^| K→N" "$OUT/w4_gemm_stdout.txt" | cut -c1-300; t "gemm"
timeout 110 python3 bench/bench_w4.py --parts decode --budget-s 100 \
    --decode-schemes fp16,w4a16:triton,w4a16:triton-nomma \
    --out "$OUT/w4_decode.jsonl" > "$OUT/w4_decode_stdout.txt" 2>&1
grep '"decode"' "$OUT/w4_decode.jsonl" | python3 -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    print(r.get('scheme'), r.get('kernels'), r.get('batch'), r.get('graph_tok_s'), r.get('peak_mem_gib'), r.get('error', ''))"
t "decode"
