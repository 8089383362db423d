#!/usr/bin/env bash
# For the next device call (written in session 37, NOT RUN: that session's device time was spent): the decoder's
# add + LayerNorm kernel also writes the int8 codes and scales of its output for the int8 layers that read it
# (q/k/v and fc1 of W4A8 / W8A8 models), so their own quantization pass is skipped (2 of the 4 a layer).
# Apply first:  git apply bench/results/ln_int8_quant_untested_session37.patch
# (CPU: tests/test_fuse.py passes; the kernel's codes and scales equal act_quant's bit for bit in Triton's
# interpreter, NaN rows included.) Then, on the H200: its GPU tests, and decoding with and without it.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$PWD/build/kernel_cache
timeout 150 python3 -m pytest -m gpu tests/gpu/test_gpu_fuse.py tests/gpu/test_gpu_w4a8_mma.py -q -rfE \
    -p no:cacheprovider > "$OUT/gpu_tests_ln_int8.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_ln_int8.txt" | tail -n 8 | cut -c1-300; t "tests"
timeout 120 python3 bench/bench_w4.py --parts decode --budget-s 110 \
    --decode-schemes fp16,w4a8:triton,w8a8:triton,w4a16:triton \
    --out "$OUT/w4a8_decode_ln_int8.jsonl" > "$OUT/decode_stdout.txt" 2>&1
grep -E "^\{" "$OUT/decode_stdout.txt" | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('scheme'), r.get('batch'), r.get('graph_tok_s'), r.get('peak_mem_gib'), r.get('error',''))"
t "decode"
