"""The study: recipes, the results store, resume after kills, parallel workers, reports, plots, sensitivity.

Everything runs offline on a tiny random OPT (hidden 64, 2 blocks) with
synthetic evaluation text laid out like shared/data.
"""

from __future__ import annotations

import csv
import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ptqlab.cli import main
from ptqlab.config import config_hash
from ptqlab.study.recipe import (
    RecipeError,
    layer_target,
    method_label,
    parse_grid,
    parse_recipe_text,
    precision_label,
    run_key,
)
from ptqlab.study.report import classify, load_results, parse_thresholds, render_csv
from ptqlab.study.store import Store

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more can out up about who "
         "them some into could time than then its only other new market price share year company").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """A data dir laid out like shared/data, a calibration text, and a tiny OPT model."""
    from ptqlab.tiny import make_tiny

    root = tmp_path_factory.mktemp("study_env")
    rng = random.Random(0)
    data = root / "data"
    (data / "wikitext2").mkdir(parents=True)
    (data / "ptb").mkdir()
    (data / "wikitext2" / "wiki.test.raw").write_text(
        "".join(" = Heading = \n" if i % 10 == 0 else _text(rng, 50) + "\n" for i in range(40)), encoding="utf-8")
    (data / "ptb" / "ptb.test.txt").write_text("".join(_text(rng, 20) + "\n" for _ in range(100)), encoding="utf-8")
    calib = root / "calib.txt"
    calib.write_text("\n".join(_text(rng, 60) for _ in range(40)), encoding="utf-8")
    model = make_tiny("opt", root / "tiny-opt", calib, hidden=64, layers=2, heads=4)
    return {"root": root, "data": str(data), "calib": str(calib), "model": str(model)}


def _settings(env: dict) -> str:
    return (f"  seqlen: 64\n  max_eval_windows: 2\n  eval: [wikitext2, ptb]\n  calib: {env['calib']}\n"
            f"  nsamples: 4\n")


def ci_recipe(env: dict) -> str:
    return f"""
name: ci
models: [{env['model']}]
settings:
{_settings(env)}axes:
  - method: [rtn, gptq]
    wbits: [4, 8]
  - method: rtn
    wbits: 4
    lorc_rank: [2, 4]
  - wbits: 16
    abits: 8
exclude:
  - {{method: gptq, wbits: 8}}
"""


def rtn_recipe(env: dict) -> str:
    return f"""
models: [{env['model']}]
settings:
{_settings(env)}axes:
  method: rtn
  wbits: [3, 4, 8]
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _study_args(env: dict, recipe: Path, db: Path, *extra: str) -> list[str]:
    return ["study", str(recipe), "--db", str(db), "--device", "cpu", "--data-dir", env["data"], *extra]


def _rows(db: Path) -> list[dict]:
    with Store(db) as store:
        return store.rows()


@pytest.fixture(scope="module")
def study_db(env) -> Path:
    """The CI recipe run once, then a module-granularity sensitivity sweep into the same database."""
    root = env["root"]
    recipe = _write(root / "ci.yaml", ci_recipe(env))
    db = root / "ci.db"
    assert main(_study_args(env, recipe, db)) == 0
    assert main(["sensitivity", "--model", env["model"], "--wbits", "4", "--granularity", "module", "--db", str(db),
                 "--seqlen", "64", "--max-eval-windows", "2", "--device", "cpu", "--data-dir", env["data"]]) == 0
    return db


# ---------------------------------------------------------------- recipe -> runs -> rows


def test_recipe_runs_and_db_rows(env, study_db, capsys):
    plan = parse_recipe_text(ci_recipe(env), data_dir=env["data"])
    # rtn W4, rtn W8, gptq W4, rtn W4 LoRC2/4, rtn W16A8, plus the FP16 baseline added automatically (first)
    assert len(plan.runs) == 7
    assert plan.runs[0].spec["method"] == "fp16"
    rows = [r for r in _rows(study_db) if r["kind"] == "quant"]
    assert {r["run_hash"] for r in rows} == {r.key for r in plan.runs}
    ppl_rows = Store(study_db).ppl_rows()
    for r in rows:
        assert r["status"] == "done" and r["attempts"] == 1 and r["worker"]
        assert r["run_hash"] == run_key(r["spec"], env["data"]) != config_hash(r["spec"])  # data contents keyed too
        assert r["record_hash"] == config_hash(r["config"])  # the record's own hash, stored alongside
        assert r["config"]["seqlen"] == 64 and r["config"]["max_eval_windows"] == 2
        assert set(r["ppl"]) == {"wikitext2", "ptb"}
        assert r["mean_ppl"] == pytest.approx(sum(r["ppl"].values()) / 2)
        assert sorted((d, v) for h, d, v in ppl_rows if h == r["run_hash"]) == sorted(r["ppl"].items())
        assert r["started_at"] <= r["finished_at"]
        assert {"load", "quantize", "eval", "total"} <= set(r["timings"])
        assert {"ptqlab", "torch", "transformers"} <= set(r["versions"])
        expect_bits = 16 if r["spec"]["wbits"] == 16 else r["spec"]["wbits"]
        assert expect_bits <= r["bits_per_weight"] < expect_bits + (2 if r["spec"].get("lorc_rank") else 0.5)
        if r["spec"]["method"] == "rtn":
            assert "calib" not in r["spec"]  # normalised away: RTN does not calibrate
    gptq = next(r for r in rows if r["spec"]["method"] == "gptq")
    assert gptq["spec"]["calib"] == env["calib"] and gptq["spec"]["nsamples"] == 4
    # one baseline shared by the study and the sensitivity sweep (same evaluation settings)
    assert sum(1 for r in _rows(study_db) if r["spec"]["method"] == "fp16") == 1

    # resume: the same command again runs nothing
    before = {r["run_hash"]: (r["finished_at"], r["attempts"]) for r in _rows(study_db)}
    capsys.readouterr()
    assert main(_study_args(env, env["root"] / "ci.yaml", study_db)) == 0
    out = capsys.readouterr().out
    assert "0 new" in out and "7 already done" in out and "start" not in out
    assert {r["run_hash"]: (r["finished_at"], r["attempts"]) for r in _rows(study_db)} == before


def test_force_recomputes_only_the_plan(env, tmp_path):
    recipe = _write(tmp_path / "r.yaml", rtn_recipe(env))
    db = tmp_path / "force.db"
    assert main(_study_args(env, recipe, db, "--set", "max_eval_windows=1")) == 0
    before = {r["run_hash"]: r for r in _rows(db)}
    grid = ["study", "--grid", "method=rtn wbits=4", "--model", env["model"], "--db", str(db), "--device", "cpu",
            "--data-dir", env["data"], "--set", "seqlen=64 max_eval_windows=1 eval=wikitext2,ptb", "--force"]
    assert main(grid) == 0
    after = {r["run_hash"]: r for r in _rows(db)}
    assert after.keys() == before.keys()
    redone = {h for h in after if after[h]["attempts"] == 2}
    assert {after[h]["name"].split(" ", 1)[1] for h in redone} == {"fp16 W16A16", "rtn W4A16"}
    for h in redone:
        assert after[h]["finished_at"] > before[h]["finished_at"]
        assert after[h]["ppl"] == pytest.approx(before[h]["ppl"])  # deterministic
    for h in after.keys() - redone:
        assert after[h]["finished_at"] == before[h]["finished_at"] and after[h]["attempts"] == 1
    assert len(Store(db).ppl_rows()) == 2 * len(after)


# ---------------------------------------------------------------- planning rules


def test_nonsense_runs_are_dropped_or_merged(env):
    text = """
models: [m]
axes:
  - method: [fp16, rtn, gptq]
    wbits: [4, 16]
    abits: [16, 8]
    lorc_rank: [0, 8]
"""
    plan = parse_recipe_text(text)
    names = [r.name() for r in plan.runs]
    assert names.count("m fp16 W16A16") == 1  # fp16 with wbits 4, rtn W16A16: one baseline
    assert names.count("m rtn W16A8") == 1  # activation-only, however spelled
    assert not any("gptq" in n and "W16" in n for n in names)
    assert not any("LoRC" in n and "W16" in n for n in names)
    assert len(names) == len(set(names)) == 1 + 1 + 2 * 2 * 2  # baseline, W16A8, {rtn,gptq}x{A16,A8}x{LoRC 0,8}
    notes = " ".join(plan.note_lines())
    assert "gptq with wbits 16" in notes and "LoRC with wbits 16" in notes and "fp16" in notes
    # key order and irrelevant options do not change a run's key
    a = parse_recipe_text("models: [m]\naxes: {wbits: [4], method: rtn}\nsettings: {nsamples: 7, calib: ptb}\n")
    b = parse_recipe_text("models: [m]\naxes: {method: [rtn], wbits: 4}\n")
    assert [r.key for r in a.runs] == [r.key for r in b.runs]


def test_grid_shorthand(env):
    plan = parse_grid("method=rtn,gptq wbits=3,4,8 wgroup=0,128", ["m"])
    assert len(plan.runs) == 1 + 2 * 3 * 2
    labels = {(method_label(r.spec), precision_label(r.spec)) for r in plan.runs}
    assert ("gptq", "W3A16 g128") in labels and ("fp16", "W16A16") in labels
    same = parse_recipe_text("models: [m]\naxes: {method: [rtn, gptq], wbits: [3, 4, 8], wgroup: [0, 128]}\n")
    assert [r.key for r in plan.runs] == [r.key for r in same.runs]
    with pytest.raises(RecipeError, match="wbits"):
        parse_grid("method=rtn wbits=9", ["m"])
    with pytest.raises(RecipeError, match="wbit.*did you mean 'wbits'"):
        parse_grid("wbit=4", ["m"])


BAD_RECIPES = [
    # (recipe text, key expected in the message, line expected)
    ("models: [m]\naxes:\n  method: [rtn]\n  wbits: [4, 9]\n", "wbits", 4),
    ("models: [m]\naxes:\n  wbits:\n    - 4\n    - 9\n", "wbits", 5),
    ("models: [m]\naxes:\n  wbits: [4]\n  method: [rtn, foo]\n", "method", 4),
    ("models: [m]\naxes:\n  wbits: [4]\n  wbitz: [4]\n", "wbitz", 4),
    ("models: [m]\nsettings:\n  seqlen: 64\n  nsamples: many\naxes: {wbits: [4]}\n", "nsamples", 4),
    ("models: [m]\naxes: {wbits: [4]}\nsetings: {seqlen: 64}\n", "setings", 3),
    ("models: [m]\naxes: {wbits: [4]}\nexclude:\n  - {method: rtn}\n  - {wgroup: -5}\n", "wgroup", 5),
    ("models: [m]\naxes: {wbits: [4]}\nexclude:\n  - {method: rtn, colour: red}\n", "colour", 4),
    ("models: [m]\nsettings:\n  eval: [wikitext2, imagenet]\naxes: {wbits: [4]}\n", "eval", 3),
    ("models: [m]\nsettings:\n  wsym: maybe\naxes: {wbits: [4]}\n", "wsym", 3),
    ("models: [m]\nsettings: {wbits: 4}\naxes:\n  method: [rtn]\n  wbits: [8]\n", "wbits", 5),
    ("models: [m]\naxes:\n  wbits: [4\n  method: rtn\n", "YAML", None),
]


@pytest.mark.parametrize("text,key,line", BAD_RECIPES)
def test_malformed_recipe_names_key_and_line(text, key, line):
    with pytest.raises(RecipeError) as info:
        parse_recipe_text(text, "bad.yaml")
    message = str(info.value)
    assert key in message and "bad.yaml" in message
    if line is not None:
        assert f"line {line}:" in message, message
    else:
        assert "line " in message


def test_malformed_recipe_through_the_cli(tmp_path, capsys):
    recipe = _write(tmp_path / "bad.yaml", "models: [m]\naxes:\n  method: [rtn, gptq]\n  wbits: [4, 9]\n")
    assert main(["study", str(recipe), "--db", str(tmp_path / "x.db")]) == 2
    err = capsys.readouterr().err
    assert "wbits" in err and "line 4" in err and "9" in err
    assert not (tmp_path / "x.db").exists()  # nothing was queued


def test_missing_model_is_not_a_failed_run(env, tmp_path, capsys):
    text = rtn_recipe(env).replace(env["model"], str(tmp_path / "no-such-model"))
    recipe = _write(tmp_path / "r.yaml", text)
    db = tmp_path / "missing.db"
    assert main(_study_args(env, recipe, db)) == 2
    assert "could not load model" in capsys.readouterr().err
    rows = _rows(db)
    assert rows and all(r["status"] == "pending" for r in rows)  # retried once the model is there


# ---------------------------------------------------------------- kills and resume


def _spawn_study(env: dict, recipe: Path, db: Path, delay: float) -> subprocess.Popen:
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from ptqlab.cli import main; sys.exit(main(sys.argv[1:]))")
    environ = {**os.environ, "PTQLAB_STUDY_DELAY": str(delay), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *_study_args(env, recipe, db)], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)


def _wait_mid_run(proc: subprocess.Popen, db: Path, timeout: float = 180.0) -> None:
    """Until at least one run is done and another has just started (its 1 s test delay is still running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        if db.exists():
            try:
                with Store(db) as store:
                    rows = store.rows()
            except sqlite3.OperationalError:
                rows = []
            running = [r for r in rows if r["status"] == "running"]
            if any(r["status"] == "done" for r in rows) and len(running) == 1 \
                    and time.time() - running[0]["started_at"] < 0.4:
                return
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the study never reached the middle of a run")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_study_resumes_without_redoing_or_duplicating(env, tmp_path, sig, capsys):
    recipe = _write(tmp_path / "r.yaml", rtn_recipe(env))
    planned = {r.key for r in parse_recipe_text(rtn_recipe(env), data_dir=env["data"]).runs}
    db = tmp_path / "kill.db"
    proc = _spawn_study(env, recipe, db, delay=1.0)
    _wait_mid_run(proc, db)
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    output = proc.stdout.read().decode()
    rows = {r["run_hash"]: r for r in _rows(db)}
    assert rows.keys() == planned  # everything was queued up front
    done_before = {h: r["finished_at"] for h, r in rows.items() if r["status"] == "done"}
    assert 1 <= len(done_before) < len(planned)
    interrupted = [h for h, r in rows.items() if r["attempts"] == 1 and r["status"] != "done"]
    assert len(interrupted) == 1
    if sig == signal.SIGINT:
        assert rc == 130, output
        assert "goes back to the queue" in output
        assert rows[interrupted[0]]["status"] == "pending"  # handed back on Ctrl-C
    else:
        assert rc == -signal.SIGKILL
        assert rows[interrupted[0]]["status"] == "running"  # a dead claim, reclaimed on restart

    capsys.readouterr()
    assert main(_study_args(env, recipe, db)) == 0
    out = capsys.readouterr().out
    rows = {r["run_hash"]: r for r in _rows(db)}
    assert rows.keys() == planned and all(r["status"] == "done" for r in rows.values())
    for h, finished in done_before.items():  # not redone
        assert rows[h]["finished_at"] == finished and rows[h]["attempts"] == 1
    assert rows[interrupted[0]]["attempts"] == 2
    assert all(r["attempts"] == 1 for h, r in rows.items() if h not in done_before and h != interrupted[0])
    assert out.count(" start ") == len(planned) - len(done_before)
    ppl = Store(db).ppl_rows()
    assert len(ppl) == len({(h, d) for h, d, _ in ppl}) == 2 * len(planned)


# ---------------------------------------------------------------- parallel workers


def test_two_worker_processes_share_one_db(env, tmp_path, monkeypatch, capsys):
    recipe = _write(tmp_path / "r.yaml", rtn_recipe(env))
    db = tmp_path / "par.db"
    monkeypatch.setenv("PTQLAB_STUDY_DELAY", "0.3")
    assert main(_study_args(env, recipe, db, "--workers", "2")) == 0
    rows = _rows(db)
    assert len(rows) == len(parse_recipe_text(rtn_recipe(env)).runs)
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in rows)
    assert all(r["worker"].endswith(("/w0", "/w1")) for r in rows)
    ppl = Store(db).ppl_rows()
    assert len(ppl) == len({(h, d) for h, d, _ in ppl}) == 2 * len(rows)


class _Fake:
    def __init__(self, i: int) -> None:
        self.spec = {"kind": "quant", "model": "m", "i": i}
        self.key = f"run{i:03d}"
        self.kind, self.model = "quant", "m"

    def name(self) -> str:
        return self.key


def _record(ppl: dict) -> dict:
    return {"config": {"x": 1}, "config_hash": "h", "ppl": ppl, "bits_per_weight": 4.0, "time_s": 0.0,
            "timings": {}, "versions": {}}


def test_concurrent_claims_are_atomic(tmp_path):
    db = tmp_path / "claims.db"
    with Store(db) as store:
        store.add_runs([_Fake(i) for i in range(60)])
    claimed: dict[int, list[str]] = {}
    errors = []

    def worker(k: int) -> None:
        try:
            with Store(db) as store:
                mine = claimed.setdefault(k, [])
                while (claim := store.claim(f"t{k}")) is not None:
                    mine.append(claim.run_hash)
                    assert store.finish(claim, _record({"a": 1.0}))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    everything = [h for runs in claimed.values() for h in runs]
    assert len(everything) == len(set(everything)) == 60


def test_stale_claims_are_taken_over_and_the_loser_discarded(tmp_path):
    db = tmp_path / "stale.db"
    with Store(db) as a, Store(db) as b:
        a.add_runs([_Fake(0)])
        first = a.claim("A", pid=os.getpid())
        assert b.claim("B", stale_after=60) is None  # fresh claim: not taken
        a._conn.execute("UPDATE runs SET heartbeat_at = heartbeat_at - 120")
        second = b.claim("B", stale_after=60)
        assert second is not None and second.run_hash == first.run_hash and second.attempts == 2
        assert b.finish(second, _record({"a": 2.0}))
        assert not a.finish(first, _record({"a": 3.0}))  # its claim was taken over
        assert a.ppl_rows() == [("run000", "a", 2.0)]


# ---------------------------------------------------------------- reports


def test_class_thresholds_exact():
    assert classify(0.1) == 1
    assert classify(0.5) == 2
    assert classify(0.5000001) == 3
    assert classify(0.1000001) == 2
    assert classify(0.0) == 1 and classify(-3.0) == 1
    assert classify(0.4 - 0.3) == 1  # 0.10000000000000003: the subtraction's rounding is not a class change
    assert classify(1.0, (0.2, 1.0)) == 2 and classify(1.01, (0.2, 1.0)) == 3 and classify(0.2, (0.2, 1.0)) == 1
    assert parse_thresholds("0.1,0.5") == (0.1, 0.5)
    with pytest.raises(ValueError):
        parse_thresholds("0.5,0.1")


def test_class_thresholds_through_the_store(tmp_path):
    db = tmp_path / "classes.db"
    base_spec = {"kind": "quant", "model": "m", "method": "fp16", "wbits": 16, "abits": 16, "seqlen": 64,
                 "eval": ["wikitext2"], "max_eval_windows": None, "dtype": "auto"}
    runs = {"base": (base_spec, 10.0)}
    for wbits, ppl in ((8, 10.1), (4, 10.5), (3, 10.5000001)):
        runs[wbits] = ({**base_spec, "method": "rtn", "wbits": wbits}, ppl)

    class P:
        def __init__(self, spec):
            self.spec, self.key, self.kind, self.model = spec, run_key(spec), "quant", "m"

        def name(self):
            return str(self.spec["wbits"])

    with Store(db) as store:
        store.add_runs([P(spec) for spec, _ in runs.values()])
        while (claim := store.claim("w")) is not None:
            ppl = next(p for spec, p in runs.values() if run_key(spec) == claim.run_hash)  # noqa: B023
            store.finish(claim, _record({"wikitext2": ppl}))
    table = list(csv.DictReader(io.StringIO(render_csv(load_results(str(db))))))
    classes = {int(r["wbits"]): int(r["class"]) for r in table}
    assert classes == {16: 1, 8: 1, 4: 2, 3: 3}
    md = main_output(["report", str(db)])
    assert "10.100 (+0.100, C1)" in md and "10.500 (+0.500, C2)" in md and "10.500 (+0.500, C3)" in md
    md = main_output(["report", str(db), "--thresholds", "0.05,0.1"])
    assert "10.100 (+0.100, C2)" in md


def main_output(argv: list[str]) -> str:
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()


def _markdown_tables(text: str) -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    """Title -> (header, {row label: cells}) of every markdown table."""
    tables, title, lines = {}, None, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("### "):
            title = line[4:]
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in line.strip().strip("|").split("|")]
            body = {}
            for row in lines[i + 2:]:
                if not row.startswith("| "):
                    break
                cells = [c.strip() for c in row.strip().strip("|").split("|")]
                body[cells[0]] = cells[1:]
            tables[title] = (header[1:], body)
    return tables


def _expected_cells(db: Path) -> dict[tuple[str, str], str]:
    with Store(db) as store:
        rows = [r for r in store.rows(kind="quant")]
    base = next(r for r in rows if r["spec"]["method"] == "fp16")
    out = {}
    for r in rows:
        if r is base:
            continue
        delta = r["mean_ppl"] - base["mean_ppl"]
        out[(method_label(r["spec"]), precision_label(r["spec"]))] = \
            f"{r['mean_ppl']:.3f} ({round(delta, 3) + 0.0:+.3f}, C{classify(delta)})"
    return out


def test_report_tables_match_db_rows(env, study_db):
    expected = _expected_cells(study_db)
    model = env["model"]

    tables = _markdown_tables(main_output(["report", str(study_db), "--per-dataset"]))
    header, body = tables[f"{model}: mean PPL over wikitext2, ptb"]
    seen = 0
    for (row, col), cell in expected.items():
        assert body[row][header.index(col)] == cell
        seen += 1
    assert seen == 6 and sum(1 for cells in body.values() for c in cells if c) == 6
    assert f"{model}: wikitext2 PPL" in tables and f"{model}: ptb PPL" in tables
    rec_header, rec = tables[f"{model}: recommendations"]
    assert rec_header[:2] == ["method", "precision"]
    sens_header, sens = tables[f"{model}: sensitivity per module (RTN on that part only), mean PPL"]
    assert sens_header == ["W4A16"] and set(sens) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                      "self_attn.out_proj", "fc1", "fc2"}

    latex = main_output(["report", str(study_db), "--format", "latex"])
    assert latex.count(r"\begin{tabular}") == latex.count(r"\end{tabular}") >= 3
    lines = latex.splitlines()
    start = next(i for i, l in enumerate(lines) if "mean PPL over wikitext2, ptb" in l)
    lheader = [c.strip() for c in lines[start + 3].removesuffix(r"\\").split("&")]
    lbody = {}
    for l in lines[start + 5:]:
        if l.startswith(r"\bottomrule"):
            break
        cells = [c.strip() for c in l.removesuffix(r"\\").split("&")]
        lbody[cells[0]] = cells
    for (row, col), cell in expected.items():
        assert lbody[row.replace("_", r"\_")][lheader.index(col)] == cell

    table = list(csv.DictReader(io.StringIO(main_output(["report", str(study_db), "--format", "csv",
                                                         "--per-dataset"]))))
    db_rows = {r["run_hash"]: r for r in _rows(study_db)}
    assert {r["run_hash"] for r in table} == set(db_rows) and len(table) == len(db_rows)
    for line in table:
        r = db_rows[line["run_hash"]]
        assert line["status"] == r["status"] == "done"
        assert float(line["mean_ppl"]) == r["mean_ppl"]
        assert float(line["ppl_wikitext2"]) == r["ppl"]["wikitext2"] and float(line["ppl_ptb"]) == r["ppl"]["ptb"]
        assert float(line["bits_per_weight"]) == r["bits_per_weight"]
        if r["kind"] == "quant" and r["spec"]["method"] != "fp16":
            label = (method_label(r["spec"]), precision_label(r["spec"]))
            assert line["row"] == label[0] and line["precision"] == label[1]
            assert expected[label].startswith(f"{float(line['mean_ppl']):.3f}")
            assert expected[label].endswith(f"C{line['class']})")


def test_plots_are_valid_png_and_svg(study_db, tmp_path):
    from matplotlib import image

    out = tmp_path / "plots"
    main_output(["report", str(study_db), "--plots", str(out)])
    files = sorted(p.name for p in out.iterdir())
    stems = {"tiny-opt_ppl_vs_bits", "tiny-opt_ppl_vs_lorc_rank", "tiny-opt_sensitivity_module"}
    assert set(files) == {f"{s}.{ext}" for s in stems for ext in ("png", "svg")}
    for stem in stems:
        png = out / f"{stem}.png"
        assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = image.imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        svg = out / f"{stem}.svg"
        assert svg.stat().st_size > 0 and ET.parse(svg).getroot().tag.endswith("svg")


# ---------------------------------------------------------------- sensitivity


def test_sensitivity_rows(env, study_db):
    rows = [r for r in _rows(study_db) if r["kind"] == "sensitivity"]
    assert len(rows) == 6 and all(r["status"] == "done" for r in rows)
    for r in rows:
        module = layer_target(r["spec"])[1]
        assert [entry["layer"] for entry in r["layers"]] == [f"blocks.0.{module}", f"blocks.1.{module}"]
        assert 4 < r["bits_per_weight"] < 16  # only that module type is quantized
        assert r["record_hash"] == config_hash(r["config"])


def test_sensitivity_block_and_layer_selection(env):
    from ptqlab.experiment import ModelSession
    from ptqlab.study.runner import execute
    from ptqlab.study.sensitivity import sensitivity_spec, targets

    assert targets(env["model"], "block") == ["0", "1"]
    assert len(targets(env["model"], "layer")) == 12
    session = ModelSession(env["model"], "cpu", "auto", env["data"], progress=False)
    common = dict(wbits=3, seqlen=64, eval=["ptb"], max_eval_windows=1)
    block = execute(sensitivity_spec(env["model"], "block", "1", **common), session)
    assert [e["layer"] for e in block["layers"]] == [f"blocks.1.{n}" for n in
                                                   ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                                    "self_attn.out_proj", "fc1", "fc2")]
    layer = execute(sensitivity_spec(env["model"], "layer", "0:fc2", abits=8, **common), session)
    assert [e["layer"] for e in layer["layers"]] == ["blocks.0.fc2"]
    assert layer["config"]["layers"] == "layer:0:fc2" and layer["config"]["method"] == "rtn"
    pristine = session.fresh_model()  # the next run gets the original modules back
    assert pristine.model.decoder.layers[0].fc2.__class__.__name__ == "Linear"
    with pytest.raises(RecipeError):
        sensitivity_spec(env["model"], "block", "0", wbits=16, abits=16)


def test_recipe_save_writes_the_chosen_cells_models(env, tmp_path):
    """``save:`` rules pick the cells whose quantized model the study writes; the folder reloads to the same PPL."""
    from ptqlab.evaluate import perplexity
    from ptqlab.export import load_quantized

    recipe = _write(tmp_path / "save.yaml", rtn_recipe(env) + "save:\n  - {wbits: 4}\n")
    plan = parse_recipe_text(recipe.read_text(), data_dir=env["data"])
    assert [r.spec.get("save", False) for r in plan.runs] == [False, False, True, False]  # baseline, W3, W4, W8
    db = tmp_path / "save.db"
    assert main(_study_args(env, recipe, db)) == 0
    folders = list((tmp_path / "save-models").iterdir())
    assert len(folders) == 1 and "W4A16" in folders[0].name
    model, tokenizer, entry = load_quantized(folders[0])
    row = next(r for r in _rows(db) if r["spec"].get("save"))
    assert entry["record"]["ppl"] == row["ppl"]
    from ptqlab.data import eval_tokens, load_text

    tokens = eval_tokens(tokenizer, load_text("ptb", "eval", env["data"]), 64)
    assert perplexity(model, tokens, 64, max_windows=2, progress=False) == pytest.approx(row["ppl"]["ptb"], rel=1e-3)


def test_run_key_follows_a_rebuilt_local_model(tmp_path, monkeypatch):
    """A testbed member rebuilt into the cache (retrained: new weights) gets new run keys, so a resumed study
    does not hand it the rows of the model it replaced; a hub id and an unbuilt member are keyed by name."""
    from ptqlab.study.recipe import model_fingerprint, run_key

    monkeypatch.setenv("PTQLAB_TESTBED_CACHE", str(tmp_path))
    spec = {"model": "testbed-opt-25m", "method": "rtn", "wbits": 4}
    assert model_fingerprint("testbed-opt-25m") == "name:testbed-opt-25m"
    unbuilt = run_key(spec)
    folder = tmp_path / "opt-25m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"first training")
    first = run_key(spec)
    assert first == run_key(spec) != unbuilt
    (folder / "model.safetensors").write_bytes(b"second training")
    assert run_key(spec) != first
    assert model_fingerprint("facebook/opt-125m") == "name:facebook/opt-125m"


def test_spawned_workers_share_the_host_cores(monkeypatch):
    """Every spawned worker gets a share of the cores, GPU workers too (each would otherwise use them all)."""
    import ptqlab.study.runner as runner

    monkeypatch.setattr(runner.os, "cpu_count", lambda: 16)
    opts = runner.spawned_worker_options(runner.WorkerOptions(db="s.db"), ["cuda:0", "cuda:1", "cuda:0", "cuda:1"])
    assert [(o.device, o.slot, o.threads) for o in opts] == [
        ("cuda:0", 0, 4), ("cuda:1", 1, 4), ("cuda:0", 2, 4), ("cuda:1", 3, 4)]
    assert {o.threads for o in runner.spawned_worker_options(runner.WorkerOptions(db="s.db"), ["cpu"] * 3)} == {5}
    assert runner.spawned_worker_options(runner.WorkerOptions(db="s.db", threads=2), ["cuda:0"] * 2)[0].threads == 2


# ---------------------------------------------------------------- nothing is queued for a study that cannot start


def _snapshot(db: Path) -> list[tuple]:
    with Store(db) as store:
        return [(r["run_hash"], r["status"], r["attempts"]) for r in store.rows()]


def test_ray_executor_without_ray_writes_nothing(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    recipe = _write(tmp_path / "r.yaml", rtn_recipe(env))
    db = tmp_path / "ray.db"
    assert main(_study_args(env, recipe, db, "--executor", "ray")) == 2
    assert "--executor ray needs Ray: pip install 'ptqlab[ray]'" in capsys.readouterr().err
    assert not db.exists()


def test_rerun_without_its_data_leaves_the_store_as_it_was(env, study_db, tmp_path, monkeypatch, capsys):
    import shutil

    db = tmp_path / "copy.db"
    shutil.copy(study_db, db)
    before = _snapshot(db)
    monkeypatch.delenv("PTQLAB_DATA", raising=False)
    recipe = env["root"] / "ci.yaml"
    assert main(["study", str(recipe), "--db", str(db), "--device", "cpu"]) == 2  # no --data-dir
    err = capsys.readouterr().err
    assert "dataset 'wikitext2' is not available" in err and "--data-dir" in err
    assert _snapshot(db) == before  # no pending duplicates of the done runs


def test_report_never_writes_and_refuses_files_that_are_not_studies(tmp_path, capsys):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    assert main(["report", str(empty)]) == 2
    assert "is an empty file, not a ptqlab study database" in capsys.readouterr().err
    assert empty.read_bytes() == b""

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    content = other.read_bytes()
    assert main(["report", str(other)]) == 2
    assert "is an SQLite file but not a ptqlab study database (it has no ptqlab schema)" in capsys.readouterr().err
    assert other.read_bytes() == content


def test_report_of_a_study_leaves_its_bytes_unchanged(study_db, capsys):
    content = study_db.read_bytes()
    assert main(["report", str(study_db)]) == 0
    assert "Study report" in capsys.readouterr().out
    assert study_db.read_bytes() == content


def test_too_few_calibration_windows_stop_the_study_before_anything_is_queued(tmp_path, capsys):
    # testbed-bloom has no position limit, so its runs take 2048-token windows: the testbed calibration text holds
    # 37 of them, and 128 are asked (the methods recipe once stopped on this at run 53 of 82)
    db = tmp_path / "few.db"
    args = ["study", "--grid", "method=rtn,gptq wbits=4", "--model", "testbed-bloom", "--set", "calib=testbed",
            "--set", "eval=heldout", "--db", str(db)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "testbed-bloom gptq W4A16" in err and "37 windows" in err and "--set" in err, err
    assert not db.exists()  # nothing was queued
    # the same grid at a window the text holds passes the check, and so do the default ("auto": the testbed text)
    from ptqlab.study.cli import check_plan_calibration

    for settings in ({"calib": "testbed", "seqlen": 512}, {"seqlen": 512}):
        plan = parse_grid("method=rtn,gptq wbits=4", ["testbed-bloom"], settings)
        assert [r.spec["method"] for r in plan.runs if "calib" in r.spec] == ["gptq"]
        check_plan_calibration([r.spec for r in plan.runs], None)
