#!/usr/bin/env bash
# The second device call of session 31 (one NVIDIA H200): LoRC's batched Krylov variants (block width, first
# Rayleigh-Ritz size, eigh of a batch on concurrent streams) on an OPT-6.7B block's Grams; the LoRC and moves GPU
# tests; GPTQ on the OPT-6.7B shape (4 blocks built) with the host-reuse and the pinned staged moves.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
(cd bench && timeout 200 python3 profile_lorc.py --shape opt-6.7b --eigh-sizes 352,480 \
    --sweep 0:0:0,0:0:1,32:640:1,24:480:1,16:384:0,16:384:1,16:448:1,12:320:1,8:256:0,8:256:1,8:320:1) \
    > "$OUT/profile_lorc_stdout.txt" 2>&1
grep -E '"what": "(batched|one_at|krylov_variant|fp16|ritz)' "$OUT/profile_lorc_stdout.txt" | cut -c100-560; t "profile"
timeout 150 python3 -m pytest -m gpu tests/gpu/test_gpu_lorc.py tests/gpu/test_gpu_pipeline_moves.py -q -rfE \
    -p no:cacheprovider --durations=5 -s > "$OUT/gpu_tests_call2.txt" 2>&1
grep -E "moves: move|passed|failed|Error" "$OUT/gpu_tests_call2.txt" | tail -n 12 | cut -c1-300; t "tests"
timeout 200 python3 bench/bench_scale.py --shape opt-6.7b --layers 4 --methods gptq --moves host-reuse,staged,host-reuse,staged \
    --out "$OUT/scale" --budget-s 180 > "$OUT/scale_stdout.txt" 2>&1
tail -n 5 "$OUT/scale_stdout.txt" | cut -c1-300; t "scale"
