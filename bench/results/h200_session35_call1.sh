#!/usr/bin/env bash
# First device call of session 35 (one NVIDIA H200): Marlin side by side (bench_marlin.py, the ptxas workaround);
# the testbed real-vs-fake PPL test with LoRC rank 8 on the committed kernel; then session 34's untested early-t
# patch (each thread reads LoRC's t halfway through its weight loop): the LoRC GPU tests, per linear at 1 and 16
# tokens, decoding.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; tar -C "$OUT" -cf "$FINAL/r.tar" .; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PTQLAB_KERNEL_CACHE=$OUT/kcache
timeout 200 python3 bench/bench_marlin.py --marlin-src third_party/marlin --out "$OUT/marlin_h200_session35_call1.jsonl" \
    > "$OUT/marlin_stdout.txt" 2>&1; echo "marlin rc=$?"
tail -n 5 "$OUT/marlin_stdout.txt" | cut -c1-400; t "marlin"
timeout 120 python3 -m pytest -m gpu tests/gpu/test_gpu_kernels.py -k testbed -q -rfE -p no:cacheprovider \
    > "$OUT/gpu_tests_call1_testbed.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call1_testbed.txt" | tail -n 6 | cut -c1-300; t "testbed"
P=bench/results/w4_mma_lorc_early_t_untested_session34.patch
git apply "$P" 2>/dev/null || patch -p1 < "$P" || python3 - "$P" <<'PY'
import sys, subprocess; sys.exit(1)
PY
grep -c "try_load" ptqlab/kernels/csrc/w4_mma.cu
timeout 150 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_mma.py tests/gpu/test_gpu_fuse.py -k "(lorc and not lorc0) or fuse" \
    -q -rfE -p no:cacheprovider > "$OUT/gpu_tests_call1_early_t.txt" 2>&1
grep -E "passed|failed|Error" "$OUT/gpu_tests_call1_early_t.txt" | tail -n 6 | cut -c1-300; t "early-t tests"
timeout 100 python3 bench/bench_w4.py --parts gemm --ms 1,16 --kernels w4a16-mma,w4a16-mma+lorc8 \
    --budget-s 90 --out "$OUT/w4_gemm_h200_session35_call1_early_t.jsonl" > "$OUT/w4_gemm_stdout.txt" 2>&1
tail -n 14 "$OUT/w4_gemm_stdout.txt"; t "gemm"
timeout 120 python3 bench/bench_w4.py --parts decode --budget-s 110 \
    --decode-schemes fp16,w4a16:triton,w4a16-lorc8:triton \
    --out "$OUT/w4_decode_h200_session35_call1_early_t.jsonl" > "$OUT/w4_decode_stdout.txt" 2>&1
grep -E "tok_s|decode " "$OUT/w4_decode_stdout.txt" | cut -c1-400 | tail -n 10; t "decode"
