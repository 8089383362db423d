#!/usr/bin/env bash
# Session 38, call 2 (H200): the W4A16 "p" body's per-k-tile overhead cut, side by side in one run:
#   base: the committed kernel;
#   A:    the copies spread over the warps (input pieces of the M tokens only, from the last thread down; scales
#         from the first up), the group counted instead of divided, the weight's addresses hoisted;
#   B:    A + post-scaling at 1-16 tokens (MMAs on the exact code - zero, the scale on each k-tile's sums).
# Per linear at 1 / 8 / 16 tokens for each; the fastest (geometric mean of time against base) then takes the GPU
# tests (test_gpu_w4_mma, test_gpu_fuse, test_gpu_kernels) and decode. Cubins prebuilt (build/kernel_cache).
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$PWD/build/kernel_cache
V=build/variants
put() {  # variant name: its CUDA source (and Python module, where it has one)
  cp "$V/$1_w4_mma.cu" ptqlab/kernels/csrc/w4_mma.cu
  if [ -f "$V/$1_w4_mma.py" ]; then cp "$V/$1_w4_mma.py" ptqlab/kernels/w4_mma.py; else cp "$V/B_w4_mma.py" ptqlab/kernels/w4_mma.py; fi
}
for v in base A B; do
  put $v
  timeout 75 python3 bench/bench_w4.py --parts gemm --ms 1,8,16 --kernels w4a16-mma --budget-s 65 \
      --out "$OUT/w4_gemm_$v.jsonl" > "$OUT/w4_gemm_stdout_$v.txt" 2>&1
  echo "== $v"; grep -E "^\| [0-9]" "$OUT/w4_gemm_stdout_$v.txt" | head -n 15
  t "gemm $v"
done
BEST=$(python3 - "$OUT" <<'PY'
import json, math, sys
def times(v):
    d = {}
    for l in open(f"{sys.argv[1]}/w4_gemm_{v}.jsonl"):
        if l.startswith("{"):
            r = json.loads(l)
            if r.get("kernel") == "w4a16-mma" and r.get("ms"):
                d[(r["k"], r["n"], r["m"])] = r["ms"]
    return d
base = times("base")
best, score = "base", 1.0
for v in ("A", "B"):
    d = times(v)
    keys = [k for k in base if k in d]
    g = math.exp(sum(math.log(d[k] / base[k]) for k in keys) / max(len(keys), 1)) if keys else 9.0
    print(f"{v}: geomean time vs base {g:.3f} over {len(keys)} cells", file=sys.stderr)
    if g < score:
        best, score = v, g
print(best)
PY
)
echo "best: $BEST"; echo "$BEST" > "$OUT/best.txt"
put "$BEST"
if [ "$BEST" != base ]; then
  timeout 200 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_mma.py tests/gpu/test_gpu_fuse.py \
      tests/gpu/test_gpu_kernels.py -q -rfE -p no:cacheprovider > "$OUT/gpu_tests_$BEST.txt" 2>&1
  grep -E "passed|failed|Error" "$OUT/gpu_tests_$BEST.txt" | tail -n 8 | cut -c1-300; t "tests $BEST"
fi
timeout 90 python3 bench/bench_w4.py --parts decode --budget-s 80 --decode-schemes fp16,w4a16:triton \
    --out "$OUT/decode_$BEST.jsonl" > "$OUT/decode_stdout.txt" 2>&1
grep -E "^\{" "$OUT/decode_stdout.txt" | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('scheme'), r.get('batch'), r.get('graph_tok_s'), r.get('peak_mem_gib'), r.get('error',''))"
t "decode $BEST"
