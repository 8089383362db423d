"""The decoder's fusions on a GPU: the add + LayerNorm Triton kernel against float64 and against torch's two ops;
q/k/v real W4A16 layers fused into one MMA layer against the three run one by one; the q/k/v split + KV cache
write kernel against torch's ops; the fused decoder against the plain one on the trained testbed (FP16 and real
W4A16 kernels)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptqlab.kernels import w4_mma
from ptqlab.kernels.fuse import fuse_linears
from ptqlab.kernels.layer_norm import add_layer_norm
from ptqlab.kernels.real import RealLinear
from ptqlab.models import QuantLinear
from ptqlab.quantizers import QuantSpec, fake_quantize, weight_qparams

DEV = "cuda"


def _ln(c: int, dtype: torch.dtype, seed: int) -> nn.LayerNorm:
    g = torch.Generator(device=DEV).manual_seed(seed)
    ln = nn.LayerNorm(c, eps=1e-5, device=DEV, dtype=dtype)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(c, device=DEV, generator=g) * 0.5 + 1)
        ln.bias.copy_(torch.randn(c, device=DEV, generator=g) * 0.1)
    return ln


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (16, 4096), (3, 1000), (2, 1024, 768), (1, 9, 16384)])
@pytest.mark.parametrize("with_delta", [True, False])
@torch.no_grad()
def test_add_layer_norm_matches_float64_and_torch(shape, dtype, with_delta):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = (torch.randn(shape, device=DEV, generator=g) * 3 + 1).to(dtype)
    d = (torch.randn(shape, device=DEV, generator=g) * 2).to(dtype)
    ln = _ln(shape[-1], dtype, 1)
    s, y = add_layer_norm(x, d if with_delta else None, ln)
    ref_s = x + d if with_delta else x
    assert torch.equal(s, ref_s)  # the residual: the separate add's rounding, bit for bit
    # the norm in float64 from the rounded sum: the kernel's float32 is within the output dtype's rounding
    r = ref_s.double()
    ref = (r - r.mean(-1, keepdim=True)) / torch.sqrt(r.var(-1, unbiased=False, keepdim=True) + ln.eps)
    ref = ref * ln.weight.double() + ln.bias.double()
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}[dtype]
    assert float((y.double() - ref).abs().max()) <= tol * float(ref.abs().max())
    torch.testing.assert_close(y, ln(ref_s))  # and torch's own LayerNorm, at its dtype's tolerance


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("b", "t", "heads", "d"), [(1, 1, 32, 128), (16, 1, 32, 128), (2, 7, 32, 80), (1, 3, 4, 16)])
@torch.no_grad()
def test_qkv_to_cache_kernel_writes_what_the_torch_ops_write(b, t, heads, d, dtype):
    # the scaled q bit for bit as torch's q * scaling, k and v copied into the cache at the positions (the other
    # slots untouched), head dims that are not a power of two (OPT-2.7B: 80)
    from ptqlab.kernels.kv_write import qkv_to_cache

    g = torch.Generator(device=DEV).manual_seed(b * t + d)
    qkv = (torch.randn(b, t, 3 * heads * d, device=DEV, generator=g) * 4).to(dtype)
    length = 40
    pos = torch.randperm(length, device=DEV, generator=g)[:t]
    k_cache = torch.randn(b, heads, length, d, device=DEV, generator=g).to(dtype)
    v_cache = torch.randn_like(k_cache)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    split = qkv.split(heads * d, dim=-1)
    want_k.index_copy_(2, pos, split[1].view(b, t, heads, d).transpose(1, 2))
    want_v.index_copy_(2, pos, split[2].view(b, t, heads, d).transpose(1, 2))
    want_q = split[0].view(b, t, heads, d).transpose(1, 2) * d ** -0.5
    q = qkv_to_cache(qkv, pos, k_cache, v_cache, heads, d ** -0.5)
    assert torch.equal(q, want_q) and torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_add_layer_norm_inside_a_cuda_graph():
    x = torch.randn(4, 4096, device=DEV, dtype=torch.float16)
    d = torch.randn_like(x)
    ln = _ln(4096, torch.float16, 2)
    add_layer_norm(x, d, ln)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s, y = add_layer_norm(x, d, ln)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, ln(x + d))
    assert torch.equal(s, x + d)


def _real(n: int, k: int, spec: QuantSpec, seed: int, lorc_rank: int = 0) -> RealLinear:
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(n, k, device=DEV, generator=g) * 0.02
    layer = QuantLinear(w.half(), (torch.randn(n, device=DEV, generator=g) * 0.1).half(), f"l{seed}")
    layer.weight_spec = spec
    layer.set_weight_qparams(*weight_qparams(w, spec))
    layer.weight.data.copy_(fake_quantize(w, spec).half())
    if lorc_rank:
        layer.set_lorc((torch.randn(n, lorc_rank, device=DEV, generator=g) * 0.1).half(),
                       (torch.randn(lorc_rank, k, device=DEV, generator=g) * 0.02).half())
    return RealLinear(layer, "w4a16-mma", keep_original=False)


@pytest.mark.parametrize("lorc_rank", [0, 8], ids=["plain", "lorc8"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 5, 16, 64, 200])
@torch.no_grad()
def test_fused_mma_layers_equal_the_layers_one_by_one(m, symmetric, lorc_rank):
    # with LoRC rank 8 the fused layer's rank is 24 (stacked V, block-diagonal U): the kernel's second rank tile
    if (why := w4_mma.unavailable()) is not None:
        pytest.skip(f"the W4A16 MMA kernel is not available here: {why}")
    spec = QuantSpec(4, symmetric, 128)
    layers = [_real(n, 1024, spec, seed, lorc_rank) for seed, n in enumerate((1024, 256, 512))]
    x = torch.randn(m, 1024, device=DEV, dtype=torch.float16)
    ref = torch.cat([layer(x) for layer in layers], -1)
    fused = fuse_linears(layers)
    assert fused is not None and fused.scheme == "w4a16-mma"
    y = fused(x)
    # the same products; only the float32 summation order may differ (another split of K tuned for the wider N,
    # and split K adds its shares with atomics in whatever order they arrive: not bit-reproducible run to run)
    tol = 2e-3 * float(ref.float().abs().max())
    assert float((y.float() - ref.float()).abs().max()) <= tol
    again = torch.cat([layer(x) for layer in layers], -1)  # the layers over their views of the fused weight
    assert float((again.float() - ref.float()).abs().max()) <= tol


@pytest.mark.parametrize("real", [False, True], ids=["fp16", "w4a16-real"])
@torch.no_grad()
def test_fused_decoder_gives_the_plain_decoders_logits_on_the_testbed(real):
    from ptqlab.kernels.real import select_kernels
    from ptqlab.models import load_model, wrap_linears
    from ptqlab.speed import make_decoder

    model, _ = load_model("testbed-opt", torch.float16)
    model.to(DEV).eval()
    if real:
        spec = QuantSpec(4, True, 128)
        for layer in wrap_linears(model.model.decoder).values():
            layer.weight_spec = spec
            layer.set_weight_qparams(*weight_qparams(layer.weight.float(), spec))
            layer.weight.data.copy_(fake_quantize(layer.weight.float(), spec).half())
        summary = select_kernels(model, "real", DEV, keep_original=False)
        assert sum(summary["real"].values()) == 36
    logits = {}
    for fused in (False, True):
        dec, ids = make_decoder(model, 4, 64, 8, fused)
        assert all((q is not None) == fused for q in dec.qkv)
        logits[fused] = dec(ids, torch.arange(64, device=DEV)).float()
    scale = float(logits[False].abs().max())
    assert float((logits[True] - logits[False]).abs().max()) <= 2e-2 * scale
    assert (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean() >= 0.75
