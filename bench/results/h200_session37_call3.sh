#!/usr/bin/env bash
# (Ran the patch bench/results/w4a8_mma_input_order_variant_session37.patch on top of e66466f; not kept: no gain.)
# Third device call of session 37 (one NVIDIA H200): the W4A8 kernel reads its input as stored (the per-token
# quantization writes the codes in the MMA column order; no byte permutation in the kernel), and its int8 unpack
# writes the weight in that order. Its GPU tests; the testbed real-vs-fake PPL tests; per linear (w4a8-mma against
# w8a8-triton, as call 2); decoding FP16 / W4A8 / W8A8 / W4A16. Cubin built here with nvcc 13.0 and carried.
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
timeout 130 python3 bench/bench_w4.py --parts gemm --ms 1,16,32,64,128,2048 --kernels w4a8-mma,w8a8-triton \
    --budget-s 120 --out "$OUT/w4a8_gemm_h200_session37_call3.jsonl" > "$OUT/w4a8_gemm_stdout.txt" 2>&1
grep -E "^\| " "$OUT/w4a8_gemm_stdout.txt" | head -n 40
python3 - "$OUT/w4a8_gemm_h200_session37_call3.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    if l.startswith("{"):
        r = json.loads(l)
        if r.get("kernel") == "w4a8-mma" or "error" in r:
            print(r.get("k"), r.get("n"), r.get("m"), r.get("kernel"), round(r.get("ms", 0) * 1e3, 1), r.get("config"), r.get("error", ""))
PY
t "gemm"
timeout 100 python3 bench/bench_w4.py --parts decode --budget-s 90 \
    --decode-schemes fp16,w4a8:triton,w8a8:triton,w4a16:triton \
    --out "$OUT/w4a8_decode_h200_session37_call3.jsonl" > "$OUT/w4a8_decode_stdout.txt" 2>&1
grep -E "^\{" "$OUT/w4a8_decode_stdout.txt" | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('scheme'), r.get('batch'), r.get('graph_tok_s'), r.get('peak_mem_gib'), r.get('error',''))"
t "decode"
timeout 100 python3 -m pytest -m gpu tests/gpu/test_gpu_kernels.py -k testbed -q -rfE -p no:cacheprovider \
    > "$OUT/gpu_tests_testbed.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_testbed.txt" | tail -n 6 | cut -c1-300; t "testbed"
