#!/usr/bin/env bash
# The fourth device call of session 29 (one NVIDIA H200): the Hessian test with its corrected bound; GPTQ and
# GPTQ + LoRC8 on the OPT-6.7B shape after the half-input Hessians and the host-reuse moves; the move probe.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
timeout 60 python3 -m pytest -m gpu tests/gpu/test_gpu_hessian.py -q -rfE -p no:cacheprovider \
    > "$OUT/gpu_tests_hessian.txt" 2>&1; tail -n 3 "$OUT/gpu_tests_hessian.txt"; t "hessian test"
timeout 120 python3 bench/bench_scale.py --shape opt-6.7b --methods gptq,gptq+lorc --out "$OUT/scale" --budget-s 110 \
    > "$OUT/scale_stdout.txt" 2>&1; tail -n 3 "$OUT/scale_stdout.txt"; t "scale"
timeout 40 python3 bench/profile_phases.py --hidden 4096 --ffn 16384 --heads 32 --nsamples 8 --seqlen 256 \
    --move-probe --out "$OUT/probe" > "$OUT/probe_stdout.txt" 2>&1; tail -n 12 "$OUT/probe_stdout.txt"; t "all"
tar -C "$OUT" -cf "$FINAL/r.tar" . && rm -rf "$OUT"
