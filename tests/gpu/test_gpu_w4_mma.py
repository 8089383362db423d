"""ptqlab's CUDA W4A16 kernel (ptqlab.kernels.w4_mma) against float64 products of the dequantized weight: odd tile
counts, symmetric and asymmetric grids (zero points 0 and 15 included), groups 64/128 and per row, M from 1 to 300
(every token-tile count 1..16 and the unpack + cuBLAS hand-off above MMA_MAX_M), CUDA-graph capture, side streams;
LoRC in the epilogue (ranks 1..33: one and two rank tiles, and the addmm beyond) against the float64 product.

GPU only (``pytest -m gpu tests/gpu/test_gpu_w4_mma.py``); its layout and arithmetic are checked on CPU by
tests/test_w4_mma.py.
"""

from __future__ import annotations

import pytest
import torch

from ptqlab.kernels import w4_mma
from ptqlab.kernels.real import RealLinear, scheme_of
from ptqlab.models import QuantLinear
from ptqlab.quantizers import PER_ROW, QuantSpec, fake_quantize, weight_qparams

DEV = "cuda"
# (k, n): K = 17 x 64 and N = 13 x 16 (no block size divides them), one tile each way, the OPT-6.7B shape
SHAPES = [(4096, 4096), (1088, 208), (64, 16), (2048, 1040)]
MS = [1, 3, 8, 9, 16, 17, 33, 64, 65, 100, 128, 129, 300]


def _needs_kernel() -> None:
    if (why := w4_mma.unavailable()) is not None:
        pytest.skip(f"the W4A16 MMA kernel is not available here: {why}")


def _layer(n: int, k: int, wspec: QuantSpec, seed: int, dtype=torch.float16) -> QuantLinear:
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(n, k, device=DEV, generator=g) * 0.02
    w[0] = w[0].abs() + 1e-3  # all positive / all negative rows: asymmetric zero points 0 and 15
    w[1] = -w[1].abs() - 1e-3
    layer = QuantLinear(w.to(dtype), (torch.randn(n, device=DEV, generator=g) * 0.1).to(dtype), "layer")
    layer.weight_spec = wspec
    layer.set_weight_qparams(*weight_qparams(w, wspec))
    layer.weight.data.copy_(fake_quantize(w, wspec).to(dtype))
    return layer


def test_the_kernel_builds_on_this_gpu():
    # a GPU of compute capability 8.0+ with the CUDA toolkit: the kernel must build (else the suite would skip it
    # silently); nvcc's own message comes through unavailable()
    if torch.cuda.get_device_capability()[0] >= 8 and w4_mma._nvcc() is not None:
        assert w4_mma.unavailable() is None


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("group", [64, 128, PER_ROW])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", MS)
def test_w4a16_mma_matches_the_dequantized_reference(k, n, group, symmetric, m):
    _needs_kernel()
    if group > 0 and k % group:
        pytest.skip("group does not divide K")
    layer = _layer(n, k, QuantSpec(4, symmetric, group), seed=k + n + max(group, 0))
    real = RealLinear(layer, "w4a16-mma")
    x = torch.randn(m, k, device=DEV, generator=torch.Generator(device=DEV).manual_seed(m)).half()
    with torch.no_grad():
        got = real(x).double()
    _assert_close(got, x, real, layer)


def _config_used(real: RealLinear, m: int, rank: int = 0) -> tuple | None:
    """The config the tuning took for this layer at ``m`` tokens (w4_mma.w4a16_mma's key; None: not tuned)."""
    key = (w4_mma.token_tiles(m), real.out_features, real.in_features, real.group, real.w_zero is None, 0, rank)
    return w4_mma._TUNED.get(key)


def _kernel_weight(real: RealLinear, m: int, cfg: tuple | None = None) -> torch.Tensor:
    """The float64 weight the config at ``m`` tokens multiplies by: the exact ``(code - zero) * scale`` where it
    post-scales (the "p" body at 1-16 tokens), else the fp16 weight dequant_mma writes (the layer's own)."""
    cfg = cfg or _config_used(real, m)
    if cfg is not None and w4_mma.post_scaled(cfg, w4_mma.token_tiles(m)):
        codes = w4_mma.unpack_int4_mma_reference(real.w_packed).double()
        scale = real.w_scale.double().repeat_interleave(real.group, 0).t()
        zero = 8.0 if real.w_zero is None else real.w_zero.double().repeat_interleave(real.group, 0).t()
        return (codes - zero) * scale
    return w4_mma.dequant_mma(real.w_packed, real.w_scale, real.w_zero, real.group).double()


def _assert_close(got: torch.Tensor, x: torch.Tensor, real: RealLinear, layer: QuantLinear,
                  cfg: tuple | None = None) -> None:
    """Elementwise against the weight the kernel multiplies by (:func:`_kernel_weight`: the layer's own fp16
    weights, bit for bit the unpacked ones (the test below), or their exact values where the config post-scales)
    in float64: the tensor cores' float32 sums and one fp16 rounding of the output; and norm-wise against the
    fake-quant layer (whose weight used the float32 scale before its rounding to fp16)."""
    w = _kernel_weight(real, x.shape[0], cfg)
    ref = x.double() @ w.t() + layer.bias.double()
    size = x.double().abs() @ w.abs().t()
    err = (got - ref).abs()
    bound = 2.0 ** -10 * ref.abs() + 2.0 ** -15 * size + 1e-6
    assert bool((err <= bound).all()), (float((err - bound).max()), float(err.max()))
    fake = x.double() @ layer.weight.double().t() + layer.bias.double()
    assert float((got - fake).norm() / fake.norm()) < 2e-3


@pytest.mark.parametrize("m", [1, 7, 16, 40, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_config_gives_the_product_and_leaves_the_workspace_zero(m, symmetric):
    # the tuning picks one config per key: here each one runs (row tiles per block, warps, K shares), on a shape
    # where K shares divide unevenly (17 tiles of 64 columns) and the row tiles do not fill the last block
    _needs_kernel()
    k, n = 1088, 208
    layer = _layer(n, k, QuantSpec(4, symmetric, 64), seed=m)
    real = RealLinear(layer, "w4a16-mma")
    x = torch.randn(m, k, device=DEV, generator=torch.Generator(device=DEV).manual_seed(m)).half()
    nt = w4_mma.token_tiles(m)
    ws, cnt = w4_mma.reserve(n, x.device)
    for cfg in w4_mma.CONFIGS[nt] + ([w4_mma.UNPACK] if nt >= 4 else []):
        w4_mma._TUNED[(nt, n, k, 64, symmetric, 0, 0)] = cfg
        with torch.no_grad():
            got = real(x).double()
        torch.cuda.synchronize()
        _assert_close(got, x, real, layer, None if cfg == w4_mma.UNPACK else cfg)
        assert not bool(ws.any()) and not bool(cnt.any()), cfg  # (the split-K sums and tickets, reset)
    w4_mma._TUNED.pop((nt, n, k, 64, symmetric, 0, 0))


@pytest.mark.parametrize("m", [1, 33, 128])
@pytest.mark.parametrize("group", [128, PER_ROW])
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_pipelined_config_gives_the_product_for_larger_groups(m, group, symmetric):
    # the "p" body stages each k-tile's scales (and zero points) by group: groups of two tiles and one a row, on
    # 65 row tiles (no block of 16 R warps rows divides them) and 32 k-tiles (K shares of 2 up to 16 tiles)
    _needs_kernel()
    k, n = 2048, 1040
    layer = _layer(n, k, QuantSpec(4, symmetric, group), seed=m + group)
    real = RealLinear(layer, "w4a16-mma")
    x = torch.randn(m, k, device=DEV, generator=torch.Generator(device=DEV).manual_seed(m)).half()
    nt, g = w4_mma.token_tiles(m), (k if group == PER_ROW else group)
    ws, cnt = w4_mma.reserve(n, x.device)
    key = (nt, n, k, g, symmetric, 0, 0)
    for cfg in [c for c in w4_mma.CONFIGS[nt] if c[0] in ("p", "p2")]:
        w4_mma._TUNED[key] = cfg
        with torch.no_grad():
            got = real(x).double()
        torch.cuda.synchronize()
        _assert_close(got, x, real, layer, cfg)
        assert not bool(ws.any()) and not bool(cnt.any()), cfg
    w4_mma._TUNED.pop(key)


def _with_lorc(layer: QuantLinear, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    u = (torch.randn(layer.out_features, rank, device=DEV, generator=g) * 0.1).half()
    v = (torch.randn(rank, layer.in_features, device=DEV, generator=g) * 0.02).half()
    layer.set_lorc(u, v)
    return u, v


def _assert_close_lorc(got: torch.Tensor, x: torch.Tensor, real: RealLinear, layer: QuantLinear,
                       in_kernel: bool) -> None:
    """As :func:`_assert_close`, the reference plus ``(x V^T) U^T`` in float64. In the kernel, t = x V^T and
    U t are float32 sums before the output's one rounding; after it (``addmm``), t and the sum are rounded to fp16
    as well (a looser bound). The weight: :func:`_kernel_weight` of the config that ran (LoRC's own key in the
    kernel, the plain one before an ``addmm``)."""
    u, v = layer.lorc_u.double(), layer.lorc_v.double()
    w = _kernel_weight(real, x.shape[0], _config_used(real, x.shape[0], u.shape[1] if in_kernel else 0))
    xd = x.double()
    ref = xd @ w.t() + layer.bias.double() + (xd @ v.t()) @ u.t()
    size = xd.abs() @ w.abs().t()
    lsize = (xd.abs() @ v.abs().t()) @ u.abs().t()
    err = (got - ref).abs()
    if in_kernel:
        bound = 2.0 ** -10 * ref.abs() + 2.0 ** -15 * (size + lsize) + 1e-6
    else:
        bound = 2.0 ** -9 * ref.abs() + 2.0 ** -15 * size + 2.0 ** -10 * lsize + 1e-5
    assert bool((err <= bound).all()), (float((err - bound).max()), float(err.max()))
    fake = xd @ layer.weight.double().t() + layer.bias.double() + (xd @ v.t()) @ u.t()
    assert float((got - fake).norm() / fake.norm()) < 2e-3


@pytest.mark.parametrize(("k", "n"), [(1088, 208), (4096, 4096), (64, 16)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rank", [1, 8, 16, 17, 24, 32, 33])
@pytest.mark.parametrize("m", [1, 5, 8, 9, 16, 17, 64, 129])
def test_lorc_in_the_kernel_matches_the_dequantized_reference(k, n, symmetric, rank, m):
    # 1..16 tokens and rank <= 32: in the kernel's epilogue (one and two rank tiles, ranks that fill neither);
    # more tokens or rank 33: the kernel, then an addmm
    _needs_kernel()
    layer = _layer(n, k, QuantSpec(4, symmetric, 64), seed=k + rank)
    _with_lorc(layer, rank, seed=m + rank)
    real = RealLinear(layer, "w4a16-mma")
    x = torch.randn(m, k, device=DEV, generator=torch.Generator(device=DEV).manual_seed(m)).half()
    with torch.no_grad():
        got = real(x).double()
    in_kernel = m <= 16 and rank <= w4_mma.LORC_MAX_RANK
    _assert_close_lorc(got, x, real, layer, in_kernel)


@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("rank", [8, 24])
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_lorc_config_gives_the_product_and_leaves_the_workspace_zero(m, rank, symmetric):
    _needs_kernel()
    k, n = 1088, 208
    layer = _layer(n, k, QuantSpec(4, symmetric, 64), seed=m)
    _with_lorc(layer, rank, seed=rank)
    real = RealLinear(layer, "w4a16-mma")
    x = torch.randn(m, k, device=DEV, generator=torch.Generator(device=DEV).manual_seed(m)).half()
    nt = w4_mma.token_tiles(m)
    ws, cnt = w4_mma.reserve(n, x.device)
    configs = w4_mma.lorc_configs(nt)
    assert configs and all(c[0] == "k" for c in configs)
    for cfg in configs:
        w4_mma._TUNED[(nt, n, k, 64, symmetric, 0, rank)] = cfg
        with torch.no_grad():
            got = real(x).double()
        torch.cuda.synchronize()
        _assert_close_lorc(got, x, real, layer, in_kernel=True)
        assert not bool(ws.any()) and not bool(cnt.any()), cfg
        tw, tc = w4_mma.lorc_workspace(x.device)
        assert not bool(tw.any()) and not bool(tc.any()), cfg  # (t and its counters, reset by the last writer)
    w4_mma._TUNED.pop((nt, n, k, 64, symmetric, 0, rank))


@pytest.mark.parametrize("m", [1, 16])
def test_lorc_in_a_cuda_graph_and_bad_factors_refused(m):
    # replayed many times: each call leaves t and its counters zero for the next (a left-over would add up)
    _needs_kernel()
    layer = _layer(2048, 1088, QuantSpec(4, True, 64), seed=3)
    _with_lorc(layer, 8, seed=3)
    real = RealLinear(layer, "w4a16-mma")
    x = torch.randn(m, 1088, device=DEV).half()
    w4_mma._TUNED.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        for _ in range(3):
            y = real(x)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    _assert_close_lorc(y.double(), x, real, layer, in_kernel=True)
    tw, tc = w4_mma.lorc_workspace(x.device)
    assert not bool(tw.any()) and not bool(tc.any())
    with pytest.raises(ValueError, match="LoRC's fp16 V"):
        w4_mma.w4a16_mma(x, real.w_packed, real.w_scale, None, 64, lorc=(layer.lorc_v.float(), layer.lorc_u))
    with pytest.raises(ValueError, match="LoRC's fp16 V"):
        w4_mma.w4a16_mma(x, real.w_packed, real.w_scale, None, 64, lorc=(layer.lorc_v[:, :64], layer.lorc_u))


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_unpacked_weight_is_the_fake_quant_weight_bit_for_bit(k, n, symmetric):
    _needs_kernel()
    layer = _layer(n, k, QuantSpec(4, symmetric, 64), seed=n)
    real = RealLinear(layer, "w4a16-mma")
    w = w4_mma.dequant_mma(real.w_packed, real.w_scale, real.w_zero, real.group)
    # the reference from the stored fp16 scales: (code - zero) * scale in float32, one rounding
    codes = w4_mma.unpack_int4_mma_reference(real.w_packed).float()
    z = 8.0 if real.w_zero is None else real.w_zero.t().float().repeat_interleave(64, 1)
    want = ((codes - z) * real.w_scale.t().float().repeat_interleave(64, 1)).half()
    assert torch.equal(w, want)
    # and the fake-quant layer's weight, up to its float32 scale's rounding to the stored fp16 one
    assert float((w.float() - layer.weight.float()).abs().max()) <= float(layer.weight.float().abs().max()) * 2e-3


def test_selection_takes_the_mma_kernel_for_fp16_and_the_triton_kernels_otherwise():
    _needs_kernel()
    layer = _layer(1040, 2048, QuantSpec(4, True, 128), seed=1)
    assert scheme_of(layer) == "w4a16-mma"
    assert scheme_of(_layer(1040, 2048, QuantSpec(4, True, 32), seed=1)) == "w4a16-triton"
    assert scheme_of(_layer(1040, 2048, QuantSpec(4, True, 128), seed=1, dtype=torch.bfloat16)) == "w4a16-triton"
    layer.set_lorc(torch.zeros(1040, 8, device=DEV, dtype=torch.float16),
                   torch.zeros(8, 2048, device=DEV, dtype=torch.float16))
    assert scheme_of(layer) == "w4a16-mma"  # LoRC: in its epilogue (1..16 tokens) or an addmm after it


@pytest.mark.parametrize("m", [1, 16, 100])
def test_the_kernel_agrees_with_the_triton_kernels(m):
    _needs_kernel()
    layer = _layer(4096, 4096, QuantSpec(4, False, 128), seed=m)
    x = torch.randn(m, 4096, device=DEV).half()
    with torch.no_grad():
        a, b = RealLinear(layer, "w4a16-mma")(x).float(), RealLinear(layer, "w4a16-triton")(x).float()
    assert float((a - b).norm() / b.norm()) < 1e-3


@pytest.mark.parametrize("m", [1, 24])
def test_a_cuda_graph_captures_and_replays_it_on_a_side_stream(m):
    _needs_kernel()
    layer = _layer(2048, 1088, QuantSpec(4, True, 64), seed=m)
    real = RealLinear(layer, "w4a16-mma")
    x = torch.randn(m, 1088, device=DEV).half()
    w4_mma._TUNED.clear()  # the first call inside the capture: no tuning there, the default config
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y = real(x)
    x.copy_(torch.randn(m, 1088, device=DEV).half())
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        eager = real(x)  # tuned now; every config gives the same sums up to float32 order
    assert float((y.float() - eager.float()).norm() / eager.float().norm()) < 1e-3
    side = torch.cuda.Stream()
    with torch.no_grad(), torch.cuda.stream(side):
        again = real(x)
    side.synchronize()
    assert float((again.float() - eager.float()).norm() / eager.float().norm()) < 1e-3


def test_bad_input_is_refused_with_a_clear_error():
    _needs_kernel()
    real = RealLinear(_layer(64, 128, QuantSpec(4, True, 64), seed=2), "w4a16-mma")
    with pytest.raises(ValueError, match="fp16 x"):
        w4_mma.w4a16_mma(torch.zeros(2, 128, device=DEV), real.w_packed, real.w_scale, None, 64)
    with pytest.raises(ValueError, match="fp16 x"):
        w4_mma.w4a16_mma(torch.zeros(2, 192, device=DEV).half(), real.w_packed, real.w_scale, None, 64)
