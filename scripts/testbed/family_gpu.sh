#!/usr/bin/env bash
# The testbed family's GPU job (issue 13): train the ~25M and ~60M members of both architectures, one at a
# time with the GPU to itself, then run recipes/sizes.yaml over all eight sizes (the shipped ~2M and ~7M
# members included) with several study workers sharing the GPU, and leave the logs and the study database
# in OUT.
#
#   bash scripts/testbed/family_gpu.sh OUT [DATA_DIR] [DEADLINE_S] [WORKERS]
#
# Needs scripts/testbed/build/family (tokenize_family.py). The study is bounded by DEADLINE_S from the
# start (default 1500 s), so OUT always gets what was done; OUT/DONE is written last. The trained models
# stay in $PTQLAB_TESTBED_CACHE (default: a folder under /tmp), 53 MB and 127 MB in fp16 per architecture.
# Longer than one device call: start it detached (setsid) and collect OUT with later calls while the
# machine is held (scripts/testbed/README.md).
set -u
OUT=$(realpath -m "$1"); DATA=$(realpath "${2:-../shared/data}"); DEADLINE=${3:-1500}; WORKERS=${4:-4}
T0=$(date +%s)
mkdir -p "$OUT/logs"
export PTQLAB_TESTBED_CACHE=${PTQLAB_TESTBED_CACHE:-$OUT/cache} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
FAM=scripts/testbed/build/family
PTQ=(python3 -c "import sys; from ptqlab.cli import main; sys.exit(main())")
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

{ nvidia-smi; python3 -c "import torch, transformers, sys; print(sys.version); print('torch', torch.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/logs/device_env.txt" 2>&1

for member in opt-25m bloom-25m opt-60m bloom-60m; do
    a=${member%-*}; s=${member#*-}
    python3 scripts/testbed/train_family.py --arch "$a" --sizes "$s" --data "$FAM" --log-dir "$OUT/logs" \
        > "$OUT/logs/train_${member}_stdout.txt" 2>&1
    log "$member trained: exit $?"
done

t=$(( DEADLINE - ($(date +%s) - T0) ))
log "study of all sizes, $WORKERS workers (limit ${t}s)"
timeout --signal=INT "$t" "${PTQ[@]}" study recipes/sizes.yaml --db "$OUT/sizes.db" --data-dir "$DATA" \
    --workers "$WORKERS" > "$OUT/logs/study.txt" 2>&1
log "study: exit $?"
du -sh "$PTQLAB_TESTBED_CACHE"/* 2>/dev/null
log "total"
touch "$OUT/DONE"
