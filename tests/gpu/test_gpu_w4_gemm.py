"""ptqlab's own Triton kernels (ptqlab.kernels.w4_gemm, the FP8 path) against float64 products of the dequantized
weight: odd shapes, symmetric and asymmetric grids (zero points 0 and 15 included), groups 32/64/128 and per row,
M from 1 to 256 (every dispatch: GEMV, split-K GEMM, swapped-operand GEMM, unpack + cuBLAS; one autotune config per
shape, rotating over the configs: the ``_one_config_per_key`` fixture).

On a GPU: ``pytest -m gpu tests/gpu``.  Without one, the same tests run on small shapes in Triton's interpreter:
``TRITON_INTERPRET=1 PYTHONPATH=<triton>:. pytest tests/gpu/test_gpu_w4_gemm.py`` (slow; CI has no triton).
"""

from __future__ import annotations

import pytest
import torch

from ptqlab.models import QuantLinear
from ptqlab.quantizers import QuantSpec, fake_quantize, weight_qparams

pytest.importorskip("triton", reason="Triton (CUDA installs, or the interpreter)")
from ptqlab.kernels import w4_gemm  # noqa: E402
from ptqlab.kernels.real import RealLinear  # noqa: E402

INTERPRETER_OK = True
DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEV == "cuda"
A8 = QuantSpec(8, True, 0)
# (k, n): odd output counts, an input dimension that no power-of-two block divides (per row only)
SHAPES = [(4096, 4096), (2048, 1000), (768, 2312), (1024, 33), (200, 264)] if GPU else [(256, 40), (128, 33), (200, 24)]
# one M per dispatch path and autotune bucket (w4_gemm.m_bucket: 1, 2..16, 32, 64, 128, 256; above GEMM_MAX_M = 128
# the unpack + cuBLAS hand-off, M = 129 and 256), none a multiple of its tile but 256
MS = [1, 5, 17, 33, 100, 129, 256] if GPU else [1, 5, 17, 300]


@pytest.fixture(autouse=True)
def _one_config_per_key(monkeypatch):
    # every autotune key gets one config, a different one from key to key (w4_gemm._prune), so that the suite runs
    # every config on some shapes without compiling and timing each for every shape
    monkeypatch.setenv("PTQLAB_W4_AUTOTUNE", "rotate")


def _layer(n: int, k: int, wspec: QuantSpec, aspec: QuantSpec, seed: int, dtype=torch.float16) -> QuantLinear:
    """A QuantLinear with an RTN weight on its recorded grid; rows 0/1 all positive / all negative, so that an
    asymmetric grid has zero points 0 and 15 there."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(n, k, device=DEV, generator=g, dtype=torch.float32) * 0.02
    w[0] = w[0].abs() + 1e-3
    w[1] = -w[1].abs() - 1e-3
    layer = QuantLinear(w.to(dtype), (torch.randn(n, device=DEV, generator=g) * 0.1).to(dtype), "layer")
    layer.weight_spec, layer.act_spec = wspec, aspec
    layer.set_weight_qparams(*weight_qparams(w, wspec))
    layer.weight.data.copy_(fake_quantize(w, wspec).to(dtype))
    return layer


def _check(layer: QuantLinear, scheme: str, m: int, bound: float) -> None:
    real = RealLinear(layer, scheme)
    x = torch.randn(m, layer.in_features, device=DEV, generator=torch.Generator(device=DEV).manual_seed(m))
    x = x.to(layer.weight.dtype)
    with torch.no_grad():
        got = real(x).double()
        xq = fake_quantize(x.float(), layer.act_spec).double()
        if layer.act_spec.bits == 8 and not layer.act_spec.is_float:
            # the int8 input codes themselves (equal to fake_quantize on a GPU: test_gpu_kernels; the interpreter's
            # division rounds differently): this test is about the GEMM
            from ptqlab.kernels.act_quant import quantize_int8_rows

            codes, sx = quantize_int8_rows(x, layer.act_spec)
            xq = codes.double() * sx.double()[:, None]
        w = layer.weight.double()
        if layer.lorc_u is not None:
            w = w + layer.lorc_u.double() @ layer.lorc_v.double()
        ref = xq @ w.t() + layer.bias.double()
    assert got.dtype == torch.float64 and bool(torch.isfinite(got).all())
    err = float((got - ref).norm() / ref.norm())
    assert err < bound, (scheme, m, err)


def _cases(groups):
    for k, n in SHAPES:
        for group in groups:
            if group and k % group:
                continue
            yield k, n, group


@pytest.mark.parametrize(("k", "n", "group"), list(_cases([32, 64, 128, 0])))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", MS)
def test_w4a16_matches_the_dequantized_reference(k, n, group, symmetric, m):
    _check(_layer(n, k, QuantSpec(4, symmetric, group), QuantSpec(), seed=k + n + group), "w4a16-triton", m, 2e-3)


@pytest.mark.skipif(not GPU, reason="bf16 in the interpreter: numpy has no bfloat16")
@pytest.mark.parametrize("m", [1, 16, 64, 2048])
def test_w4a16_bf16(m):
    layer = _layer(4096, 4096, QuantSpec(4, False, 128), QuantSpec(), seed=5, dtype=torch.bfloat16)
    _check(layer, "w4a16-triton", m, 1e-2)


@pytest.mark.parametrize(("k", "n", "group"), list(_cases([0])))
@pytest.mark.parametrize("scheme", ["w4a8-triton", "w8a8-triton"])
@pytest.mark.parametrize("m", MS)
def test_int8_gemm_matches_the_reference(k, n, group, scheme, m):
    bits = 4 if scheme.startswith("w4") else 8
    _check(_layer(n, k, QuantSpec(bits, True, 0), A8, seed=k + n), scheme, m, 2e-3)


@pytest.mark.parametrize("scheme", ["w4a16-triton", "w4a8-triton", "w8a8-triton"])
@pytest.mark.parametrize("rank", [8, 5])  # 5: no power of two; both below the GEMM's padded tile of 16
@pytest.mark.parametrize("m", [1, 5, 33] if GPU else [1, 5])  # GEMV, split-K GEMM, tiled GEMM
def test_lorc_inside_the_kernel_matches_the_dense_product(scheme, rank, m):
    # the Triton kernels add (x V^T) U^T in their own epilogue (each split-K share its part): W + U V, densely
    k, n = SHAPES[1]
    bits, group, aspec = (4, 64 if k % 64 == 0 else 0, QuantSpec()) if scheme == "w4a16-triton" else (
        int(scheme[1]), 0, A8)
    layer = _layer(n, k, QuantSpec(bits, scheme != "w4a16-triton", group), aspec, seed=rank + m)
    g = torch.Generator(device=DEV).manual_seed(7)
    # a low-rank term as large as the quantization error (about a tenth of the weight), not a rounding-level one
    layer.set_lorc(torch.randn(n, rank, device=DEV, generator=g) * 0.03, torch.randn(rank, k, device=DEV, generator=g) * 0.03)
    _check(layer, scheme, m, 2e-3)


def test_lorc_factors_of_the_wrong_shape_or_dtype_are_refused():
    k, n = SHAPES[1]
    layer = _layer(n, k, QuantSpec(4, True, 0), QuantSpec(), seed=3)
    real = RealLinear(layer, "w4a16-triton")
    x = torch.randn(1, k, device=DEV, dtype=torch.float16)
    v, u = torch.zeros(4, k, device=DEV, dtype=torch.float16), torch.zeros(n, 4, device=DEV, dtype=torch.float16)
    for bad in ((v.float(), u), (v[:, :-8], u), (v, u[:, :3])):
        with pytest.raises(ValueError, match="LoRC factors must be"):
            w4_gemm.w4a16_gemm(x, real.w_packed, real.w_scale, real.w_zero, real.group, lorc=bad)


@pytest.mark.parametrize("scheme", ["w4a16-triton", "w4a8-triton"])
def test_split_k_leaves_its_workspace_zero(scheme):
    # every split-K call zeroes the partial sums and tickets it used (the next call, or graph replay, needs them so);
    # W4A8 at one token runs the W4A16 GEMV on its int8 codes, with the same workspace
    if scheme == "w4a16-triton":
        layer = _layer(SHAPES[0][1], SHAPES[0][0], QuantSpec(4, False, 64 if SHAPES[0][0] % 64 == 0 else 0), A8, 1)
        layer.act_spec = QuantSpec()
    else:
        layer = _layer(SHAPES[0][1], SHAPES[0][0], QuantSpec(4, True, 0), A8, 1)
    real = RealLinear(layer, scheme)
    x = torch.randn(3, layer.in_features, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        first = real(x[:1])
        # a second call starts from a clean workspace: a left-over partial sum would double-count, far beyond this
        # bound. Not bit-equal: split-K adds its float32 partials with atomics, in whatever order they arrive.
        torch.testing.assert_close(real(x[:1]), first, rtol=2e-3, atol=2e-3)
        real(x)
    for ws, cnt in w4_gemm.WORKSPACE.buffers.values():
        assert not bool(ws.any()) and not bool(cnt.any())


def test_act_order_permutation_of_the_input():
    # GPTQ act-order with g_idx: a column's group is not k // group; stored sorted by group, the input permuted
    k, n, group = (512, 64, 128) if GPU else (128, 24, 32)
    g = torch.Generator(device=DEV).manual_seed(3)
    g_idx = torch.randperm(k, device=DEV, generator=g) // group
    perm = torch.argsort(g_idx, stable=True)
    codes = torch.randint(0, 16, (n, k), device=DEV, generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // group, device=DEV, generator=g) * 0.01 + 1e-3
    zero = torch.randint(0, 16, (n, k // group), device=DEV, generator=g).float()
    w = (codes.double() - zero.double()[:, g_idx]) * scale.half().double()[:, g_idx]
    x = torch.randn(5, k, device=DEV, generator=g, dtype=torch.float16)
    y = w4_gemm.w4a16_gemm(x, w4_gemm.pack_int4_k(codes[:, perm]), scale.t().half().contiguous(),
                           zero.t().half().contiguous(), group, perm=perm)
    ref = x.double() @ w.t()
    assert float((y.double() - ref).norm() / ref.norm()) < 2e-3


def test_packing_round_trips_and_unpack_matches():
    g = torch.Generator(device=DEV).manual_seed(4)
    codes = torch.randint(0, 16, (24, 64), device=DEV, generator=g, dtype=torch.uint8)
    codes[0] = 15  # top nibble set: the int32 word is negative
    packed = w4_gemm.pack_int4_k(codes)
    assert packed.shape == (8, 24) and packed.dtype == torch.int32
    assert torch.equal(w4_gemm.unpack_int4_k_reference(packed), codes)
    scale = torch.rand(2, 24, device=DEV, generator=g).half() * 0.01 + 1e-3
    zero = torch.randint(0, 16, (2, 24), device=DEV, generator=g).half()
    wt = w4_gemm.dequant_w4(packed, scale, zero, 32, torch.float16)
    ref = (codes.float() - zero.float().t().repeat_interleave(32, 1)) * scale.float().t().repeat_interleave(32, 1)
    assert torch.equal(wt.t(), ref.half())


def test_packed_w4_memory_and_no_fp16_copy():
    layer = _layer(4096, 4096, QuantSpec(4, True, 128), QuantSpec(), seed=6)
    layer.original = torch.nn.Linear(1, 1)
    assert RealLinear(layer, "w4a16-triton").original is layer.original
    real = RealLinear(layer, "w4a16-triton", keep_original=False)
    assert real.original is None
    weight_bytes = sum(b.numel() * b.element_size() for name, b in real.named_buffers() if name.startswith("w_"))
    assert weight_bytes <= 0.30 * 2 * 4096 * 4096, weight_bytes / (2 * 4096 * 4096)  # one layout: 0.27x FP16
    assert {name for name, _ in real.named_buffers()} == {"w_packed", "w_scale"}  # symmetric: no zero points


def test_fp8_activation_quantization_is_the_formats_grid():
    from ptqlab.formats import grid_values, group_scales
    from ptqlab.kernels.act_quant import quantize_fp8_rows

    spec = QuantSpec(fmt="fp8")
    x = torch.randn(37, 1000 if GPU else 200, device=DEV).half()
    x[0], x[1, 5], x[2] = 0, 3e4, x[2] * 1e-4
    values, scales = quantize_fp8_rows(x)
    ref_scale = group_scales(x.float()[:, None, :], spec)[:, 0, 0]
    assert torch.equal(scales, ref_scale)
    ref = grid_values(x.float(), ref_scale[:, None], spec)
    if GPU:  # the hardware cast rounds to nearest even, as torch's; the interpreter's emulation truncates
        assert torch.equal(values.float(), ref)  # (-126.9 -> -64), so there only the scales are checked


@pytest.mark.skipif(not GPU or torch.cuda.get_device_capability() < (8, 9), reason="FP8 _scaled_mm: sm_89+")
@pytest.mark.parametrize(("k", "n"), [(4096, 4096), (1024, 272)])
@pytest.mark.parametrize("m", [1, 16, 17, 2048])
def test_fp8_layer_matches_the_reference(k, n, m):
    fp8 = QuantSpec(fmt="fp8")
    _check(_layer(n, k, fp8, fp8, seed=k + n), "w8a8-fp8", m, 2e-3)
