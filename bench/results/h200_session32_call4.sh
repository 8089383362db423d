#!/usr/bin/env bash
# Fourth device call of session 32 (one NVIDIA H200): the rest of the GPU suite on the final code (the W4A16 MMA
# kernel's own file passed in call 3): part 1 the W4 GEMM / Hessian / LoRC / moves files, part 2 every other file.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$OUT/kcache
P1="tests/gpu/test_gpu_w4_gemm.py tests/gpu/test_gpu_hessian.py tests/gpu/test_gpu_lorc.py tests/gpu/test_gpu_pipeline_moves.py"
timeout 210 python3 -m pytest -m gpu $P1 -q -rfE -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_call4_part1.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call4_part1.txt" | tail -n 8 | cut -c1-300; t "part 1"
IGN=""; for f in $P1 tests/gpu/test_gpu_w4_mma.py; do IGN="$IGN --ignore=$f"; done
timeout 330 python3 -m pytest -m gpu tests/gpu $IGN -q -rfE -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_call4_part2.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call4_part2.txt" | tail -n 12 | cut -c1-300; t "part 2"
