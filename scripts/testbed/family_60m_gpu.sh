#!/usr/bin/env bash
# Issue 13, second GPU job: the ~60M members with (residual) dropout. Without it both ~60M members overfit the
# 19.4M-token corpus after 4-7 epochs and stopped early above the ~25M members (OPT 3.277 vs 3.254, BLOOM
# 3.328 vs 3.296 held-out loss; scripts/testbed/logs/family/). Trains each architecture's ~60M member with
# dropout 0.1 and 0.2, keeps the one with the lower held-out loss (the early-stopping set) in the cache, then
# runs recipes/sizes.yaml on the two kept members.
#
#   bash scripts/testbed/family_60m_gpu.sh OUT [DATA_DIR] [WORKERS]
set -u
OUT=$(realpath -m "$1"); DATA=$(realpath "${2:-../shared/data}"); WORKERS=${3:-4}
T0=$(date +%s)
mkdir -p "$OUT/logs"
export PTQLAB_TESTBED_CACHE=${PTQLAB_TESTBED_CACHE:-$OUT/cache} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
FAM=scripts/testbed/build/family
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi > "$OUT/logs/device_env.txt" 2>&1

for d in 0.1 0.2; do
    mkdir -p "$OUT/logs/d$d"
    for a in opt bloom; do
        python3 scripts/testbed/train_family.py --arch "$a" --sizes 60m --data "$FAM" --out "$OUT/d$d" \
            --log-dir "$OUT/logs/d$d" -- --dropout "$d" > "$OUT/logs/d$d/train_${a}-60m_stdout.txt" 2>&1
        log "$a-60m dropout $d trained: exit $?"
    done
done

# keep, per architecture, the variant with the lower held-out loss of the saved (fp16) model
python3 - "$OUT" "$PTQLAB_TESTBED_CACHE" <<'PY'
import json, shutil, sys
from pathlib import Path
out, cache = Path(sys.argv[1]), Path(sys.argv[2])
choice = {}
for arch in ("opt", "bloom"):
    scores = {}
    for d in ("0.1", "0.2"):
        log = out / "logs" / f"d{d}" / f"{arch}-60m_train_log.jsonl"
        rows = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
        summ = [r for r in rows if r["event"] == "summary"]
        if summ and (out / f"d{d}" / f"{arch}-60m" / "config.json").exists():
            scores[d] = summ[0]["saved_heldout_loss"]
    if scores:
        best = min(scores, key=scores.get)
        cache.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cache / f"{arch}-60m", ignore_errors=True)
        shutil.copytree(out / f"d{best}" / f"{arch}-60m", cache / f"{arch}-60m")
        choice[arch] = {"dropout": float(best), "saved_heldout_loss": scores}
(out / "choice.json").write_text(json.dumps(choice, indent=1))
print(json.dumps(choice))
PY
log "choice: $(cat "$OUT/choice.json" | tr -d '\n ')"
python3 -c "import sys; from ptqlab.cli import main; sys.exit(main())" study recipes/sizes.yaml \
    --model testbed-opt-60m,testbed-bloom-60m --db "$OUT/sizes60.db" --data-dir "$DATA" --workers "$WORKERS" \
    > "$OUT/logs/study60.txt" 2>&1
log "study: exit $?"
touch "$OUT/DONE"
