"""Tests of ptqlab.quantizers against an independent float64 reference quantizer.

The reference below is written from the specification only (module docstring of
``ptqlab.quantizers``), not from the implementation:

* symmetric:  zero = 2**(b-1), scale = 2 * max|x| / (2**b - 1)
* asymmetric: lo = min(min(x), 0), hi = max(max(x), 0), scale = (hi - lo) / (2**b - 1),
  zero = round(-lo / scale)
* an all-zero group gets scale 1
* codes = clamp(round(x / scale) + zero, 0, 2**b - 1), value = (code - zero) * scale

The library computes in float32, so codes may legitimately differ from the
float64 reference by one step where ``x / scale`` sits on (or within float32
noise of) a rounding tie.  The symmetric grid has such a tie by construction
at its extremes (``+-max|x| / scale = +-(2**b - 1) / 2``), so the comparison
tolerates a one-step difference exactly there and nowhere else.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_quant import ref_params
from reference_quant import single_thread  # noqa: F401  (module-scoped autouse fixture)

from ptqlab.quantizers import (
    FULL_PRECISION_BITS,
    PER_ROW,
    PER_TENSOR,
    QuantizationError,
    QuantizedTensor,
    QuantSpec,
    check_finite,
    dequantize,
    fake_quantize,
    quantize,
    quantize_codes,
    storage_bits_per_weight,
)

BITS = list(range(2, 9))
TIE_TOL = 1e-4  # |frac(x/scale) - 0.5| below this counts as a rounding tie


# --------------------------------------------------------------------------------------
# float64 reference
# --------------------------------------------------------------------------------------


def ref_grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., n_groups, group] view of x (float64), granularity along the last dim."""
    x = x.double()
    if group_size == PER_TENSOR:
        return x.reshape(1, 1, -1)
    if group_size == PER_ROW:
        return x.reshape(*x.shape[:-1], 1, x.shape[-1])
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def ref_quantize(x: torch.Tensor, bits: int, symmetric: bool, group_size: int):
    """Reference (codes, values, scale, zero, ratio) in the grouped layout, float64."""
    maxq = 2**bits - 1
    xg = ref_grouped(x, group_size)
    scale, zero = ref_params(xg, bits, symmetric)
    ratio = xg / scale
    codes = torch.clamp(torch.round(ratio) + zero, 0, maxq)
    values = (codes - zero) * scale
    return codes, values, scale, zero, ratio


def near_tie(ratio: torch.Tensor) -> torch.Tensor:
    return ((ratio - torch.floor(ratio)) - 0.5).abs() < TIE_TOL


def expand_like(p: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Broadcast per-group parameters ``[..., n_groups, 1]`` to the shape of x."""
    xg_shape = ref_grouped(x, group_size).shape
    return p.expand(xg_shape).reshape(x.shape)


def assert_matches_reference(x: torch.Tensor, spec: QuantSpec) -> None:
    """quantize / fake_quantize / dequantize of float32 x agree with the float64 reference."""
    g = spec.group_size
    q = quantize(x, spec, "t")
    fq = fake_quantize(x, spec, "t")
    r_codes, r_values, r_scale, r_zero, ratio = ref_quantize(x, spec.bits, spec.symmetric, g)

    # Parameters.
    assert q.scale.shape == r_scale.shape
    torch.testing.assert_close(q.scale.double(), r_scale, rtol=1e-6, atol=0)
    zero_tie = near_tie(-ref_grouped(x, g).clamp(max=0).amin(-1, keepdim=True) / r_scale)
    zero_ok = (q.zero.double() == r_zero) | (zero_tie & ((q.zero.double() - r_zero).abs() <= 1))
    assert bool(zero_ok.all()), "zero points differ from the reference"

    # Codes: equal to the reference except for one step at rounding ties.
    codes = ref_grouped(q.codes, g)
    same_zero = (q.zero.double() == r_zero).expand_as(codes)
    diff = (codes - r_codes).abs()
    tie = near_tie(ratio)
    assert bool((diff[same_zero & ~tie] == 0).all()), "codes differ from the reference away from ties"
    assert bool((diff <= 1).all())

    # Values: fake_quantize == dequantize(quantize) exactly, and close to the reference values.
    deq = dequantize(q)
    assert torch.equal(deq, fq)
    assert fq.shape == x.shape and fq.dtype == x.dtype
    fq_g = ref_grouped(fq, g)
    exact = same_zero & (diff == 0)
    err = (fq_g - r_values).abs()
    tol = 1e-6 * (r_values.abs() + r_scale.expand_as(err))
    assert bool((err[exact] <= tol[exact]).all())


def make_tensor(shape, seed: int, kind: str = "normal", magnitude: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    if kind == "positive":
        x = x.abs() + 0.1
    elif kind == "negative":
        x = -x.abs() - 0.1
    elif kind == "offset":
        x = x + 3.0
    elif kind == "sparse":
        x = x * (torch.rand(*shape, generator=gen) < 0.4)
    elif kind == "heavy":  # a few outliers, as in LLM activations
        x = x * torch.where(torch.rand(*shape, generator=gen) < 0.05, 50.0, 1.0)
    return x * magnitude


def group_sizes(dim: int) -> list[int]:
    return [PER_ROW, PER_TENSOR] + [d for d in range(1, dim + 1) if dim % d == 0]


# --------------------------------------------------------------------------------------
# agreement with the reference
# --------------------------------------------------------------------------------------

NAMED_CASES = [
    ((3, 5), [PER_ROW, PER_TENSOR, 5, 1]),
    ((7, 12), [PER_ROW, PER_TENSOR, 4, 6, 12, 3]),
    ((13,), [PER_ROW, PER_TENSOR, 13]),
    ((24,), [PER_ROW, PER_TENSOR, 8]),
    ((2, 5, 12), [PER_ROW, PER_TENSOR, 4, 6]),  # activations [batch, tokens, hidden]
    ((1, 1, 1), [PER_ROW, PER_TENSOR, 1]),
]


@pytest.mark.parametrize("shape,groups", NAMED_CASES, ids=["x".join(map(str, s)) for s, _ in NAMED_CASES])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("kind", ["normal", "positive", "negative", "sparse", "heavy"])
def test_matches_reference_named_shapes(shape, groups, symmetric, kind):
    x = make_tensor(shape, seed=zlib.crc32(repr((shape, kind)).encode()), kind=kind)
    for bits in BITS:
        for g in groups:
            assert_matches_reference(x, QuantSpec(bits, symmetric, g))


@st.composite
def tensors_and_specs(draw):
    lead = draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))
    dim = draw(st.integers(1, 36))
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    g = draw(st.sampled_from(group_sizes(dim)))
    kind = draw(st.sampled_from(["normal", "positive", "negative", "offset", "sparse", "heavy"]))
    magnitude = 10.0 ** draw(st.integers(-4, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    x = make_tensor((*lead, dim), seed, kind, magnitude)
    return x, QuantSpec(bits, symmetric, g)


@settings(max_examples=300, deadline=None)
@given(tensors_and_specs())
def test_matches_reference_random(case):
    x, spec = case
    assert_matches_reference(x, spec)


# --------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(tensors_and_specs())
def test_codes_range_error_bound_and_roundtrip(case):
    x, spec = case
    q = quantize(x, spec)
    assert isinstance(q, QuantizedTensor)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == x.shape
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= spec.maxq
    assert q.scale.dtype == torch.float32 and q.zero.dtype == torch.float32
    assert bool((q.scale > 0).all())
    assert torch.equal(q.zero, torch.round(q.zero)) and bool(((q.zero >= 0) & (q.zero <= spec.maxq)).all())
    if spec.symmetric:
        assert bool((q.zero == 2 ** (spec.bits - 1)).all())

    fq = fake_quantize(x, spec)
    scale = expand_like(q.scale, x, spec.group_size)
    # half a step, plus float32 noise (the scale itself is rounded, and codes reach 2**(b-1))
    assert bool(((x - fq).abs() <= scale / 2 + 1e-6 * (x.abs() + scale)).all())
    assert torch.equal(dequantize(q), fq)
    assert torch.equal(q.dequantize(), fq)

    # Re-quantizing on the same grid gives the same codes.
    zero = expand_like(q.zero, x, spec.group_size)
    again = quantize_codes(fq, scale, zero, spec.maxq)
    assert torch.equal(again.to(torch.uint8), q.codes)


@settings(max_examples=150, deadline=None)
@given(tensors_and_specs())
def test_asymmetric_requantization_is_idempotent(case):
    x, spec = case
    spec = QuantSpec(spec.bits, False, spec.group_size)
    q = quantize(x, spec)
    deq = dequantize(q)
    q2 = quantize(deq, spec)
    assert torch.equal(q2.codes, q.codes)
    assert torch.equal(q2.zero, q.zero)
    torch.testing.assert_close(q2.scale, q.scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(fake_quantize(deq, spec), deq, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("g", [PER_ROW, PER_TENSOR, 4])
def test_symmetric_grid_requantization_on_its_own_scale(bits, g):
    # Fresh symmetric scales of a dequantized tensor differ (the grid's extreme
    # -2**(b-1)*scale exceeds the original max|x|), but on the original scale
    # every dequantized value is a grid point.
    x = make_tensor((5, 12), seed=bits)
    spec = QuantSpec(bits, True, g)
    q = quantize(x, spec)
    deq = dequantize(q)
    scale, zero = expand_like(q.scale, x, g), expand_like(q.zero, x, g)
    assert torch.equal(quantize_codes(deq, scale, zero, spec.maxq).to(torch.uint8), q.codes)
    k = deq.double() / scale.double()
    assert torch.allclose(k, torch.round(k), atol=1e-5)
    assert bool(((k >= -(2 ** (bits - 1)) - 1e-5) & (k <= 2 ** (bits - 1) - 1 + 1e-5)).all())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("g", [PER_ROW, PER_TENSOR, 3])
def test_zero_maps_to_exactly_zero(bits, symmetric, g):
    for kind in ("normal", "positive", "negative", "heavy"):
        x = make_tensor((4, 9), seed=bits * 7 + g, kind=kind)
        x[:, ::4] = 0.0
        x[2, :] = 0.0
        fq = fake_quantize(x, QuantSpec(bits, symmetric, g))
        assert bool((fq[x == 0] == 0).all())
        codes = quantize(x, QuantSpec(bits, symmetric, g)).codes
        zero = expand_like(quantize(x, QuantSpec(bits, symmetric, g)).zero, x, g)
        assert torch.equal(codes[x == 0].float(), zero[x == 0])


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_zero_point_is_midpoint(bits):
    for g in (PER_ROW, PER_TENSOR, 2):
        for kind in ("normal", "positive", "negative"):
            q = quantize(make_tensor((3, 8), seed=bits, kind=kind), QuantSpec(bits, True, g))
            assert bool((q.zero == 2 ** (bits - 1)).all())


@pytest.mark.parametrize("symmetric", [True, False])
def test_group_boundaries_are_independent(symmetric):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 24, generator=gen)
    for g in (4, 6, 8, 12):
        spec = QuantSpec(3, symmetric, g)
        base = fake_quantize(x, spec)
        for row, grp in ((0, 0), (1, 1), (3, 24 // g - 1)):
            y = x.clone()
            y[row, grp * g : (grp + 1) * g] = 100.0 * torch.randn(g, generator=gen)  # much wider range
            out = fake_quantize(y, spec)
            other = torch.ones_like(x, dtype=torch.bool)
            other[row, grp * g : (grp + 1) * g] = False
            assert torch.equal(out[other], base[other])
            assert not torch.equal(out[~other], base[~other])
    # per row: one row's range does not leak into the others
    spec = QuantSpec(3, symmetric, PER_ROW)
    base = fake_quantize(x, spec)
    y = x.clone()
    y[2] *= 1000
    out = fake_quantize(y, spec)
    assert torch.equal(out[[0, 1, 3]], base[[0, 1, 3]])
    # per tensor: one outlier changes every element's scale
    spec = QuantSpec(3, symmetric, PER_TENSOR)
    y = x.clone()
    y[2, 5] = 1000.0
    q = quantize(y, spec)
    assert q.scale.numel() == 1
    assert float(q.scale) == pytest.approx((2000.0 if symmetric else (1000.0 - float(y.min()))) / 7, rel=1e-6)


def test_per_token_and_per_tensor_on_activations():
    x = make_tensor((2, 5, 12), seed=11, kind="heavy")
    for bits in (4, 8):
        for sym in (True, False):
            spec = QuantSpec(bits, sym, PER_ROW)
            assert torch.equal(fake_quantize(x, spec), fake_quantize(x.reshape(10, 12), spec).reshape(2, 5, 12))
            assert quantize(x, spec).scale.shape == (2, 5, 1, 1)
            spec = QuantSpec(bits, sym, PER_TENSOR)
            assert torch.equal(fake_quantize(x, spec), fake_quantize(x.reshape(-1), spec).reshape(2, 5, 12))
            spec = QuantSpec(bits, sym, 4)
            assert quantize(x, spec).scale.shape == (2, 5, 3, 1)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("g", [PER_ROW, PER_TENSOR, 4])
def test_zero_and_constant_rows(bits, g):
    consts = [0.0, 0.3, -0.3, 1.7, -123.456, 1e-3, -2.5e-6, 3.14159]
    x = torch.tensor(consts, dtype=torch.float32)[:, None].repeat(1, 8)
    x = torch.cat([x, torch.zeros(2, 8)])
    # asymmetric: every constant row is reproduced exactly
    for gs in (PER_ROW, 4):
        out = fake_quantize(x, QuantSpec(bits, False, gs))
        assert torch.equal(out, x), f"asym g={gs}: constant rows not reproduced"
    # all-zero tensor: both schemes, any granularity, scale 1
    zeros = torch.zeros(3, 8)
    for sym in (True, False):
        q = quantize(zeros, QuantSpec(bits, sym, g))
        assert bool((q.scale == 1).all())
        assert torch.equal(dequantize(q), zeros)
        assert torch.equal(fake_quantize(zeros, QuantSpec(bits, sym, g)), zeros)
    # symmetric: zero rows exact; a constant c != 0 sits at the grid's extreme
    # (|c| / scale = (2**b - 1) / 2 is a tie), so it is within half a step of c
    # and on the grid, but it cannot be reproduced exactly by this grid.
    sym = QuantSpec(bits, True, PER_ROW)
    out = fake_quantize(x, sym)
    assert torch.equal(out[-2:], x[-2:])
    assert torch.equal(out[0], x[0])
    scale = 2 * x.abs().amax(1) / sym.maxq
    assert bool(((out - x).abs() <= scale[:, None] / 2 + 1e-6 * (x.abs() + scale[:, None])).all())
    pos = x[:, 0] > 0
    # positive extreme: +maxq/2 rounds up and is clamped to the top code
    torch.testing.assert_close(out[pos, 0], (2 ** (bits - 1) - 1) * scale[pos], rtol=1e-6, atol=0)


def test_exact_ties_round_half_to_even():
    # Values chosen so that scale and x / scale are exact in float32.
    # asym 2-bit: lo=0, hi=3 -> scale 1, zero 0; 0.5 -> 0 and 2.5 -> 2 (half to even, as torch.round)
    x = torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.0]])
    q = quantize(x, QuantSpec(2, False, PER_ROW))
    assert float(q.scale) == 1.0 and float(q.zero) == 0.0
    assert q.codes.tolist() == [[0, 0, 2, 2, 3]]
    # sym 2-bit: max|x| = 1.5 -> scale 1, zero 2; the ends -1.5 / +1.5 are ties:
    # -1.5 -> -2 (code 0, value -2) and +1.5 -> +2 -> code 4 clamped to 3 (value +1)
    x = torch.tensor([[-1.5, -0.5, 0.0, 0.5, 1.5]])
    q = quantize(x, QuantSpec(2, True, PER_ROW))
    assert float(q.scale) == 1.0 and float(q.zero) == 2.0
    assert q.codes.tolist() == [[0, 2, 2, 2, 3]]
    assert fake_quantize(x, QuantSpec(2, True, PER_ROW)).tolist() == [[-2.0, 0.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_low_precision_dtypes(dtype, symmetric):
    x = make_tensor((6, 16), seed=5, kind="heavy").to(dtype)
    for bits in (3, 4, 8):
        for g in (PER_ROW, PER_TENSOR, 8):
            spec = QuantSpec(bits, symmetric, g)
            fq = fake_quantize(x, spec)
            assert fq.dtype == dtype and fq.shape == x.shape
            assert torch.equal(fq, fake_quantize(x.float(), spec).to(dtype))
            q = quantize(x, spec)
            assert q.dtype == dtype and q.scale.dtype == torch.float32
            deq = dequantize(q)
            assert deq.dtype == dtype and torch.equal(deq, fq)
    assert fake_quantize(x, QuantSpec(16)) is x


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 1, 9, 15, 17, 32, -4, 4.0, 2.5, "4", None])
def test_bad_bits(bits):
    with pytest.raises(QuantizationError, match=r"bits must be an integer in 2\.\.8"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("g", [-2, -128, 2.0, "128"])
def test_bad_group_size(g):
    with pytest.raises(QuantizationError, match="group_size must be"):
        QuantSpec(bits=4, group_size=g)


def test_quantization_error_is_value_error():
    assert issubclass(QuantizationError, ValueError)


def test_valid_specs():
    for bits in BITS + [FULL_PRECISION_BITS]:
        spec = QuantSpec(bits)
        assert spec.enabled == (bits != 16)
        assert spec.maxq == 2**bits - 1
    assert QuantSpec(4, True, 128).describe() == "int4-sym-g128"
    assert QuantSpec(3, False, PER_ROW).describe() == "int3-asym-row"
    assert QuantSpec(8, True, PER_TENSOR).describe() == "int8-sym-tensor"
    assert QuantSpec().describe() == "fp16"


@pytest.mark.parametrize("fn", [quantize, fake_quantize])
def test_group_size_must_divide(fn):
    x = torch.randn(3, 10)
    with pytest.raises(QuantizationError, match=r"blocks\.0\.fc1.*group size 4.*input dimension 10"):
        fn(x, QuantSpec(4, True, 4), "blocks.0.fc1")
    with pytest.raises(QuantizationError, match=r"attn\.q_proj input.*group size 3 .*10"):
        fn(torch.randn(2, 4, 10), QuantSpec(8, False, 3), "attn.q_proj input")


@pytest.mark.parametrize("fn", [quantize, fake_quantize])
@pytest.mark.parametrize(
    "bad,pattern", [(float("nan"), r"\(nan\)"), (float("inf"), r"\(inf\)"), (float("-inf"), r"\(-inf\)")]
)
def test_non_finite_inputs(fn, bad, pattern):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(4, 8).to(dtype)
        x[2, 5] = bad
        with pytest.raises(QuantizationError, match=r"blocks\.3\.mlp\.fc2: .*non-finite value " + pattern):
            fn(x, QuantSpec(4, True, PER_ROW), "blocks.3.mlp.fc2")
        with pytest.raises(QuantizationError, match=r"index \(2, 5\)"):
            fn(x, QuantSpec(4, False, PER_TENSOR), "layer")
    with pytest.raises(QuantizationError, match="w: .*" + pattern):
        check_finite(torch.tensor([0.0, 1.0, bad]), "w")


def test_sixteen_bits():
    x = torch.randn(3, 8)
    with pytest.raises(QuantizationError, match=r"fc1: a 16-bit spec"):
        quantize(x, QuantSpec(16), "fc1")
    assert fake_quantize(x, QuantSpec(16)) is x
    # not checked for finiteness either: full precision is a pass-through
    y = torch.tensor([float("nan"), 1.0])
    assert fake_quantize(y, QuantSpec(16)) is y


def test_zero_dim_tensor():
    with pytest.raises(QuantizationError, match="scalar_thing: cannot quantize a 0-dimensional"):
        fake_quantize(torch.tensor(1.0), QuantSpec(4), "scalar_thing")


# --------------------------------------------------------------------------------------
# storage cost
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,in_f,out_f,expected",
    [
        (QuantSpec(4, True, 128), 256, 1, 4 + 16 / 128),  # 4.125
        (QuantSpec(4, True, 128), 256, 64, 4.125),
        (QuantSpec(4, False, 128), 256, 64, 4 + (16 + 4) / 128),  # 4.15625
        (QuantSpec(3, True, 64), 4096, 11008, 3 + 16 / 64),
        (QuantSpec(3, False, 32), 128, 7, 3 + 19 / 32),
        (QuantSpec(8, True, PER_ROW), 256, 10, 8 + 16 / 256),
        (QuantSpec(8, False, PER_ROW), 256, 10, 8 + 24 / 256),
        (QuantSpec(4, True, PER_TENSOR), 256, 4, 4 + 16 / 1024),
        (QuantSpec(2, False, PER_TENSOR), 100, 10, 2 + 18 / 1000),
        (QuantSpec(16), 256, 4, 16.0),
        (QuantSpec(16, group_size=128), 256, 4, 16.0),
    ],
)
def test_storage_bits_per_weight(spec, in_f, out_f, expected):
    assert storage_bits_per_weight(spec, in_f, out_f) == pytest.approx(expected, rel=1e-12)
    assert isinstance(storage_bits_per_weight(spec, in_f, out_f), float)


def test_storage_bits_default_out_features():
    assert storage_bits_per_weight(QuantSpec(4, True, 128), 256) == 4.125
    assert math.isclose(storage_bits_per_weight(QuantSpec(4, True, PER_ROW), 512), 4 + 16 / 512)
