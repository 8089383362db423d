#!/usr/bin/env bash
# Third device call of session 33 (one NVIDIA H200), on the final code (the MMA kernel as in session 32, the
# decoder's fusions): the GPU tests of the fusions, the speed path, the MMA kernel and the real kernels.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$OUT/kcache
timeout 400 python3 -m pytest -m gpu tests/gpu/test_gpu_fuse.py tests/gpu/test_gpu_speed.py tests/gpu/test_gpu_w4_mma.py \
    tests/gpu/test_gpu_kernels.py -q -rfE -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_call3.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call3.txt" | tail -n 8 | cut -c1-300; t "tests"
