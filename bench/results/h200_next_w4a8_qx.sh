#!/usr/bin/env bash
# For the next device call (written in session 37, NOT RUN: that session's device time was spent): W4A8 at
# 1..16 tokens with the input's per-token quantization inside the kernel (w4a8_mmap_qx: every block reads its
# tokens' rows for their maxima while its first weight tiles load, then converts each staged fp16 k-tile to int8
# one k-tile ahead of the MMAs), tuned against the separate pass + the int8 kernel.
# Apply first:  git apply bench/results/w4a8_mma_quantizing_untested_session37.patch
# (CPU: tests/test_w4a8_mma.py passes; all 6 new kernels compile under nvcc 13.0 without spills, 40-80 registers.)
# Build the cubin on the CPU machine first and carry it (PTQLAB_KERNEL_CACHE=build/kernel_cache, carry that path).
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$PWD/build/kernel_cache
timeout 120 python3 -m pytest -m gpu tests/gpu/test_gpu_w4a8_mma.py -q -rfE -p no:cacheprovider \
    > "$OUT/gpu_tests_w4a8_qx.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_w4a8_qx.txt" | tail -n 8 | cut -c1-300; t "tests"
timeout 80 python3 bench/bench_w4.py --parts gemm --ms 1,8,16 --kernels w4a8-mma,w8a8-triton --budget-s 70 \
    --out "$OUT/w4a8_qx_gemm.jsonl" > "$OUT/gemm_stdout.txt" 2>&1
grep -E "^\| " "$OUT/gemm_stdout.txt" | head -n 20
python3 - "$OUT/w4a8_qx_gemm.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    if l.startswith("{"):
        r = json.loads(l)
        if r.get("kernel") == "w4a8-mma":
            print(r.get("k"), r.get("n"), r.get("m"), round(r.get("ms", 0) * 1e3, 1), r.get("config"), r.get("error", ""))
PY
t "gemm"
timeout 100 python3 bench/bench_w4.py --parts decode --budget-s 90 --decode-schemes fp16,w4a8:triton,w4a16:triton \
    --out "$OUT/w4a8_qx_decode.jsonl" > "$OUT/decode_stdout.txt" 2>&1
grep -E "^\{" "$OUT/decode_stdout.txt" | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('scheme'), r.get('batch'), r.get('graph_tok_s'), r.get('peak_mem_gib'), r.get('error',''))"
t "decode"
