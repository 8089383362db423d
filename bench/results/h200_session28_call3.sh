#!/usr/bin/env bash
# The third device call of 2026-12-01 (one NVIDIA H200): the GPU tests of what changed that session, then the
# benchmarks that measure it. Run from the repository root with OUT set.
# No data folder is needed (the shipped held-out text is the evaluation set). The streamed-quantization bench runs
# in the background during the tests (its memory figures count, not its time).
set -u
FINAL=$OUT; OUT=$OUT/r  # one tar comes back (a call returns at most 8 files)
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$OUT/stream" "$OUT/lorc"
( timeout 300 python3 bench/bench_stream.py --shape opt-6.7b --method gptq --eval heldout --out "$OUT/stream" \
    --budget-s 200 > "$OUT/stream/stdout.txt" 2>&1; echo "exit $?" >> "$OUT/stream/stdout.txt" ) &
STREAM=$!
timeout 120 python3 -m pytest -m gpu tests/gpu/test_gpu_w4_gemm.py -q -rfE -p no:cacheprovider \
    -k "reference[1- or int8_gemm or split_k or act_order or packing or memory or fp8 or bf16" \
    > "$OUT/gpu_tests_w4.txt" 2>&1; tail -4 "$OUT/gpu_tests_w4.txt"; t "w4 tests"
timeout 110 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider -s tests/gpu/test_gpu_speed.py \
    tests/test_bench_decode.py tests/gpu/test_gpu_kernels.py tests/gpu/test_gpu_export.py tests/gpu/test_gpu_formats.py \
    -k "speed or decode or testbed or zq or lorc" > "$OUT/gpu_tests_rest.txt" 2>&1; tail -4 "$OUT/gpu_tests_rest.txt"
t "other tests"
wait $STREAM; tail -3 "$OUT/stream/stdout.txt"; t "stream"
timeout 90 python3 bench/bench_scale.py --shape opt-6.7b --methods rtn,gptq,gptq+lorc,zq-local --out "$OUT/scale" \
    --budget-s 70 > "$OUT/scale_stdout.txt" 2>&1; tail -6 "$OUT/scale_stdout.txt"; t "scale"
left=$(( ${CALL_BUDGET_S:-545} - ($(date +%s) - T0) ))
timeout $left python3 bench/bench_w4.py --parts gemm,decode --ms 1 --out "$OUT/w4.jsonl" --budget-s $(( left - 25 )) \
    --decode-schemes fp16,w4a16:triton,w4a16-lorc8:triton,w4a8:triton,w8a8:triton,w4a16:tinygemm \
    > "$OUT/w4_stdout.txt" 2>&1; grep -v '^{' "$OUT/w4_stdout.txt" | tail -30; t "w4 bench"
left=$(( ${CALL_BUDGET_S:-545} + 15 - ($(date +%s) - T0) ))
[ $left -gt 15 ] && OUT=$OUT/lorc timeout $left python3 bench/bench_lorc_svd.py --krylov --ranks 8 > "$OUT/lorc_stdout.txt" 2>&1
tail -8 "$OUT/lorc_stdout.txt"; t "all"
tar -C "$OUT" -cf "$FINAL/r.tar" . && rm -rf "$OUT"
