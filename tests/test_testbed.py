"""The shipped, trained testbed models: they load offline, reproduce their model card, and show
the quality orderings any real model must show.

CPU budget: every run here evaluates a fixed *prefix* of each split (``PREFIX_WINDOWS`` windows
of 512 tokens: 4% of WikiText-2, 10% of PTB, a quarter of the held-out text) in float32; the
full-split figures are in MODEL_CARD.md, and ``reference_ppl.json`` records both.
"""

from __future__ import annotations

import json

import pytest

from ptqlab import QuantConfig, QuantSpec
from ptqlab.experiment import ModelSession, RunSpec, run
from ptqlab.testbed import CALIBRATION_TEXT, TESTBED_DIR

PREFIX_WINDOWS = 32
SEQLEN = 512
NSAMPLES = 32
REFERENCE = json.loads((TESTBED_DIR / "reference_ppl.json").read_text())


@pytest.fixture(scope="module", params=["testbed-opt", "testbed-bloom"])
def session(request, data_dir):
    return ModelSession(request.param, "cpu", "float32", str(data_dir), progress=False)


def _ppl(session, config: QuantConfig) -> dict[str, float]:
    spec = RunSpec(model=session.name, config=config, eval=("wikitext2", "ptb", "heldout"), seqlen=SEQLEN,
                   calib=str(CALIBRATION_TEXT), nsamples=NSAMPLES, max_eval_windows=PREFIX_WINDOWS, dtype="float32")
    return run(spec, session, progress=False)["ppl"]


def _mean(ppl: dict[str, float]) -> float:
    return sum(ppl.values()) / len(ppl)


@pytest.fixture(scope="module")
def fp16(session):
    return _ppl(session, QuantConfig("fp16"))


def test_reproduces_the_model_card(session, fp16):
    ref = REFERENCE[session.name]["prefix"]
    assert ref["windows"] == PREFIX_WINDOWS and ref["seqlen"] == SEQLEN
    for dataset, value in fp16.items():
        assert value == pytest.approx(ref["ppl"][dataset], rel=0.005), dataset
    # a trained model: far below the vocabulary size that a random model scores
    assert all(v < 0.1 * session.model.config.vocab_size for v in fp16.values())


def test_w8_rtn_within_one_percent(session, fp16):
    w8 = _ppl(session, QuantConfig("rtn", QuantSpec(8)))
    for dataset in fp16:
        assert w8[dataset] == pytest.approx(fp16[dataset], rel=0.01)


def test_w3_clearly_worse_than_w4_and_gptq_better_than_rtn(session, fp16):
    rtn4 = _mean(_ppl(session, QuantConfig("rtn", QuantSpec(4))))
    rtn3 = _mean(_ppl(session, QuantConfig("rtn", QuantSpec(3))))
    gptq4 = _mean(_ppl(session, QuantConfig("gptq", QuantSpec(4))))
    base = _mean(fp16)
    assert rtn3 - base > 2 * (rtn4 - base) and rtn3 > 1.02 * rtn4, (rtn3, rtn4, base)
    assert gptq4 < rtn4, (gptq4, rtn4)


def test_lorc_rank8_improves_the_weight_method(session):
    spec = QuantSpec(3, True, 128)
    plain = _mean(_ppl(session, QuantConfig("rtn", spec)))
    lorc = _mean(_ppl(session, QuantConfig("rtn", spec, lorc_rank=8)))
    assert lorc < plain, (lorc, plain)
