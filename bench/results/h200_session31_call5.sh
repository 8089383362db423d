#!/usr/bin/env bash
# The fifth device call of session 31 (one NVIDIA H200): the moves and LoRC GPU tests after evaluation visits took
# the moves' copy-free way back (discard), then the larger shapes of issue 22 (OPT-13B, OPT-30B, Llama-3-8B,
# Llama-3-70B block shapes, 2 blocks built each, 128 x 2048 calibration) with RTN, GPTQ, GPTQ + LoRC, aware LoRC and
# ZQ-Local while the budget lasts.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
timeout 120 python3 -m pytest -m gpu tests/gpu/test_gpu_pipeline_moves.py tests/gpu/test_gpu_lorc.py -q -rfE \
    -p no:cacheprovider --durations=5 -s > "$OUT/gpu_tests_call5.txt" 2>&1
grep -E "moves: move|passed|failed|Error" "$OUT/gpu_tests_call5.txt" | tail -n 8 | cut -c1-300; t "tests"
timeout 440 python3 bench/bench_scale.py --shape opt-13b,llama-3-8b,opt-30b,llama-3-70b \
    --methods rtn,gptq,gptq+lorc,gptq+lorc-aware,zq-local --out "$OUT/scale" --budget-s 350 \
    > "$OUT/scale_stdout.txt" 2>&1
grep "^#" "$OUT/scale_stdout.txt" | cut -c1-200 | tail -n 30; t "scale"
