#!/usr/bin/env bash
# The first device call of session 30 (one NVIDIA H200), issue 22: the routes to GPTQ's inverse-Hessian Cholesky
# factor; GPTQ's solve by kernel with the flipped-Cholesky route; LoRC's Krylov tolerance x block width; the GPTQ
# scale row after both changes; the 82-run methods recipe on the testbed, timed per run; whether nvcc is here.
set -u
FINAL=$OUT; OUT=$OUT/r
mkdir -p "$OUT"
T0=$(date +%s)
t() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
(which nvcc; nvcc --version | tail -2; ls -d /usr/local/cuda* ; python3 -c "import torch.utils.cpp_extension as c; print('CUDA_HOME', c.CUDA_HOME)") > "$OUT/nvcc_probe.txt" 2>&1
timeout 120 python3 bench/profile_gptq_solve.py --inverse-variants --out "$OUT/inverse_variants.jsonl" > "$OUT/inverse_stdout.txt" 2>&1
tail -n 3 "$OUT/inverse_stdout.txt"; t "inverse variants"
timeout 90 python3 bench/profile_gptq_solve.py --out "$OUT/solve_profile.jsonl" > "$OUT/solve_stdout.txt" 2>&1
tail -n 2 "$OUT/solve_stdout.txt" | cut -c1-300; t "solve profile"
OUT="$OUT" timeout 150 python3 bench/lorc_krylov_tol.py --device cuda --shapes 4096x4096,4096x16384 \
    --tols 1e-8,1e-6,1e-4 --blocks 0,64,128 > "$OUT/krylov_stdout.txt" 2>&1; tail -n 2 "$OUT/krylov_stdout.txt" | cut -c1-300
t "krylov"
timeout 100 python3 bench/bench_scale.py --shape opt-6.7b --methods gptq,gptq+lorc --out "$OUT/scale" --budget-s 90 \
    > "$OUT/scale_stdout.txt" 2>&1; tail -n 3 "$OUT/scale_stdout.txt" | cut -c1-400; t "scale"
S0=$(date +%s)
timeout ${STUDY_S:-280} python3 -m ptqlab study recipes/methods.yaml --db "$OUT/methods.db" --data-dir .devdata \
    > "$OUT/methods_study_stdout.txt" 2>&1; echo "study rc=$? wall=$(( $(date +%s) - S0 ))s" | tee -a "$OUT/methods_study_stdout.txt"
python3 - "$OUT/methods.db" > "$OUT/methods_runs.jsonl" <<'PY'
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
for row in db.execute("SELECT model, name, status, started_at, finished_at, time_s, timings_json FROM runs ORDER BY seq"):
    print(json.dumps(dict(zip(("model", "name", "status", "started_at", "finished_at", "time_s", "timings"), row))))
PY
t "all"
tar -C "$OUT" -cf "$FINAL/r.tar" . && rm -rf "$OUT"
