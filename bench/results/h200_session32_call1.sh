#!/usr/bin/env bash
# The first device call of session 32 (one NVIDIA H200): the CUDA W4A16 MMA kernel (ptqlab/kernels/w4_mma.py,
# csrc/w4_mma.cu) builds with the device's nvcc, passes its GPU tests, then per linear against cuBLAS FP16, the
# Triton W4A16 kernels and tinygemm, then decoding of the OPT-6.7B shape with it and without it.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
export PTQLAB_KERNEL_CACHE=$OUT/kcache
python3 -c "
import time; t = time.time()
from ptqlab.kernels import w4_mma
print('unavailable:', w4_mma.unavailable(), 'nvcc', w4_mma._nvcc(), f'{time.time() - t:.1f}s')" 2>&1 | tail -n 5; t "build"
timeout 150 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_mma.py -q -rfE -x -p no:cacheprovider --durations=5 \
    > "$OUT/gpu_tests_call1_w4_mma.txt" 2>&1
grep -E "passed|failed|Error|assert" "$OUT/gpu_tests_call1_w4_mma.txt" | tail -n 12 | cut -c1-400; t "tests"
timeout 250 python3 bench/bench_w4.py --parts gemm --ms 1,4,16,32,64,128,256,2048 --budget-s 230 \
    --kernels w4a16-mma,w4a16-mma-asym,w4a16-mma-unpack,w4a16-triton,w4a16-tinygemm \
    --out "$OUT/w4_gemm.jsonl" > "$OUT/w4_gemm_stdout.txt" 2>&1
grep -A 60 "^| K→N" "$OUT/w4_gemm_stdout.txt" | cut -c1-400; t "gemm"
timeout 150 python3 bench/bench_w4.py --parts decode --budget-s 140 \
    --decode-schemes fp16,w4a16:triton,w4a16:triton-nomma,w4a16-lorc8:triton \
    --out "$OUT/w4_decode.jsonl" > "$OUT/w4_decode_stdout.txt" 2>&1
grep '"decode"' "$OUT/w4_decode.jsonl" | python3 -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    print(r.get('scheme'), r.get('kernels'), r.get('batch'), r.get('graph_tok_s'), r.get('error', ''))" | cut -c1-300
t "decode"
