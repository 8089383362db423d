#!/usr/bin/env bash
# Second device call of session 36 (one NVIDIA H200): LoRC in the "p" body rewritten: each block computes
# t = x V^T over its own share of K (V's slices staged with the k-tiles), no t-blocks and no waiting, 1..64 tokens.
# The MMA kernel's and the fusions' GPU tests; the testbed real-vs-fake PPL tests (LoRC 8 among them); per linear
# at 1..64 tokens with and without LoRC 8; decoding FP16 / W4A16 / W4A16+LoRC8.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$OUT/kcache
timeout 240 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_mma.py tests/gpu/test_gpu_fuse.py -q -rfE -x \
    -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_call2.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call2.txt" | tail -n 8 | cut -c1-300; t "tests"
timeout 120 python3 -m pytest -m gpu tests/gpu/test_gpu_kernels.py -k testbed -q -rfE -p no:cacheprovider \
    > "$OUT/gpu_tests_call2_testbed.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call2_testbed.txt" | tail -n 6 | cut -c1-300; t "testbed"
timeout 130 python3 bench/bench_w4.py --parts gemm --ms 1,16,32,64 --kernels w4a16-mma,w4a16-mma+lorc8 \
    --budget-s 120 --out "$OUT/w4_gemm_h200_session36_call2.jsonl" > "$OUT/w4_gemm_stdout.txt" 2>&1
grep -E "^\| " "$OUT/w4_gemm_stdout.txt" | head -n 30
python3 - "$OUT/w4_gemm_h200_session36_call2.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    if l.startswith("{"):
        r = json.loads(l)
        if r.get("part") == "gemm" and r.get("kernel") != "fp16":
            print(r["k"], r["n"], r["m"], r["kernel"], round(r["ms"] * 1e3, 1), r.get("config"))
PY
t "gemm"
timeout 120 python3 bench/bench_w4.py --parts decode --budget-s 110 \
    --decode-schemes fp16,w4a16:triton,w4a16-lorc8:triton \
    --out "$OUT/w4_decode_h200_session36_call2.jsonl" > "$OUT/w4_decode_stdout.txt" 2>&1
grep -E "^\{" "$OUT/w4_decode_stdout.txt" | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('scheme'), r.get('batch'), r.get('graph_tok_s'), r.get('peak_mem_gib'))"
t "decode"
