#!/usr/bin/env bash
# The Llama testbed family's GPU job (issue 18): train testbed-llama's four sizes one at a time with the GPU to
# itself (compiled), then run recipes/sizes.yaml on them, leaving logs, the shipped sizes and the study in OUT.
#
#   bash scripts/testbed/llama_gpu.sh OUT SIZES [DATA_DIR] [WORKERS]
#
#   SIZES: comma-separated sizes to train (2m,7m,25m,60m), or "study" to run only the size study.
#   A member already in $PTQLAB_TESTBED_CACHE (or shipped in ptqlab/testbed) is not trained again, so the job
#   can be split over several device calls of at most 10 minutes while the machine is held:
#     call 1: bash scripts/testbed/llama_gpu.sh $OUT 2m,7m,25m      (~6 min on an H200)
#     call 2: bash scripts/testbed/llama_gpu.sh $OUT 60m,study DIR  (~7 min)
#   STUDY_MODELS (default: all four sizes) limits the study, e.g. to re-run one retrained size.
#   The ~2M and ~7M members come back as OUT/ship_llama-2m.tar and OUT/ship_llama.tar (folders for ptqlab/testbed;
#   a device call returns at most 8 files of 16 MiB), the logs as OUT/logs.tar.
# Needs scripts/testbed/build/family (tokenize_family.py).
set -u
OUT=$(realpath -m "$1"); SIZES=$2; DATA=$(realpath -m "${3:-../shared/data}"); WORKERS=${4:-4}
T0=$(date +%s)
mkdir -p "$OUT/logs"
export PTQLAB_TESTBED_CACHE=${PTQLAB_TESTBED_CACHE:-/tmp/ptqlab_testbed_cache} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
FAM=scripts/testbed/build/family
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

{ nvidia-smi; python3 -c "import torch, transformers, sys; print(sys.version); print('torch', torch.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/logs/device_env.txt" 2>&1

for size in ${SIZES//,/ }; do
    [ "$size" = study ] && continue
    folder=llama-$size; [ "$size" = 7m ] && folder=llama
    if [ -f "ptqlab/testbed/$folder/config.json" ] || [ -f "$PTQLAB_TESTBED_CACHE/llama-$size/config.json" ]; then
        log "llama-$size: already built"
    else
        python3 scripts/testbed/train_family.py --arch llama --sizes "$size" --data "$FAM" --log-dir "$OUT/logs" \
            --out "$PTQLAB_TESTBED_CACHE" > "$OUT/logs/train_llama-${size}_stdout.txt" 2>&1
        log "llama-$size trained: exit $?"
        tail -n 40 "$OUT/logs/train_llama-${size}_stdout.txt" | grep -E "saved_heldout|best_step|tok_per_s|steps" || true
    fi
    # the cache holds every size as llama-<size>; the package folder of the ~7M member is ptqlab/testbed/llama
    if [ "$size" = 7m ] && [ -d "$PTQLAB_TESTBED_CACHE/llama" ]; then
        rm -rf "$PTQLAB_TESTBED_CACHE/llama-7m"; mv "$PTQLAB_TESTBED_CACHE/llama" "$PTQLAB_TESTBED_CACHE/llama-7m"
    fi
    case $size in 2m|7m) [ -d "$PTQLAB_TESTBED_CACHE/llama-$size" ] && \
        tar -C "$PTQLAB_TESTBED_CACHE" -cf "$OUT/ship_$folder.tar" --transform "s,^llama-$size,$folder," "llama-$size";; esac
done

if [[ ",$SIZES," == *",study,"* ]]; then
    # testbed-llama (the ~7M member) is found only in the package folder: put this machine's copy there
    [ -f ptqlab/testbed/llama/config.json ] || [ ! -d "$PTQLAB_TESTBED_CACHE/llama-7m" ] || \
        cp -r "$PTQLAB_TESTBED_CACHE/llama-7m" ptqlab/testbed/llama
    log "size study of testbed-llama, $WORKERS workers"
    python3 -c "import sys; from ptqlab.cli import main; sys.exit(main())" study recipes/sizes.yaml --db "$OUT/sizes_llama.db" --data-dir "$DATA" --workers "$WORKERS" \
        --model "${STUDY_MODELS:-testbed-llama-2m,testbed-llama,testbed-llama-25m,testbed-llama-60m}" \
        > "$OUT/logs/study.txt" 2>&1
    log "study: exit $?"
    tail -n 5 "$OUT/logs/study.txt"
fi
du -sh "$PTQLAB_TESTBED_CACHE"/* 2>/dev/null
log "total"
tar -C "$OUT" -cf "$OUT/logs.tar" logs && rm -rf "$OUT/logs"
