"""A run's numbers do not depend on what ran before it in the session (issue 24, item 4).

``ptqlab demo`` and studies run many configs on one :class:`~ptqlab.experiment.ModelSession`, which quantizes
the model in place and restores it between runs (``ptqlab/restore.py``).  A run must print the same perplexities,
bit for bit, alone in a fresh session and after other runs; the last test checks that this comparison does catch
a restore that leaks (weights not reloaded).
"""

from __future__ import annotations

import pytest

from ptqlab import QuantConfig, QuantSpec
from ptqlab.config import RunSpec
from ptqlab.experiment import ModelSession, run

MODEL = "testbed-opt-2m"  # trained (so quantization changes the numbers), small enough for seconds per run
W4, A8 = QuantSpec(4, True, 128), QuantSpec(8, True, 0)
TARGET = QuantConfig("gptq", W4)  # calibrates on the model it is given: a leaked weight or layer shows
BEFORE = [QuantConfig("rtn", W4), QuantConfig("gptq", W4, A8, lorc_rank=8)]  # LoRC factors, activation quantization


def _spec(config: QuantConfig) -> RunSpec:
    return RunSpec(MODEL, config, eval=("heldout",), seqlen=128, calib="testbed", nsamples=8, max_eval_windows=4,
                   dtype="float32")


def _ppl(session: ModelSession, config: QuantConfig) -> dict[str, float]:
    return run(_spec(config), session, progress=False)["ppl"]


def _session(data_dir) -> ModelSession:
    return ModelSession(MODEL, "cpu", "float32", str(data_dir), progress=False)


@pytest.fixture(scope="module")
def alone(data_dir) -> dict[str, float]:
    return _ppl(_session(data_dir), TARGET)


def test_a_run_gives_the_same_digits_alone_and_after_other_runs(alone, data_dir):
    session = _session(data_dir)
    before = [_ppl(session, config) for config in BEFORE]
    assert _ppl(session, TARGET) == alone  # exact floats, not rounded
    assert _ppl(session, BEFORE[0]) == before[0]  # and an earlier run again, after the target


def test_the_comparison_catches_a_leaking_restore(alone, data_dir, monkeypatch):
    from ptqlab.restore import PristineWeights

    monkeypatch.setattr(PristineWeights, "_reload", lambda self, model, everything=False: None)  # modules put back, weights not
    session = _session(data_dir)
    for config in BEFORE:
        _ppl(session, config)
    assert _ppl(session, TARGET) != alone
