#!/usr/bin/env bash
# Session 38, call 1 (H200): session 37's two untested patches applied together (W4A8 quantizing its fp16 input
# inside the kernel at 1..16 tokens; the decoder's add + LayerNorm writing int8 codes for int8 readers): their GPU
# tests, W4A8 per linear at 1/8/16 tokens, decode; then the mma.sync peak beside cuBLAS (the compute bound of the
# mma.sync kernels), and where a decode step's time goes now (profile_decode.py).
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$PWD/build/kernel_cache
timeout 170 python3 -m pytest -m gpu tests/gpu/test_gpu_w4a8_mma.py tests/gpu/test_gpu_fuse.py -q -rfE \
    -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests.txt" | tail -n 8 | cut -c1-300; t "tests"
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
timeout 130 python3 bench/bench_w4.py --parts decode --budget-s 120 \
    --decode-schemes fp16,w4a8:triton,w8a8:triton,w4a16:triton \
    --out "$OUT/decode.jsonl" > "$OUT/decode_stdout.txt" 2>&1
grep -E "^\{" "$OUT/decode_stdout.txt" | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('scheme'), r.get('batch'), r.get('graph_tok_s'), r.get('peak_mem_gib'), r.get('error',''))"
t "decode"
timeout 40 python3 bench/bench_mma_peak.py --out "$OUT/mma_peak.jsonl" > "$OUT/mma_peak_stdout.txt" 2>&1
cut -c1-200 "$OUT/mma_peak_stdout.txt" | tail -n 10; t "mma peak"
timeout 110 python3 bench/profile_decode.py --schemes fp16,w4a16,w4a8 --batches 1,16 --decoders fused \
    --out "$OUT/decode_profile.jsonl" > "$OUT/profile_stdout.txt" 2>&1
tail -n 14 "$OUT/profile_stdout.txt" | cut -c1-250; t "profile"
