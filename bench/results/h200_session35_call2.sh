#!/usr/bin/env bash
# Second device call of session 35 (one NVIDIA H200): the pipelined "p" body of csrc/w4_mma.cu (every operand of
# a k-tile through shared memory by cp.async, stages ahead), a tuning candidate at every token count. Its registers
# under the device's nvcc; the MMA kernel's and the fusions' GPU tests; per linear at 1..128 tokens side by side
# with Marlin and cuBLAS (bench_marlin.py); decoding.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$OUT/kcache
(/usr/local/cuda/bin/nvcc -cubin -arch=sm_90 -O3 -Xptxas -v ptqlab/kernels/csrc/w4_mma.cu -o /tmp/x.cubin \
    > "$OUT/ptxas_call2.txt" 2>&1) &
timeout 260 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_mma.py tests/gpu/test_gpu_fuse.py -q -rfE -x \
    -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_call2.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call2.txt" | tail -n 8 | cut -c1-300; t "tests"
wait
grep -A2 "mmap" "$OUT/ptxas_call2.txt" | grep -E "registers|spill" | head -n 40 | cut -c1-160 | sort | uniq -c | head -n 12
timeout 170 python3 bench/bench_marlin.py --marlin-src third_party/marlin --out "$OUT/marlin_h200_session35_call2.jsonl" \
    > "$OUT/marlin_stdout.txt" 2>&1; echo "marlin rc=$?"
python3 - "$OUT/marlin_h200_session35_call2.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for r in rows:
    if r.get("kernel") != "fp16":
        print(r["k"], r["n"], r["m"], r["kernel"], round(r.get("ms", 0) * 1e3, 1), round(r.get("vs_fp16") or 0, 2),
              r.get("config", ""), r.get("error", "")[:100])
PY
t "marlin"
timeout 120 python3 bench/bench_w4.py --parts decode --budget-s 110 \
    --decode-schemes fp16,w4a16:triton,w4a16-lorc8:triton \
    --out "$OUT/w4_decode_h200_session35_call2.jsonl" > "$OUT/w4_decode_stdout.txt" 2>&1
grep -E "^\{" "$OUT/w4_decode_stdout.txt" | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('scheme'), r.get('batch'), r.get('graph_tok_s'), r.get('peak_mem_gib'))"
t "decode"
