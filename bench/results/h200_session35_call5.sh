#!/usr/bin/env bash
# Fifth device call of session 35 (one NVIDIA H200), the final kernel (call 4's; comments changed since, every
# kernel's SASS the same): the speed path's and the real kernels' GPU tests (testbed PPL, LoRC 8 included); per
# linear at 1..128 tokens, symmetric and asymmetric, with the share of the memory floor (bench_w4.py).
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$PWD/third_party/kcache
timeout 170 python3 -m pytest -m gpu tests/gpu/test_gpu_speed.py tests/gpu/test_gpu_kernels.py -q -rfE \
    -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_call5.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call5.txt" | tail -n 8 | cut -c1-300; t "tests"
timeout 150 python3 bench/bench_w4.py --parts gemm --ms 1,16,32,64,128 --kernels w4a16-mma,w4a16-mma-asym \
    --budget-s 140 --out "$OUT/w4_gemm_h200_session35_call5.jsonl" > "$OUT/w4_gemm_stdout_call5.txt" 2>&1
grep -E "^\| " "$OUT/w4_gemm_stdout_call5.txt" | head -n 40; t "gemm"
