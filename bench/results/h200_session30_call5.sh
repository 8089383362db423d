#!/usr/bin/env bash
# The fifth and sixth device calls of session 30 (one NVIDIA H200): the cache test alone in a fresh process, before
# (call 5, gpu_tests_h200_session30_call5a_cache_before_bound.txt) and after (call 6) its bound was set to one
# settling segment.
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; mkdir -p $OUT/r
timeout 60 python3 -m pytest -m gpu tests/gpu/test_gpu_pipeline_moves.py -q -rfE -s -p no:cacheprovider \
    -k "cache_does_not_grow" > $OUT/r/gpu_tests_final_cache.txt 2>&1
