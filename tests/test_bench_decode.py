"""bench/bench_decode.py's StaticOPTDecoder (the CUDA-graph-capturable decode path) against HF OPT, on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_decode import StaticOPTDecoder, prefill, step  # noqa: E402

NEW = 6


def tiny_opt(pre_ln: bool, proj_dim: int):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, ffn_dim=128, vocab_size=500,
                    max_position_embeddings=256, word_embed_proj_dim=proj_dim, do_layer_norm_before=pre_ln,
                    dropout=0.0, attention_dropout=0.0, eos_token_id=None)
    torch.manual_seed(0)
    model = OPTForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so the greedy tokens vary
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("pre_ln,proj_dim", [(True, 64), (False, 64), (True, 32)],
                         ids=["pre-ln", "post-ln", "project-in-out"])
@torch.no_grad()
def test_static_decoder_matches_hf(pre_ln: bool, proj_dim: int, fused: bool) -> None:
    """Fused (q/k/v as one linear whose rows the layers' weights now view, add + LayerNorm together) or not,
    the decoder gives HF's logits and greedy tokens; HF's own forward, over the same (now view) weights, too."""
    model = tiny_opt(pre_ln, proj_dim)
    assert (model.model.decoder.project_in is not None) == (proj_dim != 64)
    assert (model.model.decoder.final_layer_norm is not None) == pre_ln
    ids = torch.randint(4, 500, (2, 9), generator=torch.Generator().manual_seed(1))

    # (a) prefill, then the step logits against HF's full-sequence forward at each step
    dec = StaticOPTDecoder(model, batch=2, max_len=ids.shape[1] + NEW + 3, fused=fused)
    assert all((qkv is not None) == fused for qkv in dec.qkv)
    seq = ids
    logits = dec(ids, torch.arange(ids.shape[1]))
    pos = torch.tensor([ids.shape[1]])
    for _ in range(NEW):
        torch.testing.assert_close(logits, model(seq).logits[:, -1], atol=1e-4, rtol=1e-4)
        tok = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], 1)
        logits = dec(tok, pos)
        pos = pos + 1

    # (b) the bench's prefill + in-place steps give HF generate's greedy tokens (fresh cache, dirty slots ahead)
    dec = StaticOPTDecoder(model, batch=2, max_len=ids.shape[1] + NEW + 3, fused=fused)
    dec.k.normal_()
    dec.v.normal_()  # unwritten slots must be masked, whatever they hold
    tok, pos = prefill(dec, ids)
    out = [tok.clone()]
    for _ in range(NEW - 1):
        step(dec, tok, pos)
        out.append(tok.clone())
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                         pad_token_id=1)[:, ids.shape[1]:]
    assert torch.equal(torch.cat(out, 1), ref)
    assert torch.equal(seq[:, ids.shape[1]:], ref)
    assert pos.item() == ids.shape[1] + NEW - 1
