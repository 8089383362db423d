#!/usr/bin/env bash
# Session 38, call 5 (H200): the GPU test files that failed in call 4 on the machine's setup (compressed_tensors
# not installed there: its wheels and pydantic's carried in build/pydeps), on the final code.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
export PTQLAB_KERNEL_CACHE=$PWD/build/kernel_cache PYTHONPATH=$PWD:$PWD/build/pydeps
python3 -c "import compressed_tensors, pydantic; print('compressed_tensors', compressed_tensors.__version__)"
timeout 150 python3 -m pytest -m gpu tests/gpu/test_gpu_export.py tests/gpu/test_gpu_formats.py \
    tests/gpu/test_gpu_transforms.py tests/gpu/test_gpu_zq.py tests/gpu/test_gpu_pipeline_moves.py -q -rfE \
    -p no:cacheprovider > "$OUT/gpu_tests_setup_files.txt" 2>&1
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests_setup_files.txt" | tail -n 12 | cut -c1-250
tar -C "$OUT" -cf "$FINAL/r.tar" .
