#!/usr/bin/env bash
# Fourth device call of session 35 (one NVIDIA H200): the "p" body with 4 row tiles a warp (1..8 token tiles) and
# "p2" (two blocks an SM); the MMA kernel's and the fusions' GPU tests; per linear at 1..128 tokens side by side
# with Marlin and cuBLAS (bench_marlin.py; Marlin's library from call 2, carried); decoding; then a variant of the
# "p" body, two k-tiles a barrier and 6 stages (w4_mma_pairs_variant_session35.patch), the same per-linear bench.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$PWD/third_party/kcache
summary() {
python3 - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for r in rows:
    if r.get("kernel") != "fp16":
        print(r["k"], r["n"], r["m"], r["kernel"], round(r.get("ms", 0) * 1e3, 1), round(r.get("vs_fp16") or 0, 2),
              r.get("config", ""), r.get("error", "")[:100])
PY
}
timeout 220 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_mma.py tests/gpu/test_gpu_fuse.py -q -rfE -x \
    -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_call4.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call4.txt" | tail -n 8 | cut -c1-300; t "tests"
timeout 150 python3 bench/bench_marlin.py --marlin-src third_party/marlin --out "$OUT/marlin_h200_session35_call4.jsonl" \
    > "$OUT/marlin_stdout.txt" 2>&1; echo "marlin rc=$?"
summary "$OUT/marlin_h200_session35_call4.jsonl" | grep -v " marlin "; t "marlin"
timeout 110 python3 bench/bench_w4.py --parts decode --budget-s 100 \
    --decode-schemes fp16,w4a16:triton,w4a16-lorc8:triton \
    --out "$OUT/w4_decode_h200_session35_call4.jsonl" > "$OUT/w4_decode_stdout.txt" 2>&1
grep -E "^\{" "$OUT/w4_decode_stdout.txt" | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('scheme'), r.get('batch'), r.get('graph_tok_s'), r.get('peak_mem_gib'))"
t "decode"
patch -p1 < bench/results/w4_mma_pairs_variant_session35.patch
sed -i 's/return 3 if nt >= 16 else 4/return 4 if nt >= 16 else 6/' ptqlab/kernels/w4_mma.py
grep -c "NT >= 16 ? 4 : 6" ptqlab/kernels/csrc/w4_mma.cu; grep -c "return 4 if nt >= 16 else 6" ptqlab/kernels/w4_mma.py
timeout 120 python3 bench/bench_marlin.py --marlin-src third_party/marlin --ms 1,16,64,128 \
    --out "$OUT/marlin_h200_session35_call4_pairs.jsonl" > "$OUT/marlin_stdout_pairs.txt" 2>&1; echo "pairs rc=$?"
summary "$OUT/marlin_h200_session35_call4_pairs.jsonl" | grep -v " marlin "; t "pairs"
