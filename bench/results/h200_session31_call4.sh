#!/usr/bin/env bash
# The fourth device call of session 31 (one NVIDIA H200), the final code (LoRC's Krylov applies each Gram as two
# float32 products with the error instead of forming the float64 Gram; bench_scale warms up with LoRC): the OPT-6.7B
# shape rows, LoRC's profile, and the rest of the GPU suite (all files but the W4 GEMM and Hessian ones, which ran
# in call 3 on code these changes do not reach).
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
timeout 150 python3 bench/bench_scale.py --shape opt-6.7b --layers 4 --methods gptq,gptq+lorc,gptq+lorc-aware,rtn \
    --out "$OUT/scale" --budget-s 130 > "$OUT/scale_stdout.txt" 2>&1
tail -n 4 "$OUT/scale_stdout.txt" | cut -c1-300; t "scale"
(cd bench && timeout 60 python3 profile_lorc.py --shape opt-6.7b --eigh-sizes 448 --sweep 0:0:1) \
    > "$OUT/profile_lorc_stdout.txt" 2>&1
grep -E '"what": "(batched|one_at|krylov_variant)' "$OUT/profile_lorc_stdout.txt" | cut -c100-460; t "profile"
left=$(( 560 - ($(date +%s) - T0) ))
timeout $(( left > 30 ? left : 30 )) python3 -m pytest -m gpu tests/gpu -q -rfE -p no:cacheprovider --durations=10 \
    --ignore tests/gpu/test_gpu_w4_gemm.py --ignore tests/gpu/test_gpu_hessian.py > "$OUT/gpu_tests_part2.txt" 2>&1
tail -n 6 "$OUT/gpu_tests_part2.txt" | cut -c1-300; t "tests part 2"
