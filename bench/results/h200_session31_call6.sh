#!/usr/bin/env bash
# The sixth device call of session 31 (one NVIDIA H200): the methods issue's transforms (SmoothQuant + RTN W8A8,
# AWQ + RTN W4, rotation + GPTQ W4) and ZQ-Global in the scale benchmark, OPT-6.7B and Llama-3-8B shapes, 2 blocks.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
timeout 260 python3 bench/bench_scale.py --shape opt-6.7b,llama-3-8b \
    --methods smoothquant+rtn-w8a8,awq+rtn,rotate+gptq,zq-global --out "$OUT/scale" --budget-s 200 \
    > "$OUT/scale_stdout.txt" 2>&1
grep "^#" "$OUT/scale_stdout.txt" | cut -c1-250 | tail -n 12; t "scale"
