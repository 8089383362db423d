"""``ptqlab study --executor ray`` on a local Ray cluster (2 CPUs): same rows as the local executor, a worker
killed mid-run, the driver killed and rerun, a run that raises.

One Ray cluster serves every test of this module (starting one costs ~10 s). The tiny model, its data and the
recipes are those of test_study.py.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from ptqlab.cli import main  # noqa: E402
from ptqlab.study.recipe import parse_recipe_text  # noqa: E402
from ptqlab.study.store import Store  # noqa: E402
from test_study import REPO, _rows, _study_args, _wait_mid_run, _write, ci_recipe, env, rtn_recipe  # noqa: E402,F401


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local 2-CPU Ray cluster for the module; yields its address (for drivers in other processes)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _ray_args(env: dict, recipe: Path, db: Path, *extra: str) -> list[str]:
    return [*_study_args(env, recipe, db), "--executor", "ray", *extra]


def _by_hash(db: Path) -> dict[str, dict]:
    return {r["run_hash"]: r for r in _rows(db)}


def _assert_complete(db: Path, planned: set[str]) -> dict[str, dict]:
    """Every planned run done once, one ppl row per (run, dataset), nothing else."""
    rows = _by_hash(db)
    assert rows.keys() == planned
    assert all(r["status"] == "done" for r in rows.values()), {r["name"]: r["status"] for r in rows.values()}
    with Store(db) as store:
        ppl = store.ppl_rows()
    assert len(ppl) == len({(h, d) for h, d, _ in ppl}) == 2 * len(planned)
    return rows


def _failing_ci_recipe(env: dict) -> str:
    # plus RTN W4 g128, which raises on the tiny model (hidden 64 has no group of 128): a run that fails
    return ci_recipe(env).replace("exclude:", "  - {method: rtn, wbits: 4, wgroup: 128}\nexclude:")


def test_ray_rows_match_the_local_executor_and_failures_are_reported(env, cluster, tmp_path, capsys):
    import torch

    recipe = _write(tmp_path / "ci.yaml", _failing_ci_recipe(env))
    local_db, ray_db = tmp_path / "local.db", tmp_path / "ray.db"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray workers run one thread each (one CPU per actor): same float sums
    try:
        assert main(_study_args(env, recipe, local_db)) == 1  # 1: a run failed
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    assert main(_ray_args(env, recipe, ray_db)) == 1  # the same as the local executor
    out = capsys.readouterr()
    assert "ray: 2 workers (cpu" in out.out
    assert "study: 7 done, 1 failed" in out.out and "done 7, running 0, failed 1" in out.err  # summary and the bar
    planned = {r.key for r in parse_recipe_text(_failing_ci_recipe(env), data_dir=env["data"]).runs}
    local, remote = _by_hash(local_db), _by_hash(ray_db)
    assert local.keys() == remote.keys() == planned
    for h, r in remote.items():
        assert r["status"] == local[h]["status"] and r["spec"] == local[h]["spec"] and r["attempts"] == 1
        assert re.fullmatch(r"ray:.+:\d+/a[01]", r["worker"])
        if r["status"] == "failed":
            assert r["spec"]["wgroup"] == 128 and "Traceback" in r["error"]
            assert r["error"].splitlines()[0] == local[h]["error"].splitlines()[0]
            continue
        assert r["config"] == local[h]["config"] and r["record_hash"] == local[h]["record_hash"]
        assert r["ppl"] == local[h]["ppl"], r["name"]  # bit for bit: same code, same thread count
        assert r["bits_per_weight"] == local[h]["bits_per_weight"]
    assert len({r["worker"] for r in remote.values()}) == 2  # both actors worked
    with Store(ray_db) as store:
        ppl = store.ppl_rows()
    assert len(ppl) == len({(h, d) for h, d, _ in ppl}) == 2 * 7

    assert main(["report", str(ray_db)]) == 0
    report = capsys.readouterr().out
    table = report.split("## Failed runs (1)", 1)[1].splitlines()
    line = next(x for x in table if x.startswith("| ") and "W4A16 g128" in x)
    failed = next(r for r in remote.values() if r["status"] == "failed")
    assert failed["error"].splitlines()[0][:40].replace("|", "\\|") in line


def _kill_a_worker_mid_run(db: Path, killed: dict) -> None:
    """Watch the store; SIGKILL the actor process of a run that has just started (after one finished)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with Store(db) as store:
                rows = store.rows()
        except (sqlite3.OperationalError, FileNotFoundError):
            rows = []
        for r in rows:
            if r["status"] == "running" and any(x["status"] == "done" for x in rows) \
                    and time.time() - r["started_at"] < 0.5 and (r["worker"] or "").startswith("ray:"):
                pid = int(r["worker"].rsplit(":", 1)[1].split("/")[0])  # ray:HOST:PID/aN
                os.kill(pid, signal.SIGKILL)
                killed.update(run=r["run_hash"], pid=pid)
                return
        time.sleep(0.05)


def _study_killing_a_worker(env: dict, recipe: Path, db: Path, *extra: str) -> tuple[int, dict]:
    killed: dict = {}
    watcher = threading.Thread(target=_kill_a_worker_mid_run, args=(db, killed), daemon=True)
    watcher.start()
    rc = main(_ray_args(env, recipe, db, *extra))
    watcher.join()
    assert killed, "the study never reached the middle of a run"
    return rc, killed


def test_worker_killed_mid_run_is_retried_elsewhere(env, cluster, tmp_path, monkeypatch, capsys):
    recipe = _write(tmp_path / "r.yaml", rtn_recipe(env))
    planned = {r.key for r in parse_recipe_text(rtn_recipe(env), data_dir=env["data"]).runs}
    db = tmp_path / "kill_worker.db"
    monkeypatch.setenv("PTQLAB_STUDY_DELAY", "1.5")  # each run sleeps inside the actor: a window to kill it
    rc, killed = _study_killing_a_worker(env, recipe, db)
    assert rc == 0
    rows = _assert_complete(db, planned)
    assert rows[killed["run"]]["attempts"] == 2  # died once, done by another worker
    assert f":{killed['pid']}/" not in rows[killed["run"]]["worker"]
    assert all(r["attempts"] == 1 for h, r in rows.items() if h != killed["run"])
    assert "worker died" in capsys.readouterr().out


def test_retries_are_bounded(env, cluster, tmp_path, monkeypatch):
    text = rtn_recipe(env).replace("wbits: [3, 4, 8]", "wbits: 4")  # the FP16 baseline and one RTN run
    recipe = _write(tmp_path / "r.yaml", text)
    db = tmp_path / "bounded.db"
    monkeypatch.setenv("PTQLAB_STUDY_DELAY", "1.5")
    rc, killed = _study_killing_a_worker(env, recipe, db, "--max-attempts", "1", "--workers", "1")
    assert rc == 1
    rows = _by_hash(db)
    assert rows[killed["run"]]["status"] == "failed" and rows[killed["run"]]["attempts"] == 1
    assert "the worker process died 1 times" in rows[killed["run"]]["error"]
    assert all(r["status"] == "done" for h, r in rows.items() if h != killed["run"])


def test_driver_killed_and_rerun_finishes_only_what_was_left(env, cluster, tmp_path):
    recipe = _write(tmp_path / "r.yaml", rtn_recipe(env))
    planned = {r.key for r in parse_recipe_text(rtn_recipe(env), data_dir=env["data"]).runs}
    db = tmp_path / "kill_driver.db"
    code = "import sys; from ptqlab.cli import main; sys.exit(main(sys.argv[1:]))"
    environ = {**os.environ, "PTQLAB_STUDY_DELAY": "1.0", "PYTHONUNBUFFERED": "1"}
    # a driver in its own process on the same cluster, one worker (so "mid-run" is one running row)
    proc = subprocess.Popen([sys.executable, "-c", code,
                             *_ray_args(env, recipe, db, "--workers", "1", "--ray-address", cluster)],
                            env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    _wait_mid_run(proc, db, timeout=120)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stdout.close()
    rows = _by_hash(db)
    done_before = {h: r["finished_at"] for h, r in rows.items() if r["status"] == "done"}
    assert 1 <= len(done_before) < len(planned)
    interrupted = [h for h, r in rows.items() if r["status"] == "running"]
    assert len(interrupted) == 1  # the dead driver's claim

    assert main(_ray_args(env, recipe, db, "--workers", "1")) == 0  # one actor: a start less on 2 cores
    rows = _assert_complete(db, planned)
    for h, finished in done_before.items():  # not redone
        assert rows[h]["finished_at"] == finished and rows[h]["attempts"] == 1
    assert rows[interrupted[0]]["attempts"] == 2
    assert all(r["attempts"] == 1 for h, r in rows.items() if h not in done_before and h != interrupted[0])


def test_ray_options_are_checked(env, tmp_path, capsys):
    recipe = _write(tmp_path / "r.yaml", rtn_recipe(env))
    assert main([*_study_args(env, recipe, tmp_path / "x.db"), "--gpus-per-worker", "0.5"]) == 2
    assert "only apply with --executor ray" in capsys.readouterr().err
    from ptqlab.study.ray_executor import RayOptions, plan_actors

    assert plan_actors({"CPU": 8.0, "GPU": 2.0}, None, RayOptions(gpus_per_worker=0.5)) == \
        (4, {"num_gpus": 0.5, "num_cpus": 1.0}, "cuda")
    assert plan_actors({"CPU": 8.0, "GPU": 2.0}, "cpu", RayOptions(cpus_per_worker=4)) == \
        (2, {"num_gpus": 0, "num_cpus": 4}, "cpu")
    assert plan_actors({"CPU": 2.0}, None, RayOptions(workers=1))[0] == 1
    with pytest.raises(ValueError, match="no GPU"):
        plan_actors({"CPU": 2.0}, "cuda", RayOptions())
    with pytest.raises(ValueError, match="fits no worker"):
        plan_actors({"CPU": 2.0}, None, RayOptions(cpus_per_worker=4))


def test_idle_actors_spread_over_the_models():
    from ptqlab.study.ray_executor import choose_model

    pending = {"a": 5, "b": 3, "c": 0}
    assert choose_model("b", ["a"], pending) == "b"  # its own model while runs of it are left
    assert choose_model(None, [None, None], pending) == "a"  # the most pending runs first
    assert choose_model(None, ["a"], pending) == "b"  # a model no other actor holds
    assert choose_model("c", ["a", "b"], pending) == "a"  # its model is done: least held, then most pending
    assert choose_model("c", ["a", "a", "b"], pending) == "b"
    assert choose_model(None, [], {}) is None
