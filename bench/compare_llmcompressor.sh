#!/usr/bin/env bash
# ptqlab vs llm-compressor (SmoothQuant, AWQ, RTN, GPTQ) on testbed-opt, CPU, one command:
#   bash bench/compare_llmcompressor.sh
# Env: PTQLAB_PY (ptqlab's interpreter, default .venv/bin/python of the main checkout), LLMC_VENV (default
# /work/venv-llmc: made here if missing, torch pinned to ptqlab's 2.13.0 so llm-compressor cannot pull another),
# LLMC_WORK (scratch folder), NSAMPLES (64), THREADS (1: the machine is shared), OUT (the JSONL).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PTQLAB_PY=${PTQLAB_PY:-/work/main/.venv/bin/python}
LLMC_VENV=${LLMC_VENV:-/work/venv-llmc}
LLMC_WORK=${LLMC_WORK:-/tmp/llmc_compare}
NSAMPLES=${NSAMPLES:-64}
OUT=${OUT:-$ROOT/bench/results/llmcompressor_compare_cpu.jsonl}
export OMP_NUM_THREADS=${THREADS:-1} HF_HUB_OFFLINE=1 PTQLAB_DATA=${PTQLAB_DATA:-$ROOT/../shared/data}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

if [ ! -x "$LLMC_VENV/bin/python" ]; then
  python3 -m venv "$LLMC_VENV"
  "$LLMC_VENV/bin/pip" install torch==2.13.0
  "$LLMC_VENV/bin/pip" install llmcompressor
fi
"$LLMC_VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

B=bench/compare_llmcompressor.py
rm -f "$OUT"
"$PTQLAB_PY" $B prepare --work "$LLMC_WORK" --nsamples "$NSAMPLES"
"$PTQLAB_PY" $B ptqlab --work "$LLMC_WORK" --out "$OUT"
# llm-compressor's own venv: no ptqlab import there (its evaluate.py is loaded from the file); PYTHONPATH dropped
env -u PYTHONPATH "$LLMC_VENV/bin/python" $B llmc --work "$LLMC_WORK" --out "$OUT"
# the same AWQ row without the CPU pin_memory workaround: records llm-compressor's own error on a CPU-only torch
env -u PYTHONPATH "$LLMC_VENV/bin/python" $B llmc --work "$LLMC_WORK" --out "$OUT" --only awq-rtn-W4A16-g128-sym \
  --no-workaround
"$PTQLAB_PY" $B dense --work "$LLMC_WORK" --out "$OUT"
"$PTQLAB_PY" $B table --out "$OUT"
