#!/usr/bin/env bash
# The first device call of session 31 (one NVIDIA H200): LoRC's Krylov runs batched over a block's linears
# (profile and GPU test), block moves through a pinned staging buffer (GPU test), and GPTQ / GPTQ + LoRC on the
# OPT-6.7B shape with both moves.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
timeout 170 python3 -m pytest -m gpu tests/gpu/test_gpu_lorc.py tests/gpu/test_gpu_pipeline_moves.py -q -rfE \
    -p no:cacheprovider --durations=5 -s > "$OUT/gpu_tests_call1.txt" 2>&1
grep -E "moves: move|passed|failed|Error" "$OUT/gpu_tests_call1.txt" | tail -n 12 | cut -c1-300; t "tests"
(cd bench && timeout 120 python3 profile_lorc.py --shape opt-6.7b) > "$OUT/profile_lorc_stdout.txt" 2>&1
grep '"what"' "$OUT/profile_lorc_stdout.txt" | cut -c1-420; t "profile"
timeout 240 python3 bench/bench_scale.py --shape opt-6.7b --methods gptq,gptq+lorc,gptq+lorc-aware \
    --moves host-reuse,staged --out "$OUT/scale" --budget-s 220 > "$OUT/scale_stdout.txt" 2>&1
tail -n 8 "$OUT/scale_stdout.txt" | cut -c1-300; t "scale"
