#!/usr/bin/env bash
# The testbed family's GPU job, in one call of the device tool (issue 13): train the ~2M, ~25M and
# ~60M members of both architectures, then run recipes/sizes.yaml over all eight sizes (the shipped
# ~7M members included), and pack the ~2M checkpoints, all logs and the study database into OUT.
#
#   bash scripts/testbed/family_gpu.sh OUT [DATA_DIR] [DEADLINE_S]
#
# Needs scripts/testbed/build/family (tokenize_family.py). OPT and BLOOM train side by side on the
# one GPU (the small models are launch-bound, so the two overlap well); the study of the ~2M and ~7M
# members starts as soon as the ~2M member is saved, beside the larger trainings. Everything after
# the training is bounded by DEADLINE_S (default 560 s from the start), so OUT is always filled.
set -u
OUT=$(realpath "$1"); DATA=${2:-../shared/data}; DEADLINE=${3:-560}
T0=$(date +%s)
W=$(mktemp -d /tmp/family.XXXX)
mkdir -p "$W/logs" "$W/cache"
export PTQLAB_TESTBED_CACHE=$W/cache PYTHONUNBUFFERED=1
FAM=scripts/testbed/build/family
PTQ=(python -c "from ptqlab.cli import main; main()")

{ nvidia-smi; python -c "import torch, transformers, sys; print(sys.version); print('torch', torch.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name(0))"; } > "$W/logs/device_env.txt" 2>&1

left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }

study() {  # study MODEL... : the recipe's runs of these models, into the shared database
    local models=$(IFS=,; echo "$*")
    local t=$(( $(left) - 25 ))
    [ "$t" -gt 5 ] || { echo "no time left for $models"; return; }
    echo "[$(( $(date +%s) - T0 ))s] study $models (limit ${t}s)"
    timeout --signal=TERM "$t" "${PTQ[@]}" study recipes/sizes.yaml --model "$models" --db "$W/sizes.db" \
        --data-dir "$DATA" >> "$W/logs/study_${1}.txt" 2>&1
    echo "[$(( $(date +%s) - T0 ))s] study $models: exit $?"
}

chain() {  # chain ARCH: 2m, then the study of 2m + 7m beside the 25m and 60m trainings, then their study
    local a=$1
    python scripts/testbed/train_family.py --arch "$a" --sizes 2m --data "$FAM" --log-dir "$W/logs" \
        > "$W/logs/train_${a}-2m_stdout.txt" 2>&1
    echo "[$(( $(date +%s) - T0 ))s] $a-2m trained: exit $?"
    study "testbed-$a-2m" "testbed-$a" &
    local sp=$!
    for s in 25m 60m; do
        python scripts/testbed/train_family.py --arch "$a" --sizes "$s" --data "$FAM" --log-dir "$W/logs" \
            > "$W/logs/train_${a}-${s}_stdout.txt" 2>&1
        echo "[$(( $(date +%s) - T0 ))s] $a-$s trained: exit $?"
    done
    wait "$sp"
    study "testbed-$a-25m" "testbed-$a-60m"
}

chain opt > "$W/logs/chain_opt.txt" 2>&1 &
chain bloom > "$W/logs/chain_bloom.txt" 2>&1 &
wait
cat "$W/logs/chain_opt.txt" "$W/logs/chain_bloom.txt"

# pack: the ~2M checkpoints (shipped), every log, the study database
tar -C "$W/cache" -cf "$OUT/family_2m_models.tar" opt-2m bloom-2m 2>/dev/null
tar -C "$W" -czf "$OUT/family_logs.tar.gz" logs
cp "$W/sizes.db" "$OUT/sizes.db" 2>/dev/null
du -sh "$W/cache"/* 2>/dev/null
echo "total $(( $(date +%s) - T0 ))s"
