#!/usr/bin/env bash
# Fifth device call of session 32 (one NVIDIA H200): after the last GPU-path change (the availability probe loads
# the cubin), the MMA kernel's GPU tests, the real-kernel tests (real-vs-fake PPL on the testbed) and the speed tests.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$OUT/kcache
timeout 250 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_mma.py tests/gpu/test_gpu_kernels.py tests/gpu/test_gpu_speed.py \
    -q -rfE -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_call5.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call5.txt" | tail -n 8 | cut -c1-300; t "tests"
