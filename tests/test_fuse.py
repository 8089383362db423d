"""ptqlab.kernels.fuse (linears reading one input as one wider linear) and the add + LayerNorm of the decoder, on the
CPU: the fused layer computes the concatenation of the layers' outputs, the layers' weights become views of the
fused one's rows (one copy), and layers that cannot fuse say so (None) instead of computing something else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptqlab.kernels.fuse import fuse_linears
from ptqlab.kernels.layer_norm import add_layer_norm
from ptqlab.models import QuantLinear
from ptqlab.quantizers import QuantSpec, fake_quantize, weight_qparams


def _linears(outs=(24, 8, 16), k=32, bias=(True, True, True), seed=0) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(k, n, bias=b) for n, b in zip(outs, bias)]


@pytest.mark.parametrize("bias", [(True, True, True), (False, False, False), (True, False, True)])
@torch.no_grad()
def test_fused_linears_give_the_concatenated_outputs_over_one_copy_of_the_weight(bias):
    layers = _linears(bias=bias)
    x = torch.randn(2, 5, 32)
    ref = torch.cat([layer(x) for layer in layers], -1)
    fused = fuse_linears(layers)
    assert fused.weight.shape == (48, 32) and (fused.bias is None) == (not any(bias))
    torch.testing.assert_close(fused(x), ref, rtol=1e-6, atol=1e-6)
    # each layer's weight is now its rows of the fused weight: same storage, same values, layers still work
    storage = fused.weight.untyped_storage().data_ptr()
    assert all(layer.weight.untyped_storage().data_ptr() == storage for layer in layers)
    torch.testing.assert_close(torch.cat([layer(x) for layer in layers], -1), ref, rtol=0, atol=0)
    fused.weight[:24].zero_()  # (a write through the fused weight is the q layer's)
    assert float(layers[0].weight.abs().max()) == 0.0


@torch.no_grad()
def test_unquantized_quant_linears_fuse_and_quantized_ones_do_not():
    layers = [QuantLinear(m.weight.data, m.bias.data, f"l{i}") for i, m in enumerate(_linears())]
    x = torch.randn(3, 32)
    ref = torch.cat([layer(x) for layer in layers], -1)
    torch.testing.assert_close(fuse_linears(layers)(x), ref, rtol=1e-6, atol=1e-6)
    layers[1].weight_spec = QuantSpec(4, True, 0)  # fake-quantized: not a plain linear any more
    assert fuse_linears(layers) is None
    layers[1].weight_spec = QuantSpec()
    layers[2].act_spec = QuantSpec(8, True, 0)  # quantizes its input: not either
    assert fuse_linears(layers) is None


def test_layers_of_different_inputs_or_dtypes_or_alone_do_not_fuse():
    assert fuse_linears(_linears(outs=(8,))) is None
    assert fuse_linears([nn.Linear(32, 8), nn.Linear(16, 8)]) is None
    assert fuse_linears([nn.Linear(32, 8), nn.Linear(32, 8).double()]) is None


def _real_mma(n: int, k: int, symmetric: bool, group: int, seed: int):
    from ptqlab.kernels.real import RealLinear

    spec = QuantSpec(4, symmetric, group)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    layer = QuantLinear(w.clone(), torch.randn(n) * 0.1, f"l{seed}")
    layer.weight_spec = spec
    layer.set_weight_qparams(*weight_qparams(w, spec))
    layer.weight.data.copy_(fake_quantize(w, spec))
    return RealLinear(layer, "w4a16-mma", keep_original=False)


@pytest.mark.parametrize("symmetric", [True, False])
def test_real_mma_layers_fuse_into_one_packed_layer_over_their_rows(symmetric):
    # (the build runs on the CPU; the forward needs the GPU: tests/gpu/test_gpu_fuse.py)
    from ptqlab.kernels.w4_mma import unpack_int4_mma_reference

    layers = [_real_mma(n, 128, symmetric, 64, seed) for seed, n in enumerate((32, 16, 48))]
    codes = [unpack_int4_mma_reference(layer.w_packed) for layer in layers]
    fused = fuse_linears(layers)
    assert fused.scheme == "w4a16-mma" and fused.out_features == 96 and fused.in_features == 128
    assert fused.name == "l0+l1+l2" and fused.group == 64 and fused.original is None
    assert torch.equal(unpack_int4_mma_reference(fused.w_packed), torch.cat(codes))
    assert torch.equal(fused.w_scale, torch.cat([layer.w_scale for layer in layers], 1))
    assert (fused.w_zero is None) == symmetric
    if not symmetric:
        assert torch.equal(fused.w_zero, torch.cat([layer.w_zero for layer in layers], 1))
    assert torch.equal(fused.bias, torch.cat([layer.bias for layer in layers]))
    # the packed weight is one copy: the layers' are its row tiles, and unpack as before
    storage = fused.w_packed.untyped_storage().data_ptr()
    assert all(layer.w_packed.untyped_storage().data_ptr() == storage for layer in layers)
    assert all(torch.equal(unpack_int4_mma_reference(layer.w_packed), c) for layer, c in zip(layers, codes))


def test_real_layers_of_different_grids_do_not_fuse():
    assert fuse_linears([_real_mma(32, 128, True, 64, 0), _real_mma(32, 128, True, 128, 1)]) is None  # groups
    assert fuse_linears([_real_mma(32, 128, True, 64, 0), _real_mma(32, 128, False, 64, 1)]) is None  # zeros
    assert fuse_linears([_real_mma(32, 128, True, 64, 0), _linears(outs=(8,), k=128)[0]]) is None  # kinds


def test_lorc_factors_fuse_exactly_stacked_and_block_diagonal():
    from ptqlab.kernels.real import RealLinear

    layers = []
    for seed, n in enumerate((16, 8)):  # w8a8-int8: a backend that fuses and adds LoRC as a side product
        w = torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))
        layer = QuantLinear(w, None, f"l{seed}")
        layer.weight_spec, layer.act_spec = QuantSpec(8, True, 0), QuantSpec(8, True, 0)
        layer.set_weight_qparams(*weight_qparams(w, layer.weight_spec))
        layer.weight.data.copy_(fake_quantize(w, layer.weight_spec))
        layer.set_lorc(torch.randn(n, 3 + seed), torch.randn(3 + seed, 32))
        layers.append(RealLinear(layer, "w8a8-int8", keep_original=False))
    fused = fuse_linears(layers)
    assert fused.lorc_v.shape == (7, 32) and fused.lorc_u.shape == (24, 7)
    x = torch.randn(5, 32, dtype=torch.float64)
    ref = torch.cat([x @ layer.lorc_v.double().t() @ layer.lorc_u.double().t() for layer in layers], -1)
    torch.testing.assert_close(x @ fused.lorc_v.double().t() @ fused.lorc_u.double().t(), ref)
    assert torch.equal(fused.w_int8, torch.cat([layer.w_int8 for layer in layers]))


@pytest.mark.parametrize("with_delta", [True, False])
def test_add_layer_norm_off_the_gpu_is_torch_add_then_norm(with_delta):
    ln = nn.LayerNorm(48)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x, d = torch.randn(2, 3, 48), torch.randn(2, 3, 48)
    s, y = add_layer_norm(x, d if with_delta else None, ln)
    ref = x + d if with_delta else x
    torch.testing.assert_close(s, ref, rtol=0, atol=0)
    torch.testing.assert_close(y, ln(ref), rtol=0, atol=0)


def test_add_layer_norm_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        add_layer_norm(torch.randn(2, 8), torch.randn(2, 4), nn.LayerNorm(8))
    with pytest.raises(ValueError, match="LayerNorm over 6"):
        add_layer_norm(torch.randn(2, 8), None, nn.LayerNorm(6))


def _attention_operands_by_torch_ops(qkv, pos, k_cache, v_cache, heads, scaling):
    """What the decoder did before kernels.kv_write: split, scale q, two index_copy_ into the caches."""
    b, t, width = qkv.shape
    d = width // (3 * heads)
    q, k, v = qkv.split(heads * d, dim=-1)

    def split_heads(y):
        return y.view(b, t, heads, d).transpose(1, 2)

    k_cache.index_copy_(2, pos, split_heads(k))
    v_cache.index_copy_(2, pos, split_heads(v))
    return split_heads(q * scaling)


@pytest.mark.parametrize(("b", "t", "heads", "d"), [(1, 1, 4, 8), (3, 5, 2, 80), (2, 1, 32, 128)])
def test_qkv_to_cache_off_the_gpu_is_the_split_the_scaling_and_the_cache_writes(b, t, heads, d):
    from ptqlab.kernels.kv_write import qkv_to_cache

    g = torch.Generator().manual_seed(b + t + d)
    qkv = torch.randn(b, t, 3 * heads * d, generator=g)
    length = 11
    pos = torch.randperm(length, generator=g)[:t]
    caches = [torch.randn(b, heads, length, d, generator=g) for _ in range(2)]
    want_k, want_v = caches[0].clone(), caches[1].clone()
    want_q = _attention_operands_by_torch_ops(qkv, pos, want_k, want_v, heads, 0.125)
    q = qkv_to_cache(qkv, pos, caches[0], caches[1], heads, 0.125)
    assert torch.equal(q, want_q) and torch.equal(caches[0], want_k) and torch.equal(caches[1], want_v)


def test_qkv_to_cache_refuses_mismatched_shapes():
    from ptqlab.kernels.kv_write import qkv_to_cache

    cache = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="q, k and v of 4 heads"):
        qkv_to_cache(torch.zeros(1, 1, 95), torch.zeros(1, dtype=torch.long), cache, cache.clone(), 4, 1.0)
    with pytest.raises(ValueError, match=r"caches \[1, 4, L, 8\]"):
        qkv_to_cache(torch.zeros(1, 1, 96), torch.zeros(1, dtype=torch.long), torch.zeros(1, 4, 8, 16),
                     cache, 4, 1.0)
