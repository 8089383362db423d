#!/usr/bin/env bash
# Fifth device call of session 34 (one NVIDIA H200): LoRC in the CUDA W4A16 kernel's epilogue, U's shared rows
# padded to 17 words (no bank conflicts) and t summed per block before its global atomics. The GPU tests of the
# MMA kernel, the fusions, the speed path and the real kernels; per linear at 1 and 16 tokens; decoding; profile.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$OUT/kcache
timeout 260 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_mma.py tests/gpu/test_gpu_fuse.py tests/gpu/test_gpu_speed.py \
    tests/gpu/test_gpu_kernels.py -q -rfE -p no:cacheprovider --durations=5 > "$OUT/gpu_tests_call5.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call5.txt" | tail -n 8 | cut -c1-300; t "tests"
timeout 100 python3 bench/bench_w4.py --parts gemm --ms 1,16 --kernels w4a16-mma,w4a16-mma+lorc8,w4a16-triton+lorc8 \
    --budget-s 90 --out "$OUT/w4_gemm_h200_session34_call5.jsonl" > "$OUT/w4_gemm_stdout.txt" 2>&1
tail -n 16 "$OUT/w4_gemm_stdout.txt"; t "gemm"
timeout 120 python3 bench/bench_w4.py --parts decode --budget-s 110 \
    --decode-schemes fp16,w4a16:triton,w4a16-lorc8:triton,w4a16-lorc8:triton-nomma \
    --out "$OUT/w4_decode_h200_session34_call5.jsonl" > "$OUT/w4_decode_stdout.txt" 2>&1
grep -E "tok_s|decode " "$OUT/w4_decode_stdout.txt" | cut -c1-400 | tail -n 12; t "decode"
timeout 60 python3 bench/profile_decode.py --schemes w4a16,w4a16-lorc8 --batches 1,16 --decoders fused \
    --out "$OUT/decode_profile_h200_session34_call5.jsonl" > "$OUT/profile_stdout.txt" 2>&1
tail -n 4 "$OUT/profile_stdout.txt" | cut -c1-600; t "profile"
