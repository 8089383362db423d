#!/usr/bin/env bash
# Second device call of session 33 (one NVIDIA H200): the "d" configs of the W4A16 MMA kernel (8 KB of weight in
# flight a warp, inputs a tile ahead). GPU tests of the kernel (every config against float64), the fusions and the
# speed path; the per-linear table at 1 and 16 tokens; decode (fused decoder) and its profile.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$OUT/kcache
timeout 260 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_mma.py tests/gpu/test_gpu_fuse.py tests/gpu/test_gpu_speed.py \
    -q -rfE -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_call2.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call2.txt" | tail -n 8 | cut -c1-300; t "tests"
timeout 150 python3 bench/bench_w4.py --parts gemm --ms 1,16 --kernels w4a16-mma,w4a16-mma-asym,w4a16-triton \
    --budget-s 130 --out "$OUT/w4_gemm.jsonl" > "$OUT/gemm_stdout.txt" 2>&1
tail -n 14 "$OUT/gemm_stdout.txt" | cut -c1-200; t "gemm"
timeout 150 python3 bench/bench_w4.py --parts decode --decoders fused --budget-s 120 \
    --decode-schemes fp16,w4a16:triton,w4a16-lorc8:triton \
    --out "$OUT/w4_decode.jsonl" > "$OUT/decode_stdout.txt" 2>&1
tail -n 4 "$OUT/decode_stdout.txt" | cut -c1-200; t "decode"
timeout 90 python3 bench/profile_decode.py --schemes w4a16 --batches 1,16 --decoders fused \
    --out "$OUT/decode_profile.jsonl" > "$OUT/profile_stdout.txt" 2>&1
tail -n 2 "$OUT/profile_stdout.txt" | cut -c1-200; t "profile"
