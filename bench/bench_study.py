"""Study executors: multi-GPU scaling of ``--workers N`` and the per-run overhead of ``--executor ray``.

scaling (on a GPU host): the same recipe into a fresh database once per worker count, each as its own
``ptqlab study`` process; wall time of the command and the steady-state throughput (runs finished per second
between the first and the last finished run, which leaves out process start and the first model load)::

    python bench/bench_study.py scaling --recipe recipes/methods.yaml --workers 2,1 --data-dir DATA \\
        --set max_eval_windows=8 --set nsamples=32 --set zq_steps=10 --out results.jsonl

ray-overhead (CPU): a tiny random OPT, N cheap RTN runs through the local executor (one worker, one thread)
and through Ray (one actor of one CPU, local cluster started beforehand); per-run interval in steady state
(finished_at of run k+1 minus run k) against the run's own ``time_s``::

    python bench/bench_study.py ray-overhead --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ptqlab.study.store import Store  # noqa: E402


def summarize(db: Path, started: float | None = None) -> dict:
    """Counts and timings of a finished study database (``started``: Unix time the command began)."""
    with Store(db) as store:
        rows = store.rows()
    done = sorted((r for r in rows if r["status"] == "done"), key=lambda r: r["finished_at"])
    finished = [r["finished_at"] for r in done]
    steps = [b - a for a, b in zip(finished, finished[1:])]
    span = finished[-1] - finished[0] if len(finished) > 1 else float("nan")
    return {
        "runs": len(rows), "done": len(done), "failed": sum(r["status"] == "failed" for r in rows),
        "workers_seen": len({r["worker"] for r in done}),
        "steady_runs_per_s": (len(done) - 1) / span if len(done) > 1 else None,
        "median_interval_s": statistics.median(steps) if steps else None,
        "mean_run_time_s": statistics.fmean(r["time_s"] for r in done) if done else None,
        "median_run_time_s": statistics.median(r["time_s"] for r in done) if done else None,
        "first_result_s": finished[0] - started if started and finished else None,
        "device": (done[0]["versions"] or {}).get("device") if done else None,
        "versions": done[0]["versions"] if done else None,
    }


def scaling(a: argparse.Namespace) -> list[dict]:
    out = []
    for n in [int(x) for x in a.workers.split(",")]:
        db = Path(a.workdir) / f"scaling_w{n}.db"
        db.unlink(missing_ok=True)
        cmd = [sys.executable, "-c", "import sys; from ptqlab.cli import main; sys.exit(main(sys.argv[1:]))",
               "study", a.recipe, "--db", str(db), "--workers", str(n)]
        if a.data_dir:
            cmd += ["--data-dir", a.data_dir]
        for s in a.set:
            cmd += ["--set", s]
        t0, started = time.perf_counter(), time.time()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired as err:  # keep what finished; the record says it was cut
            proc = subprocess.CompletedProcess(cmd, 124, str(err.stdout or ""), str(err.stderr or ""))
        wall = time.perf_counter() - t0
        tail = (proc.stdout + proc.stderr)[-1500:]
        rec = {"bench": "study_scaling", "executor": "local", "workers": n, "recipe": a.recipe, "set": a.set,
               "rc": proc.returncode, "wall_s": wall, **summarize(db, started)}
        rec["runs_per_s"] = rec["done"] / wall
        print(json.dumps({k: v for k, v in rec.items() if k != "versions"}), flush=True)
        if proc.returncode != 0:
            print(tail, file=sys.stderr, flush=True)
        out.append(rec)
    base = next((r for r in out if r["workers"] == 1), None)
    if base:
        for r in out:
            r["wall_ratio_vs_1"] = base["wall_s"] / r["wall_s"]
            r["steady_ratio_vs_1"] = (r["steady_runs_per_s"] / base["steady_runs_per_s"]
                                      if r["steady_runs_per_s"] and base["steady_runs_per_s"] else None)
            print(f"workers {r['workers']}: {r['done']} runs in {r['wall_s']:.1f} s, wall ratio vs 1 worker "
                  f"{r['wall_ratio_vs_1']:.2f}, steady-state ratio {r['steady_ratio_vs_1'] or float('nan'):.2f} "
                  f"({r['device']})", flush=True)
    return out


def ray_overhead(a: argparse.Namespace) -> list[dict]:
    import logging

    import ray
    import torch

    from ptqlab.cli import main
    from ptqlab.tiny import make_tiny

    root = Path(a.workdir)
    data = root / "data"
    words = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
    text = lambda n, k: " ".join(words[(i * 7 + k) % len(words)] for i in range(n))  # noqa: E731
    (data / "wikitext2").mkdir(parents=True, exist_ok=True)
    (data / "ptb").mkdir(exist_ok=True)
    (data / "wikitext2" / "wiki.test.raw").write_text("\n".join(text(50, k) for k in range(40)), encoding="utf-8")
    (data / "ptb" / "ptb.test.txt").write_text("\n".join(text(20, k) for k in range(100)), encoding="utf-8")
    model = make_tiny("opt", root / "tiny-opt", data / "ptb" / "ptb.test.txt", hidden=64, layers=2, heads=4)
    grid = f"method=rtn wbits=2,3,4,5,6,7,8 wsym=true,false abits=16,8"  # 28 runs + the FP16 baseline
    common = ["study", "--grid", grid, "--model", str(model), "--device", "cpu", "--data-dir", str(data),
              "--set", "seqlen=32", "--set", "max_eval_windows=1", "--set", "eval=wikitext2"]
    torch.set_num_threads(1)  # the Ray actor gets one CPU (one thread): same work per run
    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    out = []
    try:
        for rep, executor in enumerate(("local", "ray", "ray", "local")):
            db = root / f"overhead_{executor}_{rep}.db"
            db.unlink(missing_ok=True)
            t0, started = time.perf_counter(), time.time()
            rc = main([*common, "--db", str(db), *(["--executor", "ray"] if executor == "ray" else [])])
            wall = time.perf_counter() - t0
            rec = {"bench": "study_ray_overhead", "executor": executor, "workers": 1, "rc": rc, "wall_s": wall,
                   **summarize(db, started), "cpu_count": os.cpu_count()}
            # what a run costs besides its own compute: claim, send, store, bookkeeping, printing
            rec["overhead_per_run_s"] = rec["median_interval_s"] - rec["median_run_time_s"]
            out.append(rec)
    finally:
        ray.shutdown()
    for r in out:
        print(json.dumps({k: v for k, v in r.items() if k != "versions"}), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("scaling", "ray-overhead"))
    p.add_argument("--recipe", default="recipes/methods.yaml")
    p.add_argument("--workers", default="2,1", help="scaling: worker counts, in the order to run them")
    p.add_argument("--data-dir", default=os.environ.get("PTQLAB_DATA"))
    p.add_argument("--set", action="append", default=[], help="scaling: ptqlab study --set KEY=VALUE")
    p.add_argument("--timeout", type=float, default=None, help="scaling: seconds allowed per study")
    p.add_argument("--workdir", default=None, help="databases go here (default: a temporary folder)")
    p.add_argument("--out", default=None, help="append the records (JSON lines) to this file")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        a.workdir = a.workdir or tmp
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
        records = scaling(a) if a.mode == "scaling" else ray_overhead(a)
    if a.out:
        with open(a.out, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
