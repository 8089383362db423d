#!/usr/bin/env bash
# First device call of session 33 (one NVIDIA H200): the decoder's fusions (add + LayerNorm in one Triton kernel,
# q/k/v as one linear, the attention mask additive once a step). GPU tests of the fusions and the speed path, then
# the decode profile (fused vs plain) and the decode table (fused vs plain) on the OPT-6.7B shape.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$OUT/kcache
timeout 200 python3 -m pytest -m gpu tests/gpu/test_gpu_fuse.py tests/gpu/test_gpu_speed.py \
    -q -rfE -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_call1.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call1.txt" | tail -n 8 | cut -c1-300; t "tests"
timeout 120 python3 bench/profile_decode.py --schemes fp16,w4a16 --batches 1,16 --decoders fused,plain \
    --out "$OUT/decode_profile.jsonl" > "$OUT/profile_stdout.txt" 2>&1
tail -n 3 "$OUT/profile_stdout.txt" | cut -c1-300; t "profile"
timeout 240 python3 bench/bench_w4.py --parts decode --decoders fused,plain --budget-s 200 \
    --decode-schemes fp16,w4a16:triton,w4a16:triton-nomma,w4a16-lorc8:triton,w8a8:triton \
    --out "$OUT/w4_decode.jsonl" > "$OUT/decode_stdout.txt" 2>&1
tail -n 12 "$OUT/decode_stdout.txt" | cut -c1-200; t "decode"
