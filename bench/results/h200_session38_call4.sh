#!/usr/bin/env bash
# Session 38, call 4 (H200): (1) the per-token int8 quantization pass (act_quant) at decoding's shapes for 4 to
# 32 warps a program, and W4A8 / W8A8 decode with the committed launch rule (aqbase) and 16 warps for rows of
# 4096+ columns (aq16); (2) the rest of the GPU suite on the final code (the W4A16, W4A8, fuse and speed files
# passed in calls 2 and 3), with the faster act_quant.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
left() { echo $(( 570 - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$PWD/build/kernel_cache
V=build/variants
timeout 40 python3 - > "$OUT/act_quant_warps.jsonl" 2>&1 <<'PY'
import json, torch, triton
from ptqlab.kernels import act_quant, w4_mma
from ptqlab.quantizers import QuantSpec
spec = QuantSpec(8, True, 0)
for rows, c in [(1, 4096), (1, 16384), (16, 4096), (16, 16384), (2048, 4096)]:
    x = torch.randn(rows, c, device="cuda", dtype=torch.float16)
    codes = torch.empty(rows, c, dtype=torch.int8, device="cuda")
    sc = torch.empty(rows, dtype=torch.float32, device="cuda")
    bc = triton.next_power_of_2(c); br = max(1, 4096 // bc)
    for w in (4, 8, 16, 32):
        def go(w=w):
            act_quant._act_quant_kernel[(triton.cdiv(rows, br),)](x, codes, sc, rows, c, 255.0, 1 / 255.0, SYM=True,
                INT8=True, BLOCK_R=br, BLOCK_C=bc, num_warps=w)
        ms = w4_mma._graph_ms(go)
        print(json.dumps({"part": "act_quant_warps", "rows": rows, "c": c, "warps": w, "us": round(ms * 1e3, 2),
                          "gpu": torch.cuda.get_device_name()}))
PY
cut -c1-150 "$OUT/act_quant_warps.jsonl"; t "act_quant warps"
for v in aqbase aq16; do
  cp "$V/${v}_act_quant.py" ptqlab/kernels/act_quant.py
  S=w4a8:triton,w8a8:triton; [ $v = aqbase ] && S=fp16,$S
  timeout 75 python3 bench/bench_w4.py --parts decode --budget-s 68 --decode-schemes $S \
      --out "$OUT/decode_$v.jsonl" > "$OUT/decode_stdout_$v.txt" 2>&1
  echo "== $v"; grep -E "^\{" "$OUT/decode_stdout_$v.txt" | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('scheme'), r.get('batch'), r.get('graph_tok_s'), r.get('error',''))"
  t "decode $v"
done
BEST=$(python3 - "$OUT" <<'PY'
import json, sys
def tok(v):
    d = {}
    for l in open(f"{sys.argv[1]}/decode_{v}.jsonl"):
        if l.startswith("{"):
            r = json.loads(l)
            if r.get("graph_tok_s") and r.get("scheme", "").startswith("w"):
                d[(r["scheme"], r["batch"])] = r["graph_tok_s"]
    return d
a, b = tok("aqbase"), tok("aq16")
keys = [k for k in a if k in b]
gain = sum(b[k] / a[k] for k in keys) / max(len(keys), 1)
print(f"aq16 / aqbase tokens/s: {gain:.3f} over {len(keys)}", file=sys.stderr)
print("aq16" if keys and gain > 1.01 else "aqbase")
PY
)
echo "best: $BEST"; echo "$BEST" > "$OUT/best.txt"
cp "$V/${BEST}_act_quant.py" ptqlab/kernels/act_quant.py
IGN=""; for f in w4_mma w4a8_mma fuse speed; do IGN="$IGN --ignore=tests/gpu/test_gpu_$f.py"; done
timeout $(( $(left) - 5 )) python3 -m pytest -m gpu tests/gpu $IGN -q -rfE -p no:cacheprovider --durations=5 \
    > "$OUT/gpu_tests_rest.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_rest.txt" | tail -n 12 | cut -c1-300; t "rest of the suite"
