"""Reports by another metric than mean PPL (study/report.py ``Metric``): KLD, task accuracy, one dataset,
relative bounds, and the flag on runs that beat their FP16 baseline beyond noise. Synthetic rows, no model."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

from ptqlab.cli import main
from ptqlab.study.report import Metric, Result, classify, recommendations

FIXTURE = Path(__file__).resolve().parent / "data" / "sizes_study_bloom.sql"


def _result(method: str, wbits: int, ppl: dict, window_nll: dict | None = None, kld: dict | None = None,
            tasks: dict | None = None, bits: float | None = None) -> Result:
    spec = {"method": method, "wbits": wbits, "abits": 16, "eval": list(ppl), "model": "m"}
    metrics = {k: v for k, v in (("window_nll", window_nll), ("kld", kld), ("tasks", tasks)) if v is not None}
    return Result({"spec": spec, "kind": "quant", "model": "m", "status": "done", "ppl": ppl,
                   "bits_per_weight": bits or float(wbits), "metrics": metrics, "run_hash": method + str(wbits)})


def _study() -> list[Result]:
    base = _result("fp16", 16, {"heldout": 20.0, "wikitext2": 500.0},
                   window_nll={"heldout": [3.0, 3.1, 2.9, 3.0]},
                   tasks={"t": {"acc": 0.60, "acc_stderr": 0.02}})
    w8 = _result("rtn", 8, {"heldout": 20.05, "wikitext2": 499.0},  # heldout +0.05, the mean -0.475
                 window_nll={"heldout": [3.0025, 3.1025, 2.9025, 3.0025]},
                 kld={"heldout": {"mean": 0.004, "median": 0.002, "p99": 0.05, "top1": 0.97, "dp": -0.001},
                      "wikitext2": {"mean": 0.006, "median": 0.003, "p99": 0.07, "top1": 0.96, "dp": -0.002}},
                 tasks={"t": {"acc": 0.59, "acc_stderr": 0.02}})
    w4 = _result("rtn", 4, {"heldout": 21.5, "wikitext2": 520.0},
                 window_nll={"heldout": [3.07, 3.18, 2.97, 3.08]},
                 kld={"heldout": {"mean": 0.09, "median": 0.05, "p99": 0.9, "top1": 0.8, "dp": -0.02},
                      "wikitext2": {"mean": 0.11, "median": 0.06, "p99": 1.0, "top1": 0.78, "dp": -0.03}},
                 tasks={"t": {"acc": 0.50, "acc_stderr": 0.02}})
    # beats FP16 on heldout by far more than the paired noise (every window 0.05 nats better)
    zq = _result("zq-global", 4, {"heldout": 19.0, "wikitext2": 480.0}, bits=4.2,
                 window_nll={"heldout": [2.95, 3.05, 2.85, 2.95]},
                 kld={"heldout": {"mean": 0.03, "median": 0.02, "p99": 0.3, "top1": 0.9, "dp": 0.01},
                      "wikitext2": {"mean": 0.04, "median": 0.02, "p99": 0.4, "top1": 0.88, "dp": 0.01}},
                 tasks={"t": {"acc": 0.62, "acc_stderr": 0.02}})
    runs = [base, w8, w4, zq]
    for r in runs:
        r.baseline = base
    return runs


def test_degradations_of_each_metric():
    base, w8, w4, zq = _study()
    assert Metric.parse("ppl").degradation(w8) == pytest.approx(-0.475)  # mean over the datasets (the default)
    heldout = Metric.parse("ppl", dataset="heldout")
    assert heldout.degradation(w8) == pytest.approx(0.05)
    assert Metric.parse("ppl", "heldout", relative=True).degradation(w4) == pytest.approx(7.5)  # percent
    assert Metric.parse("kld").degradation(w4) == pytest.approx(0.10)  # the value itself, mean of datasets
    assert Metric.parse("kld.p99", "heldout").degradation(w4) == pytest.approx(0.9)
    assert Metric.parse("kld.top1", "heldout").degradation(w4) == pytest.approx(0.2)  # disagreement
    assert Metric.parse("task:t").degradation(w4) == pytest.approx(0.10)  # accuracy drop
    assert Metric.parse("task:t", relative=True).degradation(w4) == pytest.approx(100 * 0.1 / 0.6)
    assert Metric.parse("task:t").degradation(zq) == pytest.approx(-0.02)
    assert Metric.parse("task:t:acc_norm").degradation(w4) is None  # not recorded
    assert Metric.parse("kld").degradation(base) is None  # the baseline recorded no KLD


def test_paired_noise_and_the_flag():
    base, w8, w4, zq = _study()
    heldout = Metric.parse("ppl", dataset="heldout")
    # every window's NLL moved by the same amount: the paired standard error is 0
    assert heldout.noise(w8) == pytest.approx(0.0, abs=1e-9)
    assert heldout.beats_baseline(zq, (0.1, 0.5)) == pytest.approx(1.0)
    assert heldout.beats_baseline(w8, (0.1, 0.5)) is None  # worse than FP16: nothing to flag
    # task accuracy: +0.02 is within 2 * sqrt(0.02^2 + 0.02^2) = 0.057 of FP16, not flagged
    assert Metric.parse("task:t").noise(zq) == pytest.approx(2 * math.hypot(0.02, 0.02))
    assert Metric.parse("task:t").beats_baseline(zq, (0.01, 0.03)) is None
    # KLD cannot beat FP16
    assert Metric.parse("kld").beats_baseline(zq, (0.01, 0.05)) is None

    section = recommendations("m", [w8, w4, zq], (0.1, 0.5), 5, heldout)
    rows = {(row[0], row[1], row[2]) for row in section.rows}
    assert ("flagged", "zq-global", "W4A16") in rows
    assert not any(row[0].startswith("Class") and row[1] == "zq-global" for row in section.rows)
    assert any("rests on PPL on heldout (vs FP16); class bounds 0.1, 0.5 (the paper's)" in n for n in section.notes)
    # by KLD the ZQ run is an ordinary Class-2 configuration (0.035 mean KL)
    by_kld = recommendations("m", [w8, w4, zq], (0.01, 0.05), 5, Metric.parse("kld"))
    assert ("Class-2", "zq-global", "W4A16") in {(row[0], row[1], row[2]) for row in by_kld.rows}
    assert classify(Metric.parse("kld").degradation(zq), (0.01, 0.05)) == 2


def test_bad_metric_and_relative_kld_are_errors():
    with pytest.raises(ValueError, match="is not a metric"):
        Metric.parse("accuracy")
    with pytest.raises(ValueError, match="KL divergence has no FP16 value"):
        Metric.parse("kld", relative=True)


def test_report_cli_on_the_stored_size_study(tmp_path, capsys):
    """The stored GPU study (no per-window NLLs, no KLD): on the in-domain held-out text with relative bounds,
    the classes rest on heldout; runs that beat FP16 on the out-of-domain mean are flagged, not recommended."""
    db = tmp_path / "sizes.db"
    with sqlite3.connect(db) as con:
        con.executescript(FIXTURE.read_text())
    assert main(["report", str(db)]) == 0
    default = capsys.readouterr().out
    assert "| flagged |" in default and "the paper's" in default
    assert main(["report", str(db), "--dataset", "heldout", "--relative", "--plots", str(tmp_path / "p")]) == 0
    text = capsys.readouterr().out
    assert "rests on PPL on heldout (vs FP16); class bounds 1, 5 percent of the FP16 value" in text
    assert (tmp_path / "p" / "testbed-bloom_ppl_vs_bits.png").is_file()
    assert main(["report", str(db), "--metric", "kld"]) == 0  # nothing recorded: n/a cells, no class
    assert "| Class-1 | none |" in capsys.readouterr().out
    assert main(["report", str(db), "--metric", "kld", "--relative"]) == 2
