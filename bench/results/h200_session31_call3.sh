#!/usr/bin/env bash
# The third device call of session 31 (one NVIDIA H200), the final code: GPTQ, GPTQ + LoRC (plain and aware) and
# RTN on the OPT-6.7B shape (4 blocks built) with the new defaults (staged moves, LoRC's batched Krylov), LoRC's
# profile at its defaults, and the first half of the GPU suite (the W4 GEMM and Hessian files, the LoRC and moves
# files).
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
timeout 200 python3 bench/bench_scale.py --shape opt-6.7b --layers 4 --methods gptq,gptq+lorc,gptq+lorc-aware,rtn \
    --out "$OUT/scale" --budget-s 180 > "$OUT/scale_stdout.txt" 2>&1
tail -n 5 "$OUT/scale_stdout.txt" | cut -c1-300; t "scale"
(cd bench && timeout 100 python3 profile_lorc.py --shape opt-6.7b --eigh-sizes 448 --sweep 0:0:0,0:0:1) \
    > "$OUT/profile_lorc_stdout.txt" 2>&1
grep -E '"what": "(batched|one_at|krylov_variant)' "$OUT/profile_lorc_stdout.txt" | cut -c100-460; t "profile"
timeout 250 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_gemm.py tests/gpu/test_gpu_hessian.py \
    tests/gpu/test_gpu_lorc.py tests/gpu/test_gpu_pipeline_moves.py -q -rfE -p no:cacheprovider --durations=5 \
    > "$OUT/gpu_tests_part1.txt" 2>&1
tail -n 4 "$OUT/gpu_tests_part1.txt" | cut -c1-300; t "tests part 1"
