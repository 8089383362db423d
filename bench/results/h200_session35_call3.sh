#!/usr/bin/env bash
# Third device call of session 35 (one NVIDIA H200): the remaining GPU tests on call 2's kernel (speed path, real
# kernels: testbed PPL); Nsight Compute on the "p" body at 64 tokens (if ncu is here); then two variants of the
# "p" body, per linear at 16, 64 and 128 tokens: launch bounds of 2 blocks an SM (registers <= 128 where NT R <= 16)
# and 6 stages instead of 4 (NT < 16).
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$OUT/kcache
timeout 150 python3 -m pytest -m gpu tests/gpu/test_gpu_speed.py tests/gpu/test_gpu_kernels.py -q -rfE \
    -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_call3.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call3.txt" | tail -n 8 | cut -c1-300; t "tests"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
echo "ncu: ${NCU:-none}"
if [ -n "$NCU" ]; then
  for spec in "8192 28672 64 p,2,8,1" "4096 16384 64 p,2,4,1" "28672 8192 16 p,2,8,16"; do
    set -- $spec
    timeout 60 "$NCU" --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section ComputeWorkloadAnalysis -k regex:w4_mmap --launch-skip 1 --launch-count 1 \
        python3 bench/ncu_w4_mma.py --k $1 --n $2 --m $3 --config $4 > "$OUT/ncu_${1}_${2}_m${3}.txt" 2>&1
    echo "== $spec"; grep -E "Duration|Throughput|Achieved Occupancy|Registers|Stall|Issued Warp|No Eligible|Active Warps|Eligible Warps|Theoretical Occ|Block Limit|Warp Cycles|ERR" \
        "$OUT/ncu_${1}_${2}_m${3}.txt" | head -n 40 | cut -c1-150
  done
fi
t "ncu"
cp ptqlab/kernels/csrc/w4_mma.cu /tmp/base.cu; cp ptqlab/kernels/w4_mma.py /tmp/base.py
variant() {  # name, then sed programs for the .cu and the .py
  cp /tmp/base.cu ptqlab/kernels/csrc/w4_mma.cu; cp /tmp/base.py ptqlab/kernels/w4_mma.py
  sed -i "$2" ptqlab/kernels/csrc/w4_mma.cu; sed -i "$3" ptqlab/kernels/w4_mma.py
  timeout 110 python3 bench/bench_w4.py --parts gemm --ms 16,64,128 --kernels w4a16-mma --budget-s 100 \
      --out "$OUT/w4_gemm_h200_session35_call3_$1.jsonl" > "$OUT/w4_gemm_stdout_$1.txt" 2>&1
  echo "== $1"; grep -E "^\| [0-9]" "$OUT/w4_gemm_stdout_$1.txt" | head -n 16
  t "$1"
}
LB='s/^#define PIPE_BOUNDS(NT, R) __launch_bounds__(256)$/#define PIPE_BOUNDS(NT, R) __launch_bounds__(256, ((NT) * (R) <= 16 ? 2 : 1))/'
STC='s/return NT >= 16 ? 3 : 4;/return NT >= 16 ? 3 : 6;/'
STP='s/return 3 if nt >= 16 else 4/return 3 if nt >= 16 else 6/'
variant base 's/^$//' 's/^$//'
variant lb2 "$LB" 's/^$//'
variant st6 "$STC" "$STP"
grep -c "NT >= 16 ? 3 : 6" ptqlab/kernels/csrc/w4_mma.cu; grep -c "else 6" ptqlab/kernels/w4_mma.py
