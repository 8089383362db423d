#!/usr/bin/env bash
# The second device call of session 30 (one NVIDIA H200), issue 22: ZQ's captured training steps against the eager
# loop (GPU tests, then time on testbed-opt); the GPTQ kernel tests with the row-major flipped-Cholesky factor;
# GPTQ and GPTQ+LoRC on the OPT-6.7B shape after the inverse, TF32-log and Krylov-tolerance changes; the 82-run
# methods recipe, timed per run.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
timeout 150 python3 -m pytest -m gpu tests/gpu/test_gpu_zq.py tests/gpu/test_gpu_kernels.py -q -rfE \
    -p no:cacheprovider --durations=8 > "$OUT/gpu_tests_zq_kernels.txt" 2>&1; tail -n 12 "$OUT/gpu_tests_zq_kernels.txt" | cut -c1-300
t "zq + kernels tests"
timeout 100 python3 bench/bench_zq_graphs.py --out "$OUT/zq_graphs.jsonl" > "$OUT/zq_graphs_stdout.txt" 2>&1
tail -n 5 "$OUT/zq_graphs_stdout.txt" | cut -c1-400; t "zq graphs bench"
timeout 100 python3 bench/bench_scale.py --shape opt-6.7b --methods gptq,gptq+lorc --out "$OUT/scale" --budget-s 90 \
    > "$OUT/scale_stdout.txt" 2>&1; tail -n 4 "$OUT/scale_stdout.txt" | cut -c1-600; t "scale"
left=$(( ${CALL_BUDGET_S:-560} - ($(date +%s) - T0) ))
S0=$(date +%s)
timeout $(( left > 30 ? left - 15 : 15 )) python3 -m ptqlab study recipes/methods.yaml --db "$OUT/methods.db" \
    --data-dir .devdata > "$OUT/methods_study_stdout.txt" 2>&1
echo "study rc=$? wall=$(( $(date +%s) - S0 ))s" | tee -a "$OUT/methods_study_stdout.txt"
python3 - "$OUT/methods.db" > "$OUT/methods_runs.jsonl" <<'PY'
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
for row in db.execute("SELECT model, name, status, started_at, finished_at, time_s, mean_ppl, timings_json FROM runs ORDER BY seq"):
    print(json.dumps(dict(zip(("model", "name", "status", "started_at", "finished_at", "time_s", "mean_ppl", "timings"), row))))
PY
t "all"
tar -C "$OUT" -cf "$FINAL/r.tar" . && rm -rf "$OUT"
