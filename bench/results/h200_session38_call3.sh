#!/usr/bin/env bash
# Session 38, call 3 (H200): (1) the W4A8 "p" body's copies spread as the W4A16 body's (call 2), against the
# committed kernel, per linear at 1 / 8 / 16 tokens; the faster takes the GPU tests (test_gpu_w4a8_mma,
# test_gpu_speed, test_gpu_fuse: also the decoder's new q/k/v-to-cache kernel, kernels/kv_write.py); (2) W4A8 against W8A8 at 64 / 128 / 2048 tokens and the int8 unpack pass's bandwidth (the
# hand-off's cost: target 3's bound); (3) decode, every scheme; (4) Nsight Compute on the W4A16 "p" body at one
# token (what bounds it: target 1); (5) where a decode step goes now. Cubins prebuilt (build/kernel_cache).
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
left() { echo $(( 575 - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$PWD/build/kernel_cache
V=build/variants
for v in a8base a8new; do
  cp "$V/${v}_w4_mma.cu" ptqlab/kernels/csrc/w4_mma.cu
  timeout 45 python3 bench/bench_w4.py --parts gemm --ms 1,8,16 --kernels w4a8-mma --budget-s 38 \
      --out "$OUT/w4a8_gemm_$v.jsonl" > "$OUT/w4a8_gemm_stdout_$v.txt" 2>&1
  echo "== $v"; grep -E "^\| [0-9]" "$OUT/w4a8_gemm_stdout_$v.txt" | head -n 15
  t "gemm $v"
done
BEST=$(python3 - "$OUT" <<'PY'
import json, math, sys
def times(v):
    d = {}
    for l in open(f"{sys.argv[1]}/w4a8_gemm_{v}.jsonl"):
        if l.startswith("{"):
            r = json.loads(l)
            if r.get("kernel") == "w4a8-mma" and r.get("ms"):
                d[(r["k"], r["n"], r["m"])] = r["ms"]
    return d
base, new = times("a8base"), times("a8new")
keys = [k for k in base if k in new]
g = math.exp(sum(math.log(new[k] / base[k]) for k in keys) / len(keys)) if keys else 9.0
print(f"a8new: geomean time vs a8base {g:.3f} over {len(keys)} cells", file=sys.stderr)
print("a8new" if g < 0.995 else "a8base")
PY
)
echo "best: $BEST"; echo "$BEST" > "$OUT/best.txt"
cp "$V/${BEST}_w4_mma.cu" ptqlab/kernels/csrc/w4_mma.cu
timeout 200 python3 -m pytest -m gpu tests/gpu/test_gpu_w4a8_mma.py tests/gpu/test_gpu_speed.py tests/gpu/test_gpu_fuse.py -q -rfE \
    -p no:cacheprovider > "$OUT/gpu_tests_$BEST.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_$BEST.txt" | tail -n 8 | cut -c1-300; t "tests $BEST"
timeout 70 python3 bench/bench_w4.py --parts gemm --ms 64,128,2048 --kernels w4a8-mma,w8a8-triton --budget-s 62 \
    --out "$OUT/w4a8_gemm_many.jsonl" > "$OUT/w4a8_gemm_many_stdout.txt" 2>&1
grep -E "^\| [0-9]" "$OUT/w4a8_gemm_many_stdout.txt" | head -n 15; t "gemm many"
timeout 30 python3 - > "$OUT/unpack_int8.txt" 2>&1 <<'PY'
import json, torch
from ptqlab.kernels import w4_mma, w4a8_mma
for k, n in [(4096, 4096), (4096, 16384), (16384, 4096), (8192, 28672), (28672, 8192)]:
    packed = w4_mma.pack_int4_mma(torch.randint(0, 16, (n, k), device="cuda"))
    ms = w4_mma._graph_ms(lambda: w4a8_mma.unpack_int8(packed))
    moved = n * k * 1.5  # 0.5 B a weight read, 1 B written
    print(json.dumps({"part": "unpack_int8", "k": k, "n": n, "us": round(ms * 1e3, 2),
                      "tb_s": round(moved / ms / 1e9, 3), "gpu": torch.cuda.get_device_name()}))
PY
cat "$OUT/unpack_int8.txt" | cut -c1-200; t "unpack"
timeout 120 python3 bench/bench_w4.py --parts decode --budget-s 110 \
    --decode-schemes fp16,w4a16:triton,w4a16-lorc8:triton,w4a8:triton,w8a8:triton \
    --out "$OUT/decode.jsonl" > "$OUT/decode_stdout.txt" 2>&1
grep -E "^\{" "$OUT/decode_stdout.txt" | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print(r.get('scheme'), r.get('batch'), r.get('graph_tok_s'), r.get('peak_mem_gib'), r.get('error',''))"
t "decode"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
echo "ncu: ${NCU:-none}"
if [ -n "$NCU" ]; then
  for spec in "4096 16384 1 p,2,8,4" "4096 4096 1 p,2,4,16" "8192 28672 1 p,2,8,8"; do
    [ "$(left)" -lt 60 ] && break
    set -- $spec
    timeout 45 "$NCU" --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section SchedulerStats --section LaunchStats -k regex:w4_mmap --launch-skip 1 --launch-count 1 \
        python3 bench/ncu_w4_mma.py --k $1 --n $2 --m $3 --config $4 > "$OUT/ncu_${1}_${2}_m${3}.txt" 2>&1
    echo "== $spec"; grep -E "Duration|DRAM Throughput|Memory Throughput|Issue Slots|Achieved Occupancy|Registers Per|No Eligible|Eligible Warps|Warp Cycles Per Issued|Waves Per SM|ERR" \
        "$OUT/ncu_${1}_${2}_m${3}.txt" | head -n 14 | cut -c1-120
  done
  if [ "$(left)" -gt 60 ]; then
    timeout 45 "$NCU" --clock-control none --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        -k regex:w4_mmap --launch-skip 1 --launch-count 1 \
        python3 bench/ncu_w4_mma.py --k 4096 --n 16384 --m 1 --config p,2,8,4 > "$OUT/ncu_stalls_4096_16384_m1.txt" 2>&1
    grep -E "stalled" "$OUT/ncu_stalls_4096_16384_m1.txt" | sort -k3 -n -r | head -n 8 | cut -c1-120
  fi
fi
t "ncu"
if [ "$(left)" -gt 70 ]; then
  timeout $(( $(left) - 10 )) python3 bench/profile_decode.py --schemes w4a16,w4a8 --batches 1,16 --decoders fused \
      --out "$OUT/decode_profile.jsonl" > "$OUT/profile_stdout.txt" 2>&1
  python3 -c "
import json
for l in open('$OUT/decode_profile.jsonl'):
    r=json.loads(l)
    if r.get('part')=='decode_profile': print(r['scheme'], r['batch'], r.get('graph_us_per_step'), {k:(round(v['us']),int(v['kernels'])) for k,v in r['classes'].items()})
" 2>&1 | cut -c1-250
fi
t "profile"
