"""ptqlab's CUDA W4A8 kernel (ptqlab.kernels.w4a8_mma) against float64 products of the dequantized int8 input
and 4-bit weight: odd tile counts, M from 1 to 300 (every token-tile count and the int8 unpack + Triton int8 GEMM
above MMA_MAX_M), every config, the grid's edges, CUDA-graph capture on a side stream, agreement with the Triton W4A8
kernel.  GPU only (``pytest -m gpu tests/gpu/test_gpu_w4a8_mma.py``); its register arithmetic is checked on CPU
by tests/test_w4a8_mma.py.
"""

from __future__ import annotations

import pytest
import torch

from ptqlab.kernels import w4_mma, w4a8_mma
from ptqlab.kernels.real import RealLinear, scheme_of
from ptqlab.kernels.w4_mma import unpack_int4_mma_reference
from ptqlab.models import QuantLinear
from ptqlab.quantizers import PER_ROW, QuantSpec, fake_quantize, weight_qparams

act_quant = pytest.importorskip("ptqlab.kernels.act_quant", reason="Triton (CUDA installs only)")
quantize_int8_rows = act_quant.quantize_int8_rows
DEV = "cuda"
A8 = QuantSpec(8, True, PER_ROW)
W4 = QuantSpec(4, True, PER_ROW)
SHAPES = [(4096, 4096), (1088, 208), (64, 16), (2048, 1040)]  # (k, n): no block size divides 17 x 64, 13 x 16
MS = [1, 3, 8, 9, 16, 17, 33, 64, 65, 100, 128, 129, 300]


def _needs_kernel() -> None:
    if (why := w4_mma.unavailable()) is not None:
        pytest.skip(f"the MMA kernels are not available here: {why}")


def _layer(n: int, k: int, seed: int) -> QuantLinear:
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(n, k, device=DEV, generator=g) * 0.02
    w[0, : k // 2] = w[0].abs().max()  # the grid's edges: codes 15 and 0 (16 (code - 8) = 112 and -128)
    w[0, k // 2:] = -w[0].abs().max()
    layer = QuantLinear(w.half(), (torch.randn(n, device=DEV, generator=g) * 0.1).half(), "layer")
    layer.weight_spec, layer.act_spec = W4, A8
    layer.set_weight_qparams(*weight_qparams(w, W4))
    layer.weight.data.copy_(fake_quantize(w, W4).half())
    return layer


def _input(m: int, k: int, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, device=DEV, generator=torch.Generator(device=DEV).manual_seed(seed))
    x[:, 0] = x.abs().amax(dim=1) * 3  # a large value a token: codes -128..127 used at both ends
    x[:, 1] = -x[:, 0]
    return x.half()


def _assert_close(got: torch.Tensor, x: torch.Tensor, real: RealLinear, layer: QuantLinear) -> None:
    """Elementwise against float64 (codes x scale) products: exact int32 sums, float32 scaling, split-K's float32
    additions and one fp16 rounding of the output; norm-wise against the fake-quant layer."""
    codes, sx = quantize_int8_rows(x, A8)
    xq = codes.double() * sx.double()[:, None]
    w = (unpack_int4_mma_reference(real.w_packed).double() - 8) * real.w_scale.double()[:, None]
    ref = xq @ w.t() + layer.bias.double()
    size = xq.abs() @ w.abs().t()
    err = (got.double() - ref).abs()
    bound = 2.0 ** -10 * ref.abs() + 2.0 ** -20 * size + 1e-6
    assert bool((err <= bound).all()), (float((err - bound).max()), float(err.max()))
    fake = xq @ layer.weight.double().t() + layer.bias.double()
    assert float((got.double() - fake).norm() / fake.norm()) < 2e-3


def test_selection_takes_the_mma_kernel_for_fp16_w4a8():
    _needs_kernel()
    assert scheme_of(_layer(64, 128, 0)) == "w4a8-mma"


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("m", MS)
def test_w4a8_mma_matches_the_dequantized_reference(k, n, m):
    _needs_kernel()
    layer = _layer(n, k, seed=k + n)
    real = RealLinear(layer, "w4a8-mma")
    x = _input(m, k, seed=m)
    with torch.no_grad():
        got = real(x)
    assert got.dtype == torch.float16 and got.shape == (m, n)
    _assert_close(got, x, real, layer)


@pytest.mark.parametrize("m", [1, 7, 16, 17, 40, 64, 100, 128])
def test_every_config_gives_the_product_and_leaves_the_workspace_zero(m):
    # each config once (row tiles a warp, warps, K shares) on a shape where the K shares divide unevenly (17 tiles
    # of 64 columns) and the row tiles do not fill the last block
    _needs_kernel()
    k, n = 1088, 208
    layer = _layer(n, k, seed=m)
    real = RealLinear(layer, "w4a8-mma")
    x = _input(m, k, seed=m)
    nt = w4_mma.token_tiles(m)
    ws, cnt = w4_mma.reserve(n, x.device)
    key = (nt, n, k, 0)
    for cfg in w4a8_mma.CONFIGS[nt] + ([w4a8_mma.UNPACK] if nt >= 4 else []):
        w4a8_mma._TUNED[key] = cfg
        with torch.no_grad():
            got = real(x)
        torch.cuda.synchronize()
        _assert_close(got, x, real, layer)
        assert not bool(ws.any()) and not bool(cnt.any()), cfg  # (the split-K sums and tickets, reset)
    w4a8_mma._TUNED.pop(key)


@pytest.mark.parametrize("m", [1, 16, 40, 300])
@pytest.mark.parametrize("rank", [1, 8, 40])
def test_lorc_adds_its_product_on_the_quantized_input(m, rank):
    # the fake-quant layer (and w4a8-triton's in-kernel LoRC) apply LoRC to the quantized input: so does this one,
    # given explicitly (the selection sends LoRC layers to w4a8-triton: faster in decoding, session 37 call 4)
    _needs_kernel()
    k, n = 1088, 208
    layer = _layer(n, k, seed=rank)
    g = torch.Generator(device=DEV).manual_seed(rank + m)
    u = (torch.randn(n, rank, device=DEV, generator=g) * 0.1).half()
    v = (torch.randn(rank, k, device=DEV, generator=g) * 0.02).half()
    layer.set_lorc(u, v)
    assert scheme_of(layer) == "w4a8-triton"
    real = RealLinear(layer, "w4a8-mma")
    x = _input(m, k, seed=m)
    with torch.no_grad():
        got = real(x).double()
    codes, sx = quantize_int8_rows(x, A8)
    xq = codes.double() * sx.double()[:, None]
    w = (unpack_int4_mma_reference(real.w_packed).double() - 8) * real.w_scale.double()[:, None]
    ref = xq @ w.t() + layer.bias.double() + (xq @ v.double().t()) @ u.double().t()
    assert float((got - ref).norm() / ref.norm()) < 2e-3
    if rank <= 8:  # (the ranks the Triton kernel's in-kernel LoRC is tested at: tests/gpu/test_gpu_w4_gemm.py)
        with torch.no_grad():
            triton = RealLinear(layer, "w4a8-triton")(x).double()
        assert float((got - triton).norm() / triton.norm()) < 2e-3


@pytest.mark.parametrize(("k", "n"), [(1088, 208), (64, 16)])
def test_the_int8_unpack_is_the_codes_minus_eight(k, n):
    _needs_kernel()
    real = RealLinear(_layer(n, k, seed=5), "w4a8-mma")
    got = w4a8_mma.unpack_int8(real.w_packed)
    assert torch.equal(got.cpu(), (unpack_int4_mma_reference(real.w_packed).to(torch.int16) - 8).to(torch.int8).cpu())


@pytest.mark.parametrize("m", [1, 40, 128])
def test_the_kernel_agrees_with_the_triton_w4a8_kernel(m):
    _needs_kernel()
    layer = _layer(4096, 4096, seed=m)
    x = _input(m, 4096, seed=m + 1)
    with torch.no_grad():
        a, b = RealLinear(layer, "w4a8-mma")(x).float(), RealLinear(layer, "w4a8-triton")(x).float()
    assert float((a - b).norm() / b.norm()) < 1e-3


@pytest.mark.parametrize("m", [1, 24])
def test_a_cuda_graph_captures_and_replays_it_on_a_side_stream(m):
    _needs_kernel()
    layer = _layer(2048, 1088, seed=m)
    real = RealLinear(layer, "w4a8-mma")
    x = _input(m, 1088, seed=m)
    w4a8_mma._TUNED.clear()  # the first call inside the capture: no tuning there, the default config
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y = real(x)
    x.copy_(_input(m, 1088, seed=m + 7))
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        eager = real(x.clone())  # tuned now (a new tensor: no cached quantization of the old values)
    assert float((y.float() - eager.float()).norm() / eager.float().norm()) < 1e-3
    side = torch.cuda.Stream()
    with torch.no_grad(), torch.cuda.stream(side):
        again = real(x.clone())
    side.synchronize()
    assert float((again.float() - eager.float()).norm() / eager.float().norm()) < 1e-3


def test_bad_input_is_refused_with_a_clear_error():
    _needs_kernel()
    real = RealLinear(_layer(64, 128, seed=2), "w4a8-mma")
    codes = torch.zeros(2, 128, dtype=torch.int8, device=DEV)
    with pytest.raises(ValueError, match="int8 codes"):
        w4a8_mma.w4a8_mma(codes.half(), torch.ones(2, device=DEV), real.w_packed, real.w_scale)
    with pytest.raises(ValueError, match="float32 scales"):
        w4a8_mma.w4a8_mma(codes, torch.ones(3, device=DEV), real.w_packed, real.w_scale)
