"""Llama-shaped families beyond Llama (Mistral, Qwen2, Qwen3) by test, not by claim: a tiny random model of each,
made by `ptqlab make-tiny`, is quantized, saved, and reloaded by transformers with the logits ptqlab computed.

Their weights are random: these tests check the adapters and the checkpoint, never quality (that is
testbed-llama's job, tests/test_testbed_llama.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from ptqlab import QuantConfig, QuantSpec, quantize_
from ptqlab.cli import main
from ptqlab.export import load_quantized, load_with_transformers, save_quantized
from ptqlab.models import MAPPINGS, QuantLinear, get_adapter, load_model

ARCHS = ("mistral", "qwen2", "qwen3")
# every linear of a gated-MLP, grouped-query-attention block
LINEARS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp(request.param) / "model"
    assert main(["make-tiny", "--arch", request.param, "--out", str(out), "--hidden", "64", "--layers", "2",
                 "--heads", "4", "--text", str(data_dir / "ptb" / "ptb.valid.txt")]) == 0
    return request.param, out


def _calibration(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, vocab, (4, 32), generator=g)  # 4 windows of 32 tokens


def test_the_adapter_finds_every_linear_and_grouped_query_attention(tiny):
    arch, path = tiny
    model, _ = load_model(str(path), torch.float32)
    assert model.config.model_type == arch
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    adapter = get_adapter(model)
    assert len(adapter.blocks) == 2
    assert set(adapter.linear_layers(adapter.blocks[0])) == LINEARS
    assert arch in MAPPINGS  # the transforms have their norm -> linear mapping


@pytest.mark.parametrize("config", [
    QuantConfig(method="gptq", weight=QuantSpec(4, True, 32), lorc_rank=4),
    QuantConfig(method="rtn", weight=QuantSpec(4, False, 32)),
    QuantConfig(method="rtn", weight=QuantSpec(8, True, 0), act=QuantSpec(8, True, 0)),
], ids=["gptq-w4-g32-sym-lorc4", "rtn-w4-g32-asym", "rtn-w8a8"])
def test_quantize_save_and_transformers_reload_give_the_same_logits(tiny, config, tmp_path):
    arch, path = tiny
    model, tokenizer = load_model(str(path), torch.float32)
    ids = torch.randint(4, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    quantize_(model, config, _calibration(model.config.vocab_size), progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * len(LINEARS)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    assert not torch.allclose(reference, before)  # 4-bit weights changed the model

    out = tmp_path / "saved"
    save_quantized(model, tokenizer, out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == arch and "quantization_config" in saved
    assert (out / "adapter").exists() == (config.lorc_rank > 0)
    loaded, _, _ = load_quantized(out)
    # with PEFT's adapter where LoRC is on; activation quantization survives only the compressed load
    hf = load_with_transformers(out, dequantize=not config.act.enabled)
    assert type(hf.get_base_model() if config.lorc_rank else hf).__name__ == type(model).__name__
    tol = 1e-5 * float(reference.abs().max())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference)
        assert float((hf(input_ids=ids).logits - reference).abs().max()) < tol
        # plain transformers, compressed-tensors' own load: symmetric only (transformers 5.x allocates one zero
        # point per row, not the packed rows: tests/test_export.py records how it fails)
        if not config.lorc_rank and config.weight.symmetric:
            from transformers import AutoModelForCausalLM

            plain = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
            assert float((plain - reference).abs().max()) < tol


@pytest.mark.parametrize("transform", ["smoothquant", "awq", "rotate"])
def test_transforms_run_on_each_family_through_the_cli(tiny, transform, data_dir, tmp_path):
    arch, path = tiny
    out = tmp_path / "r.jsonl"
    assert main(["run", "--model", str(path), "--method", "rtn", "--wbits", "4", "--wgroup", "32",
                 "--abits", "16" if transform == "awq" else "8", "--transform", transform, "--calib", str(data_dir / "ptb" / "ptb.valid.txt"), "--nsamples", "2", "--eval", "ptb", "--seqlen", "32",
                 "--max-eval-windows", "2", "--data-dir", str(data_dir), "--device", "cpu", "--no-progress",
                 "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["config"]["transform"] == transform
    assert torch.isfinite(torch.tensor(record["ppl"]["ptb"]))


def test_rotation_and_smoothing_keep_the_logits_before_quantization(tiny):
    """Rotating through RMSNorm (Qwen2's q/k/v biases, Qwen3's per-head q/k norms included) and moving scales
    between norms and linears change no output while nothing is quantized."""
    arch, path = tiny
    model, _ = load_model(str(path), torch.float32)
    ids = torch.randint(4, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    quantize_(model, QuantConfig(method="fp16", transform="rotate"))
    with torch.no_grad():
        rotated = model(input_ids=ids).logits
    assert torch.allclose(rotated, reference, atol=1e-4, rtol=1e-4)
    assert model.model.layers[0].mlp.down_proj.input_rotation == "hadamard"
    smoothed, _ = load_model(str(path), torch.float32)
    original = smoothed.model.layers[0].self_attn.q_proj.weight.clone()
    quantize_(smoothed, QuantConfig(method="fp16", transform="smoothquant"), _calibration(model.config.vocab_size))
    assert not torch.equal(smoothed.model.layers[0].self_attn.q_proj.weight, original)  # scales moved
    with torch.no_grad():
        assert torch.allclose(smoothed(input_ids=ids).logits, reference, atol=1e-4, rtol=1e-4)


def test_asymmetric_packed_zero_points_through_transformers_compressed_load(tiny, tmp_path):
    """What transformers' default (compressed) load does with asymmetric pack-quantized Llama-shaped folders, recorded
    as it behaves with the installed versions: transformers 5.24 refuses them (it allocates one zero point per row,
    not the packed rows: a size mismatch), as for OPT (tests/test_export.py); a load that ran a wrong model would be
    caught here too. ptqlab's own `load_with_transformers` takes the dense load, which is exact (the test above)."""
    from transformers import AutoModelForCausalLM

    arch, path = tiny
    model, tokenizer = load_model(str(path), torch.float32)
    quantize_(model, QuantConfig(method="rtn", weight=QuantSpec(4, False, 32)), progress=False)
    out = tmp_path / "asym"
    save_quantized(model, tokenizer, out)
    ids = torch.randint(4, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        try:
            plain = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        except RuntimeError as err:
            assert "mismatch" in str(err).lower()
            pytest.xfail("transformers' compressed load refuses asymmetric packed zero points (size mismatch)")
    if not torch.allclose(plain, reference, atol=1e-4, rtol=1e-4):
        pytest.xfail("transformers' compressed load re-initialises asymmetric packed zero points: a wrong model")
