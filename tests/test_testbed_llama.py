"""testbed-llama (issue 18): the trained Llama-architecture members (RMSNorm, SwiGLU, rotary positions,
grouped-query attention) run every method, transform, export and evaluation path as OPT and BLOOM do.

Quality orderings are measured on the trained ~7M member (held-out text, a prefix of 8 windows of 512 tokens,
16 calibration windows: CPU time); the full-split GPU figures are in MODEL_CARD.md and bench/README.md.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from ptqlab import GPTQOptions, LayerFilter, QuantConfig, QuantSpec, ZQOptions
from ptqlab.transforms.awq import AWQOptions
from ptqlab.cli import main
from ptqlab.experiment import ModelSession, RunSpec, run
from ptqlab.export import load_with_transformers
from ptqlab.export.evaluate_saved import evaluate_saved
from ptqlab.models import QuantLinear
from ptqlab.testbed import CALIBRATION_TEXT, FAMILY, TESTBED_DIR, family_member

MODEL = "testbed-llama"
WINDOWS, NSAMPLES, SEQLEN = 8, 16, 512


@pytest.fixture(scope="module")
def session():
    return ModelSession(MODEL, "cpu", "float32", progress=False)


def _run(session, config: QuantConfig, **kw) -> dict:
    spec = RunSpec(model=MODEL, config=config, eval=("heldout",), seqlen=SEQLEN, calib=str(CALIBRATION_TEXT),
                   nsamples=NSAMPLES, max_eval_windows=WINDOWS, dtype="float32")
    return run(spec, session, progress=False, **kw)


@pytest.fixture(scope="module")
def fp16(session) -> float:
    return _run(session, QuantConfig("fp16"))["ppl"]["heldout"]


def test_reproduces_its_model_card(data_dir):
    """The CPU prefix row of reference_ppl.json (32 windows of 512 tokens of each split, float32)."""
    ref = json.loads((TESTBED_DIR / "reference_ppl.json").read_text())[MODEL]["prefix"]
    cpu = ModelSession(MODEL, "cpu", "float32", str(data_dir), progress=False)
    spec = RunSpec(model=MODEL, config=QuantConfig("fp16"), eval=("wikitext2", "ptb", "heldout"), seqlen=512,
                   max_eval_windows=ref["windows"], dtype="float32")
    ppl = run(spec, cpu, progress=False)["ppl"]
    for dataset, value in ppl.items():
        assert value == pytest.approx(ref["ppl"][dataset], rel=0.005), dataset


def test_the_member_is_a_llama_with_grouped_query_attention(session):
    config = session.model.config
    member = family_member(MODEL)
    assert config.model_type == "llama" and member.arch == "llama" and member.shipped
    assert config.num_key_value_heads == member.key_value_heads < config.num_attention_heads
    assert config.intermediate_size == member.ffn and config.hidden_act == "silu"
    assert sum(p.numel() for p in session.model.parameters()) == member.params
    # matched to the other families' ~7M members within 3%
    assert abs(member.params / FAMILY["testbed-opt"].params - 1) < 0.03


@pytest.mark.parametrize("wbits", [3, 4])
def test_gptq_beats_rtn_at_w3_and_w4_g128(session, fp16, wbits):
    spec = QuantSpec(wbits, True, 128)
    rtn = _run(session, QuantConfig("rtn", spec))["ppl"]["heldout"]
    gptq = _run(session, QuantConfig("gptq", spec))["ppl"]["heldout"]
    assert fp16 < gptq < rtn, (fp16, gptq, rtn)


@pytest.mark.parametrize("config", [
    QuantConfig("gptq", QuantSpec(4, False, 128), options={"gptq": GPTQOptions(act_order=True)}),
    # ZQ's gradient steps and AWQ's grid cut for CPU time (the methods' full defaults run in the GPU study)
    QuantConfig("zq-local", QuantSpec(4, True, 128), options={"zq": ZQOptions(steps=20)}),
    QuantConfig("zq-global", QuantSpec(4, True, 128), options={"zq": ZQOptions(steps=5, batch_size=4)},
                layers=LayerFilter.parse("block:1")),
    QuantConfig("rtn", QuantSpec(4, True, 128), lorc_rank=8, lorc_aware=True),
    QuantConfig("rtn", QuantSpec(8, True, 0), act=QuantSpec(8, True, 0)),
    QuantConfig("rtn", QuantSpec(4, True, 128), act=QuantSpec(8, True, 0), transform="smoothquant"),
    QuantConfig("rtn", QuantSpec(4, True, 128), transform="awq", options={"awq": AWQOptions(grid=5, clip=False)}),
    QuantConfig("rtn", QuantSpec(4, True, 128), act=QuantSpec(4, True, 0), transform="rotate"),
], ids=["gptq-asym-act-order", "zq-local", "zq-global", "rtn-lorc8-aware", "w8a8", "smoothquant-w4a8", "awq-w4",
        "rotate-w4a4"])
def test_every_method_and_transform_runs_with_a_sane_result(session, fp16, config):
    ppl = _run(session, config)["ppl"]["heldout"]
    # quantized: no better than the fp32 model beyond noise, and not broken (W4A4 with rotation included)
    assert math.isfinite(ppl) and 0.99 * fp16 < ppl < 3 * fp16, (ppl, fp16)


def test_offloaded_evaluation_gives_the_same_ppl(fp16):
    offloaded = ModelSession(MODEL, "cpu", "float32", progress=False, offload=True)
    assert _run(offloaded, QuantConfig("fp16"))["ppl"]["heldout"] == pytest.approx(fp16, rel=1e-6)


def test_save_reload_and_transformers_give_the_same_model(session, tmp_path):
    out = tmp_path / "saved"
    config = QuantConfig("gptq", QuantSpec(4, True, 128), lorc_rank=8)
    record = _run(session, config, save=str(out))
    reloaded = evaluate_saved(str(out), ("heldout",), max_eval_windows=WINDOWS, progress=False)
    assert reloaded["ppl"]["heldout"] == record["ppl"]["heldout"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["num_key_value_heads"] == 4
    from ptqlab.export import load_quantized

    ptqlab_model, _, _ = load_quantized(out)
    assert sum(isinstance(m, QuantLinear) for m in ptqlab_model.modules()) == 6 * 7
    ids = torch.randint(4, 8000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = ptqlab_model(input_ids=ids).logits
        hf = load_with_transformers(out)(input_ids=ids).logits  # transformers + PEFT's LoRC adapter, fp32
    assert float((hf - reference).abs().max()) < 1e-5 * float(reference.abs().max())


def test_the_size_study_covers_three_families():
    import yaml

    models = yaml.safe_load(open("recipes/sizes.yaml"))["models"]
    assert {m for m in FAMILY if m.startswith("testbed-")} == set(models)  # 3 families x 4 sizes
    assert {family_member(m).arch for m in models} == {"opt", "bloom", "llama"}


def test_the_cli_runs_testbed_llama(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(["run", "--model", "testbed-llama-2m", "--method", "rtn", "--wbits", "4", "--wgroup", "128",
                 "--eval", "heldout", "--max-eval-windows", "2", "--device", "cpu", "--no-progress",
                 "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["config"]["model"] == "testbed-llama-2m" and record["ppl"]["heldout"] < 300
