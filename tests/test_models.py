"""Model adapters and the QuantLinear layer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import ptqlab.models as models_mod
from ptqlab import QuantConfig, QuantSpec, quantize_
from ptqlab.models import QuantLinear, UnsupportedModelError, get_adapter, load_model, wrap_linears

EXPECTED_LINEARS = {
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
    "bloom": {"self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_LINEARS))
def test_adapter_finds_blocks_and_linears(arch, tiny_models):
    model, _ = load_model(tiny_models[arch], torch.float32)
    adapter = get_adapter(model)
    assert len(adapter.blocks) == 2
    assert set(adapter.linear_layers(adapter.blocks[0])) == EXPECTED_LINEARS[arch]
    assert adapter.final_modules, "the final norm must be found for sequential evaluation"


@pytest.mark.parametrize("arch", sorted(EXPECTED_LINEARS))
def test_wrapping_keeps_outputs(arch, tiny_models):
    """QuantLinear with 16-bit specs is exactly the original layer (GPT-2's Conv1D transposed included)."""
    model, _ = load_model(tiny_models[arch], torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    before = model(ids).logits
    adapter = get_adapter(model)
    for block in adapter.blocks:
        wrap_linears(block)
    assert all(isinstance(m, QuantLinear) for b in adapter.blocks for m in adapter.linear_layers(b).values())
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_unsupported_model_names_the_class():
    from transformers import GPTNeoXConfig

    model = AutoModelForCausalLM.from_config(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=64,
                                                           vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="GPTNeoXForCausalLM"):
        get_adapter(model)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="could not load model"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("arch", ["opt", "bloom"])
def test_activation_quantizer_applied_to_every_linear_input(arch, tiny_models, monkeypatch):
    model, _ = load_model(tiny_models[arch], torch.float32)
    quantize_(model, QuantConfig(method="rtn", weight=QuantSpec(8), act=QuantSpec(8)))
    seen: list[str] = []
    real = models_mod.fake_quantize

    def counting(x, spec, name="tensor", **kwargs):
        if spec.enabled:
            seen.append(name)
        return real(x, spec, name, **kwargs)

    monkeypatch.setattr(models_mod, "fake_quantize", counting)
    model(torch.randint(0, model.config.vocab_size, (1, 8)))
    adapter = get_adapter(model)
    expected = {f"{m.name} input" for b in adapter.blocks for m in adapter.linear_layers(b).values()}
    assert len(expected) == 2 * len(EXPECTED_LINEARS[arch])
    assert sorted(seen) == sorted(expected), "each linear input quantized exactly once per forward"


def test_embeddings_and_head_stay_full_precision_by_default(tiny_models):
    model, _ = load_model(tiny_models["opt"], torch.float32)
    head_before = model.lm_head.weight.clone()
    emb_before = model.get_input_embeddings().weight.clone()
    quantize_(model, QuantConfig(method="rtn", weight=QuantSpec(3)))
    torch.testing.assert_close(model.get_input_embeddings().weight, emb_before, rtol=0, atol=0)
    assert not isinstance(model.lm_head, QuantLinear)
    torch.testing.assert_close(model.lm_head.weight, head_before, rtol=0, atol=0)


def test_quantize_head_option(tiny_models):
    model, _ = load_model(tiny_models["opt"], torch.float32)
    emb_before = model.get_input_embeddings().weight.clone()
    quantize_(model, QuantConfig(method="rtn", weight=QuantSpec(4), quantize_head=True))
    assert isinstance(model.lm_head, QuantLinear)
    codes_per_row = [torch.unique(row).numel() for row in model.lm_head.weight]
    assert max(codes_per_row) <= 16
    torch.testing.assert_close(model.get_input_embeddings().weight, emb_before, rtol=0, atol=0)
