"""On the GPU, in fp16 and bf16: every registered method at W4 g128, W4 asym, W8A8 and W4A8 (and LoRC) is
measured, saved, reloaded and measured again with the same perplexity; ``ptqlab run --save`` of the W8A8 model
that once could not be saved; transformers loading a saved folder on the GPU."""

from __future__ import annotations

import pytest
import torch

from ptqlab.cli import main
from ptqlab.config import QuantConfig, RunSpec, ZQOptions
from ptqlab.experiment import ModelSession, run
from ptqlab.export import load_quantized, load_with_transformers
from ptqlab.export.evaluate_saved import evaluate_saved
from ptqlab.methods import METHODS
from ptqlab.quantizers import QuantSpec

MODEL, SEQLEN, NSAMPLES, EVAL_BATCH = "testbed-opt", 512, 32, 8
A8 = QuantSpec(8, True, 0)
SPECS = {
    "w4g128": (QuantSpec(4, True, 128), QuantSpec()),
    "w4g128-asym": (QuantSpec(4, False, 128), QuantSpec()),
    "w8a8": (QuantSpec(8, True, 0), A8),
    "w4a8": (QuantSpec(4, True, 0), A8),
}
METHOD_NAMES = [name for name, m in METHODS.items() if m.quantizes_weights]
CASES = [(m, s, 0) for m in METHOD_NAMES for s in SPECS] + [("gptq", "w4g128", 8), ("gptq", "w4a8", 8)]


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def session(request):
    return ModelSession(MODEL, "cuda", request.param, progress=False)


def _spec(session, method: str, spec: str, rank: int) -> RunSpec:
    weight, act = SPECS[spec]
    config = QuantConfig(method=method, weight=weight, act=act, lorc_rank=rank, options={"zq": ZQOptions(steps=20)})
    return RunSpec(model=MODEL, config=config, eval=("heldout",), seqlen=SEQLEN, calib="testbed", nsamples=NSAMPLES,
                   dtype=session.dtype_name)


@pytest.mark.parametrize(("method", "spec", "rank"), CASES)
def test_measured_model_saves_and_reloads_with_its_ppl(session, method, spec, rank, tmp_path):
    out = tmp_path / "saved"
    record = run(_spec(session, method, spec, rank), session, progress=False, eval_batch=EVAL_BATCH, save=str(out))
    reloaded = evaluate_saved(str(out), ("heldout",), device="cuda", dtype=session.dtype_name, progress=False,
                              eval_batch=EVAL_BATCH)
    assert reloaded["ppl"]["heldout"] == record["ppl"]["heldout"], (record["name"], session.dtype)
    assert reloaded["bits_per_weight"] == record["bits_per_weight"]


def test_the_w8a8_command_of_the_bug_report_saves_and_reloads(tmp_path, capsys):
    """`ptqlab run --method gptq --wbits 8 --abits 8 --device cuda --save DIR` (fp16, the GPU default)."""
    out = tmp_path / "w8a8"
    args = ["--eval", "heldout", "--seqlen", str(SEQLEN), "--nsamples", str(NSAMPLES), "--device", "cuda",
            "--no-progress", "--eval-batch", str(EVAL_BATCH)]
    assert main(["run", "--model", MODEL, "--method", "gptq", "--wbits", "8", "--abits", "8", "--save", str(out),
                 *args]) == 0
    assert main(["run", "--model", str(out), "--device", "cuda", "--no-progress", "--eval", "heldout",
                 "--eval-batch", str(EVAL_BATCH)]) == 0
    now, then = capsys.readouterr().out.strip().splitlines()[-1].split(": ")[1].split(" now, ")
    assert now == then.split(" ")[0]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_transformers_loads_a_saved_folder_on_the_gpu(dtype, tmp_path):
    """The helper's transformers model (PEFT adapter applied, on the GPU) against ptqlab's reload: same PPL up to
    the order of the LoRA side product, and logits within the dtype's rounding."""
    from ptqlab.data import eval_tokens, load_text
    from ptqlab.evaluate import perplexity

    session = ModelSession(MODEL, "cuda", dtype, progress=False)
    out = tmp_path / "saved"
    run(_spec(session, "gptq", "w4g128", 8), session, progress=False, eval_batch=EVAL_BATCH, save=str(out))
    ours, tokenizer, _ = load_quantized(out, getattr(torch, dtype))
    ours.to("cuda")
    theirs = load_with_transformers(out, device_map="cuda")
    assert next(theirs.parameters()).dtype == getattr(torch, dtype)  # config.json's dtype, the one measured in
    tokens = eval_tokens(tokenizer, load_text("heldout", "eval"), SEQLEN)
    ppl = {name: perplexity(m, tokens, SEQLEN, "cuda", progress=False, eval_batch=EVAL_BATCH)
           for name, m in (("ptqlab", ours), ("transformers", theirs))}
    assert ppl["transformers"] == pytest.approx(ppl["ptqlab"], rel=2e-3), ppl
