"""Tests of the weight quantization algorithms (RTN, GPTQ, LoRC, ZQ-Local, ZQ-Global).

GPTQ is checked against a slow textbook implementation written here in float64
(explicit inverse Hessian, one column at a time, OBQ downdate of the inverse),
which shares nothing with the library's Cholesky / lazy-batch formulation.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import reference_quant
from reference_quant import single_thread  # noqa: F401  (module-scoped autouse fixture)

from ptqlab.methods.gptq import (lower_triangular_inverse, reference_upper_cholesky_of_inverse,
                                 upper_cholesky_of_inverse)
from ptqlab.methods import (GPTQResult, gptq_quantize, lorc_factors, lorc_factors_many, rtn_quantize, zq_global_block,
                            zq_local_quantize)
from ptqlab.methods import lorc as lorc_mod
from ptqlab.methods import zeroquant
from ptqlab.methods.zeroquant import local_objective, ste_quantize
from ptqlab.models import QuantLinear
from ptqlab.quantizers import (
    PER_ROW,
    PER_TENSOR,
    QuantizationError,
    QuantSpec,
    fake_quantize,
    scale_and_zero,
    weight_codes,
)


def dequantize_on_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``(codes - zero) * scale`` with the codes of ``w`` on the grid ``scale``/``zero`` [out, n_groups]."""
    group = w.shape[1] // scale.shape[1]
    codes = weight_codes(w, scale, zero, spec).float()
    return (codes - zero.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)

TIE_TOL = 1e-4


# --------------------------------------------------------------------------------------
# helpers: data, reference quantizer, textbook GPTQ
# --------------------------------------------------------------------------------------


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """X = Z A with a random mixing matrix and uneven column scales (so diag(H) varies)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=gen) / d**0.5
    A = A * torch.exp(0.7 * torch.randn(d, generator=gen))
    return torch.randn(n, d, generator=gen) @ A


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / X.shape[0]


def layer(out: int, inn: int, seed: int, n_mult: int = 4):
    gen = torch.Generator().manual_seed(seed + 1000)
    W = torch.randn(out, inn, generator=gen)
    X = correlated_inputs(n_mult * inn, inn, seed)
    return W, X, hessian(X)


def output_error(X: torch.Tensor, W: torch.Tensor, Q: torch.Tensor) -> float:
    X, D = X.double(), (W.double() - Q.double())
    return float(((X @ D.T) ** 2).sum())


def ref_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 scale/zero of each row of w (one group per row)."""
    s, z = reference_quant.ref_params(w, bits, symmetric)
    return s.squeeze(-1), z.squeeze(-1)


def textbook_gptq(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int,
    percdamp: float = 0.01,
    act_order: bool = False,
    follow: torch.Tensor | None = None,
):
    """Slow float64 GPTQ/OBQ: explicit inverse, one column at a time.

    ``follow``: where ``w_j / scale`` is within float noise of a rounding tie,
    take the rounding direction of ``follow`` (the library's result) if it is
    one of the two candidates, so that one tie resolved differently in float32
    does not cascade through the rest of the row.  Returns (Q, scales, zeros,
    number of ties followed).
    """
    maxq = 2**bits - 1
    W = weight.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    idx = dead.nonzero().flatten()
    H[idx, idx] = 1.0
    W[:, dead] = 0.0
    g = group_size
    n_groups = cols // g if g > 0 else 1
    S = torch.zeros(rows, n_groups, dtype=torch.float64)
    Z = torch.zeros_like(S)
    if g == PER_ROW:
        S[:, 0], Z[:, 0] = ref_params(W, bits, symmetric)
    elif g == PER_TENSOR:
        s, z = ref_params(W.reshape(1, -1), bits, symmetric)
        S[:, 0], Z[:, 0] = s, z
    elif act_order:  # static groups: from the original contiguous columns
        for k in range(n_groups):
            S[:, k], Z[:, k] = ref_params(W[:, k * g : (k + 1) * g], bits, symmetric)
    order = torch.argsort(torch.diag(H), descending=True).tolist() if act_order else list(range(cols))
    damp = percdamp * torch.diag(H).mean()
    Hinv = torch.linalg.inv(H + damp * torch.eye(cols, dtype=torch.float64))
    Q = torch.zeros_like(W)
    followed = 0
    for pos, j in enumerate(order):
        if g > 0 and not act_order and j % g == 0:
            S[:, j // g], Z[:, j // g] = ref_params(W[:, j : j + g], bits, symmetric)
        k = j // g if g > 0 else 0
        s, z = S[:, k], Z[:, k]
        t = W[:, j] / s
        code = torch.clamp(torch.round(t) + z, 0, maxq)
        if follow is not None:
            lib = torch.round(follow[:, j].double() / s + z)
            lo, hi = torch.clamp(torch.floor(t) + z, 0, maxq), torch.clamp(torch.ceil(t) + z, 0, maxq)
            tie = ((t - torch.floor(t)) - 0.5).abs() < TIE_TOL
            take = tie & (lib != code) & ((lib == lo) | (lib == hi))
            followed += int(take.sum())
            code = torch.where(take, lib, code)
        q = (code - z) * s
        Q[:, j] = q
        h = Hinv[j, j]
        err = (W[:, j] - q) / h
        rest = order[pos + 1 :]
        W[:, rest] -= torch.outer(err, Hinv[j, rest])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / h  # OBQ: eliminate column j
    return Q, S, Z, followed


def per_column(p: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    return p.repeat_interleave(group_size, 1) if group_size > 0 else p.expand(-1, cols)


def grid_ok(Q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, tol: float = 1e-3) -> bool:
    """Every Q / scale + zero is an integer in [0, maxq] (scale, zero broadcast per column)."""
    c = Q.double() / scale.double() + zero.double()
    return bool(((c - c.round()).abs() < tol).all()) and bool(((c.round() >= 0) & (c.round() <= maxq)).all())


def on_own_grid(Q: torch.Tensor, spec: QuantSpec, tol: float = 1e-4) -> bool:
    """Q lies on *some* grid of the spec with per-row/group scales.

    Asymmetric: re-quantizing reproduces Q.  Symmetric: the grid is
    {k * s, k in [-2**(b-1), 2**(b-1) - 1]} where the largest |Q| of the group is
    2**(b-1) * s or (2**(b-1) - 1) * s (the grid's ends), so one of those two
    scales must make every element an integer multiple.
    """
    if not spec.symmetric:
        return torch.allclose(fake_quantize(Q, spec), Q, rtol=1e-6, atol=1e-7)
    g = Q.shape[-1] if spec.group_size == PER_ROW else spec.group_size
    half = 2 ** (spec.bits - 1)
    groups = Q.double().reshape(-1, g)
    m = groups.abs().amax(1, keepdim=True)
    ok = m[:, 0] == 0
    for n_steps, lo, hi in ((half, -half, half - 1), (half - 1, -half, half - 1)):
        s = torch.where(m > 0, m / n_steps, torch.ones_like(m))
        k = groups / s
        good = ((k - k.round()).abs() < tol).all(1) & (k.round() >= lo).all(1) & (k.round() <= hi).all(1)
        ok |= good
    return bool(ok.all())


# --------------------------------------------------------------------------------------
# RTN
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [QuantSpec(4, True, 16), QuantSpec(3, False, PER_ROW), QuantSpec(8, True, PER_TENSOR)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rtn_equals_fake_quantize(spec, dtype):
    W = torch.randn(12, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    Q = rtn_quantize(W, spec, "fc")
    assert Q.dtype == dtype and Q.shape == W.shape
    assert torch.equal(Q, fake_quantize(W.float(), spec).to(dtype))
    assert not torch.equal(Q, W)
    with pytest.raises(QuantizationError, match="my.layer: group size 5"):
        rtn_quantize(W, QuantSpec(4, True, 5), "my.layer")


# --------------------------------------------------------------------------------------
# GPTQ vs the textbook
# --------------------------------------------------------------------------------------

GPTQ_CASES = [
    # (out, in, group, blocksize, act_order)
    (16, 32, PER_ROW, 128, False),
    (16, 32, PER_ROW, 7, False),  # blocks that are not a multiple of anything
    (16, 32, PER_TENSOR, 16, False),
    (16, 32, 16, 16, False),
    (24, 64, 16, 16, False),
    (24, 64, 16, 32, False),
    (24, 64, 16, 128, False),
    (24, 64, 16, 24, False),  # rounded down to a multiple of the group
    (24, 64, 16, 8, False),  # raised to one group
    (24, 64, PER_ROW, 32, True),
    (24, 64, 16, 16, True),
    (24, 64, 16, 128, True),
]


@pytest.mark.parametrize("out,inn,g,bs,act_order", GPTQ_CASES)
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gptq_matches_textbook(out, inn, g, bs, act_order, bits, symmetric):
    W, X, H = layer(out, inn, seed=out + inn + bits)
    spec = QuantSpec(bits, symmetric, g)
    res = gptq_quantize(W, H, spec, blocksize=bs, percdamp=0.01, act_order=act_order, name="fc")
    assert isinstance(res, GPTQResult)
    Q = res.weight
    assert Q.shape == W.shape and Q.dtype == W.dtype and bool(torch.isfinite(Q).all())

    ref, S, Z, followed = textbook_gptq(W, H, bits, symmetric, g, 0.01, act_order, follow=Q)
    step = per_column(S, inn, g)
    steps_off = (Q.double() - ref).abs() / step
    same = steps_off < 1e-4
    # Only float32-vs-float64 rounding ties may resolve differently (they are followed above).
    assert followed <= 0.02 * Q.numel()
    assert same.float().mean() >= 0.99, f"only {same.float().mean():.4f} of entries equal the textbook"
    assert float(steps_off.max()) <= 1 + 1e-3

    # Scales / zeros reported are those of the textbook, and Q is on that grid.
    n_groups = inn // g if g > 0 else 1
    assert res.scale.shape == (out, n_groups) and res.zero.shape == (out, n_groups)
    torch.testing.assert_close(res.scale.double(), S, rtol=1e-4, atol=0)
    assert torch.equal(res.zero.double(), Z)
    assert grid_ok(Q, per_column(res.scale, inn, g), per_column(res.zero, inn, g), spec.maxq)
    assert res.damp == pytest.approx(0.01 * float(torch.diag(H).mean()), rel=1e-5)

    # The loss estimate is the reference code's sum (w - q)^2 / (2 [H^-1]_jj) and is positive.
    assert res.loss > 0


def test_gptq_textbook_without_tie_following():
    # Asymmetric grids have no built-in rounding ties: the plain textbook agrees entry for entry.
    for g, act_order in ((PER_ROW, False), (16, False), (16, True)):
        W, X, H = layer(24, 64, seed=5)
        res = gptq_quantize(W, H, QuantSpec(4, False, g), blocksize=32, act_order=act_order)
        ref, S, _, _ = textbook_gptq(W, H, 4, False, g, act_order=act_order)
        steps_off = (res.weight.double() - ref).abs() / per_column(S, 64, g)
        assert float((steps_off < 1e-4).float().mean()) >= 0.99
        assert float(steps_off.max()) <= 1 + 1e-3


def test_gptq_blocksize_does_not_change_result():
    W, X, H = layer(16, 64, seed=9)
    for spec in (QuantSpec(3, False, PER_ROW), QuantSpec(4, False, 16)):
        base = gptq_quantize(W, H, spec, blocksize=128).weight
        for bs in (1, 16, 48, 64):
            other = gptq_quantize(W, H, spec, blocksize=bs).weight
            assert float((other - base).abs().max()) <= 1e-4 * float(base.abs().max())


# --------------------------------------------------------------------------------------
# GPTQ behaviour
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("g", [PER_ROW, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn(bits, g, symmetric):
    W, X, H = layer(32, 64, seed=bits * 10 + g)
    spec = QuantSpec(bits, symmetric, g)
    rtn = output_error(X, W, rtn_quantize(W, spec))
    gptq = output_error(X, W, gptq_quantize(W, H, spec).weight)
    assert gptq < 0.8 * rtn, (gptq, rtn)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_act_order_static_groups(bits, symmetric):
    g = 16
    W, X, H = layer(32, 64, seed=3 + bits)
    assert not torch.equal(torch.argsort(torch.diag(H), descending=True), torch.arange(64))
    spec = QuantSpec(bits, symmetric, g)
    res = gptq_quantize(W, H, spec, act_order=True)
    Q = res.weight
    # every column lies on the grid of its ORIGINAL contiguous group (col // g)
    for col in range(64):
        gi = col // g
        c = Q[:, col].double() / res.scale[:, gi].double() + res.zero[:, gi].double()
        assert bool(((c - c.round()).abs() < 1e-3).all()), f"column {col} is off its group's grid"
        assert bool(((c.round() >= 0) & (c.round() <= spec.maxq)).all())
    # static groups: the scales are those of the original weight's groups
    s, z = scale_and_zero(W.reshape(32, 64 // g, g), spec)
    torch.testing.assert_close(res.scale, s[..., 0], rtol=1e-6, atol=0)
    assert torch.equal(res.zero, z[..., 0])
    rtn = output_error(X, W, rtn_quantize(W, spec))
    assert output_error(X, W, Q) < 0.8 * rtn


@pytest.mark.parametrize(
    "g,act_order", [(PER_ROW, False), (16, False), (16, True), (PER_ROW, True), (PER_TENSOR, False)]
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_dead_inputs(g, act_order, symmetric):
    W, X, _ = layer(16, 32, seed=4)
    dead = [0, 5, 17, 31]
    X[:, dead] = 0
    H = hessian(X)
    assert bool((torch.diag(H)[dead] == 0).all())
    res = gptq_quantize(W, H, QuantSpec(3, symmetric, g), act_order=act_order)
    assert bool(torch.isfinite(res.weight).all())
    assert bool((res.weight[:, dead] == 0).all())
    assert bool(torch.isfinite(res.scale).all()) and bool(torch.isfinite(res.zero).all())
    assert res.loss == res.loss  # not NaN
    alive = [c for c in range(32) if c not in dead]
    # the live part still matches the textbook (dead columns contribute nothing)
    if not act_order:
        ref, S, _, _ = textbook_gptq(W, H, 3, symmetric, g, follow=res.weight)
        steps = (res.weight.double() - ref).abs() / per_column(S, 32, g)
        assert float((steps[:, alive] < 1e-4).float().mean()) >= 0.99
    # the caller's tensors are untouched
    assert bool((torch.diag(H)[dead] == 0).all()) and not bool((W[:, dead] == 0).all())


@pytest.mark.parametrize("n", [1, 7, 130, 2100])
def test_upper_cholesky_of_inverse_against_float64(n):
    # One Cholesky of the flipped H and its triangular inverse (by halves past 2048 rows): the factor the
    # reference recipe (Cholesky, inverse, Cholesky) makes, row-major, upper triangular, as accurate in float32.
    g = torch.Generator().manual_seed(n)
    X = torch.randn(2 * n + 3, n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64)
    H = X.t() @ X / X.shape[0]
    H.diagonal().add_(0.01 * float(H.diagonal().mean()))
    exact = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    U = upper_cholesky_of_inverse(H.float())
    ref = reference_upper_cholesky_of_inverse(H.float())
    assert U.is_contiguous() and U.dtype == torch.float32 and torch.equal(U, U.triu())
    assert bool((U.diagonal() > 0).all())
    err = float((U.double() - exact).norm() / exact.norm())
    ref_err = float((ref.double() - exact).norm() / exact.norm())
    assert err <= max(2 * ref_err, 1e-6), (err, ref_err)


@pytest.mark.parametrize("n,leaf", [(5, 1), (33, 4), (64, 16), (257, 64)])
def test_lower_triangular_inverse_by_halves(n, leaf):
    g = torch.Generator().manual_seed(n)
    X = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(X.t() @ X / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64))  # column-major
    inv = lower_triangular_inverse(L, leaf)
    assert inv.is_contiguous() and torch.equal(inv, inv.tril())
    torch.testing.assert_close(inv @ L, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-9)


def test_upper_cholesky_of_inverse_not_positive_definite():
    assert upper_cholesky_of_inverse(torch.tensor([[1.0, 2.0], [2.0, 1.0]])) is None
    assert reference_upper_cholesky_of_inverse(torch.tensor([[1.0, 2.0], [2.0, 1.0]])) is None


def test_gptq_not_positive_definite_hessian_warns_and_recovers():
    d = 16
    _, X, H = layer(8, d, seed=6)
    W = torch.randn(8, d, generator=torch.Generator().manual_seed(1))
    # Inputs 0 and 1 are the same feature: H is singular, and its first 2x2 block
    # [[1, 1], [1, 1]] makes the second Cholesky pivot exactly zero.
    H = H.clone()
    H[:2, :] = 0
    H[:, :2] = 0
    H[:2, :2] = 1.0
    with pytest.warns(UserWarning, match=r"fc\.bad: Hessian not positive definite"):
        res = gptq_quantize(W, H, QuantSpec(4, True, PER_ROW), percdamp=0.0, name="fc.bad")
    assert bool(torch.isfinite(res.weight).all())
    assert res.damp > 0
    assert grid_ok(res.weight, res.scale.expand(-1, d), res.zero.expand(-1, d), 15)


def test_gptq_rank_deficient_hessian_is_finite():
    # Fewer samples than inputs, no dampening: H = 2 X^T X / n has rank 6 < 32.
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(6, 32, generator=gen)
    W = torch.randn(8, 32, generator=gen)
    H = hessian(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = gptq_quantize(W, H, QuantSpec(4, False, 16), percdamp=0.0)
    assert bool(torch.isfinite(res.weight).all())
    assert grid_ok(res.weight, per_column(res.scale, 32, 16), per_column(res.zero, 32, 16), 15)


def test_gptq_indefinite_hessian_raises():
    H = torch.eye(8)
    H[0, 1] = H[1, 0] = 3.0  # eigenvalue -2: no small dampening fixes it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(QuantizationError, match="fc: Hessian could not be made positive definite"):
            gptq_quantize(torch.randn(4, 8), H, QuantSpec(4), percdamp=0.0, name="fc")


def test_gptq_input_errors():
    W, X, H = layer(8, 32, seed=7)
    with pytest.raises(QuantizationError, match="fc: GPTQ needs"):
        gptq_quantize(W, H, QuantSpec(16), name="fc")
    with pytest.raises(QuantizationError, match=r"fc: Hessian shape \(16, 16\) does not match 32"):
        gptq_quantize(W, H[:16, :16], QuantSpec(4), name="fc")
    with pytest.raises(QuantizationError, match="fc: group size 12 does not divide the input dimension 32"):
        gptq_quantize(W, H, QuantSpec(4, True, 12), name="fc")
    Wn = W.clone()
    Wn[1, 2] = float("nan")
    with pytest.raises(QuantizationError, match=r"fc weight: .*\(nan\)"):
        gptq_quantize(Wn, H, QuantSpec(4), name="fc")
    Hn = H.clone()
    Hn[3, 3] = float("inf")
    with pytest.raises(QuantizationError, match=r"fc Hessian: .*\(inf\)"):
        gptq_quantize(W, Hn, QuantSpec(4), name="fc")


def test_gptq_does_not_modify_inputs_and_keeps_dtype():
    W, X, H = layer(8, 32, seed=8)
    W0, H0 = W.clone(), H.clone()
    res = gptq_quantize(W.to(torch.float16), H, QuantSpec(4, True, 16))
    assert torch.equal(W, W0) and torch.equal(H, H0)
    assert res.weight.dtype == torch.float16
    res32 = gptq_quantize(W.to(torch.float16).float(), H, QuantSpec(4, True, 16))
    assert torch.equal(res.weight, res32.weight.to(torch.float16))


# --------------------------------------------------------------------------------------
# LoRC
# --------------------------------------------------------------------------------------


def discarded_bound(E: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(E.double())
    return float(s[rank:].pow(2).sum().sqrt())


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 16)])
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_lorc_full_precision_factors_reach_eckart_young(shape, rank):
    gen = torch.Generator().manual_seed(rank)
    E = torch.randn(*shape, generator=gen) * 0.01
    u, v = lorc_factors(E, rank, QuantSpec(bits=16))
    assert u.shape == (shape[0], rank) and v.shape == (rank, shape[1])
    resid = float((E.double() - u.double() @ v.double()).norm())
    bound = discarded_bound(E, rank)
    assert resid == pytest.approx(bound, rel=1e-5)
    # the two factors share sqrt(sigma): their column/row norms are equal
    torch.testing.assert_close(u.norm(dim=0), v.norm(dim=1), rtol=1e-4, atol=0)
    # sign convention: the singular vectors taken from the eigendecomposition have their largest entry positive
    side = v.t() if shape[0] >= shape[1] else u
    assert (side.gather(0, side.abs().argmax(dim=0, keepdim=True)) > 0).all()


def test_lorc_full_rank_recovers_error():
    E = torch.randn(10, 12, generator=torch.Generator().manual_seed(0))
    u, v = lorc_factors(E, 10, QuantSpec(bits=16))
    torch.testing.assert_close(u @ v, E, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank", [2, 8])
def test_lorc_eight_bit_factors_near_bound(rank):
    # A realistic error: W - RTN(W) of a random layer.
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    E = W - rtn_quantize(W, QuantSpec(3, True, PER_ROW))
    bound = discarded_bound(E, rank)
    u, v = lorc_factors(E, rank, QuantSpec(8, True, PER_ROW))
    resid = float((E.double() - u.double() @ v.double()).norm())
    assert bound <= resid <= 1.02 * bound
    assert resid < float(E.norm())
    # the factors are on their own 8-bit grids
    assert on_own_grid(u, QuantSpec(8, True, PER_ROW)) and on_own_grid(v, QuantSpec(8, True, PER_ROW))
    # coarser factors are worse but still help
    u2, v2 = lorc_factors(E, rank, QuantSpec(3, True, PER_ROW))
    resid2 = float((E.double() - u2.double() @ v2.double()).norm())
    assert resid < resid2


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_lorc_zero_and_rank_deficient_errors(shape):
    # A layer whose error is zero (e.g. already on the grid) gets zero factors, not NaN.
    u, v = lorc_factors(torch.zeros(*shape), 4, QuantSpec(bits=16))
    assert torch.equal(u, torch.zeros_like(u)) and torch.equal(v, torch.zeros_like(v))
    # An error of rank 2 asked for rank 4: recovered exactly, the two extra directions are zero.
    gen = torch.Generator().manual_seed(3)
    E = torch.randn(shape[0], 2, generator=gen) @ torch.randn(2, shape[1], generator=gen)
    u, v = lorc_factors(E, 4, QuantSpec(bits=16))
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    torch.testing.assert_close(u @ v, E, rtol=0, atol=1e-5)


def test_lorc_rank_errors():
    E = torch.randn(6, 10)
    with pytest.raises(QuantizationError, match=r"fc2: LoRC rank 7 exceeds min\(out, in\) = 6"):
        lorc_factors(E, 7, name="fc2")
    with pytest.raises(QuantizationError, match="fc2: LoRC rank must be at least 1, got 0"):
        lorc_factors(E, 0, name="fc2")
    u, v = lorc_factors(E, 6)
    assert u.shape == (6, 6) and v.shape == (6, 10)


@pytest.mark.parametrize("rank", [2, 6])
def test_lorc_activation_aware_beats_plain(rank):
    W, X, H = layer(32, 48, seed=11)
    E = W - rtn_quantize(W, QuantSpec(3, True, PER_ROW))

    def out_err(u, v):
        D = E.double() - u.double() @ v.double()
        return float(torch.trace(D @ H.double() @ D.T))

    plain = out_err(*lorc_factors(E, rank, QuantSpec(16)))
    aware = out_err(*lorc_factors(E, rank, QuantSpec(16), hessian=H))
    assert aware < 0.95 * plain
    aware8 = out_err(*lorc_factors(E, rank, QuantSpec(8), hessian=H))
    assert aware8 < plain
    # With no dampening the aware factors are optimal: the error is the discarded
    # energy of the SVD of E L, with H = L L^T.
    L = torch.linalg.cholesky(H.double())
    opt = float(torch.linalg.svdvals(E.double() @ L)[rank:].pow(2).sum())
    exact = out_err(*lorc_factors(E, rank, QuantSpec(16), hessian=H, percdamp=0.0))
    assert exact == pytest.approx(opt, rel=1e-4)
    assert exact <= aware * (1 + 1e-6)


# --------------------------------------------------------------------------------------
# LoRC: block-Krylov top eigenpairs (the fast path for large Gram matrices) against the full eigh
# --------------------------------------------------------------------------------------


@pytest.fixture
def krylov_runs(monkeypatch):
    """Use the block-Krylov path at test sizes (the library uses it only from n = 4096, too slow for CPU tests),
    with room for the flat spectra of small random matrices; returns the list of its results, so a test can
    check that it really ran and converged (or fell back)."""
    monkeypatch.setattr(lorc_mod, "_KRYLOV_MIN_N", 512)
    monkeypatch.setattr(lorc_mod, "_KRYLOV_MAX_FRACTION", 0.7)
    monkeypatch.setattr(lorc_mod, "_KRYLOV_TOL", 1e-8)  # the algorithm's strict contract; the default's is below
    runs = []
    solver = lorc_mod.top_eigenpairs_krylov_batched

    def spy(*args, **kwargs):
        runs.extend(solver(*args, **kwargs))
        return runs[-len(args[0]):]

    monkeypatch.setattr(lorc_mod, "top_eigenpairs_krylov_batched", spy)
    return runs


def eigh_factors(E: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: top_singular_factors on its full-eigh path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lorc_mod, "_KRYLOV_MIN_N", 10**9)
        return lorc_mod.top_singular_factors(E, rank)


def assert_same_truncation(E: torch.Tensor, fast, ref, rank: int, rel: float = 1e-9) -> None:
    """Same Frobenius error and same singular values (float64 SVD) as the full-eigh path."""
    (u, v), (u0, v0) = fast, ref
    err, err0 = float((E - u @ v).norm()), float((E - u0 @ v0).norm())
    assert err == pytest.approx(err0, rel=rel)
    sigma = torch.linalg.svdvals(E)[:rank]
    torch.testing.assert_close(u.norm(dim=0) * v.norm(dim=1), sigma, rtol=rel, atol=rel * float(sigma[0]))


def quant_error(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    """E = W - Q(W), int4 g128, of a random layer with a few outlier input channels: a flat spectrum."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=gen) * 0.02
    W[:, torch.randperm(in_f, generator=gen)[: in_f // 256]] *= 20
    return (W - fake_quantize(W, QuantSpec(4, True, 128))).double()


@pytest.mark.parametrize(
    ("kind", "shape"),
    # int4 g128 needs in_features divisible by 128
    [("gaussian", (1100, 1500)), ("gaussian", (2048, 1030)),
     ("quant_error", (1100, 1536)), ("quant_error", (2048, 1024))],
)
def test_lorc_krylov_matches_eigh(krylov_runs, kind, shape):
    rank = 8
    if kind == "gaussian":
        E = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    else:
        E = quant_error(*shape, seed=6)
    fast = lorc_mod.top_singular_factors(E, rank)
    assert len(krylov_runs) == 1 and krylov_runs[0].converged
    assert krylov_runs[0].dim < 0.7 * min(shape)
    assert_same_truncation(E, fast, eigh_factors(E, rank), rank)
    # reproducible (seeded start block), sign convention kept
    again = lorc_mod.top_singular_factors(E, rank)
    assert torch.equal(fast[0], again[0]) and torch.equal(fast[1], again[1])
    side = fast[1].t() if shape[0] >= shape[1] else fast[0]
    assert (side.gather(0, side.abs().argmax(dim=0, keepdim=True)) > 0).all()


def test_lorc_krylov_separated_spectrum_gives_eigh_factors(krylov_runs):
    # Well-separated top singular values: the factors themselves, not only their product, equal the eigh path's.
    gen = torch.Generator().manual_seed(7)
    m, n, rank = 1100, 1500, 6
    U, _ = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64))
    s = torch.tensor([8.0, 6.0, 4.5, 3.5, 2.5, 2.0], dtype=torch.float64)
    E = (U * s) @ V.t() + 1e-2 * torch.randn(m, n, generator=gen, dtype=torch.float64)
    (u, v), (u0, v0) = lorc_mod.top_singular_factors(E, rank), eigh_factors(E, rank)
    assert krylov_runs[0].converged
    torch.testing.assert_close(u, u0, rtol=0, atol=1e-8 * float(u0.abs().max()))
    torch.testing.assert_close(v, v0, rtol=0, atol=1e-8 * float(v0.abs().max()))


@pytest.mark.parametrize("rank", [2, 4])
def test_lorc_krylov_repeated_singular_values(krylov_runs, rank):
    # Top singular values 3, 3, 3, 2, 2 exactly, over a flat tail: ranks 2 and 4 cut through a cluster, where the
    # truncation is not unique but its error and singular values are.
    gen = torch.Generator().manual_seed(8)
    m, n = 1030, 1100
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    s = torch.cat([torch.tensor([3.0, 3.0, 3.0, 2.0, 2.0], dtype=torch.float64),
                   torch.linspace(1.0, 0.1, m - 5, dtype=torch.float64)])
    E = (U * s) @ V.t()
    fast = lorc_mod.top_singular_factors(E, rank)
    assert krylov_runs[0].converged
    assert_same_truncation(E, fast, eigh_factors(E, rank), rank)


@pytest.mark.parametrize("shape", [(1030, 1100), (1100, 1030)])
def test_lorc_krylov_zero_and_rank_deficient(krylov_runs, shape):
    # Zero error: zero factors, exactly.
    u, v = lorc_mod.top_singular_factors(torch.zeros(*shape, dtype=torch.float64), 8)
    assert krylov_runs[-1].converged
    assert torch.equal(u, torch.zeros_like(u)) and torch.equal(v, torch.zeros_like(v))
    # Rank 3 asked for rank 8: recovered exactly, the five extra directions carry nothing.
    gen = torch.Generator().manual_seed(9)
    E = torch.randn(shape[0], 3, generator=gen, dtype=torch.float64) @ torch.randn(3, shape[1], generator=gen,
                                                                                    dtype=torch.float64)
    u, v = lorc_mod.top_singular_factors(E, 8)
    assert krylov_runs[-1].converged
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    torch.testing.assert_close(u @ v, E, rtol=0, atol=1e-9 * float(E.abs().max()))
    assert float((u[:, 3:] @ v[3:]).abs().max()) <= 1e-9 * float(E.abs().max())
    u0, v0 = eigh_factors(E, 8)
    torch.testing.assert_close(u[:, :3] @ v[:3], u0[:, :3] @ v0[:3], rtol=0, atol=1e-9 * float(E.abs().max()))


@pytest.mark.parametrize("shape", [(2048, 1024), (1100, 1536)])
def test_lorc_krylov_default_tolerance_is_within_fp16_rounding(monkeypatch, shape):
    # The library's own tolerance: the product U V no further from the exact one than rounding the exact factors to
    # fp16 moves it, and the same Frobenius error (the energy LoRC removes) to 1e-9.
    monkeypatch.setattr(lorc_mod, "_KRYLOV_MIN_N", 512)
    monkeypatch.setattr(lorc_mod, "_KRYLOV_MAX_FRACTION", 0.7)
    runs = []
    solver = lorc_mod.top_eigenpairs_krylov_batched
    monkeypatch.setattr(lorc_mod, "top_eigenpairs_krylov_batched",
                        lambda *a, **k: (found := solver(*a, **k), runs.extend(found))[0])
    E = quant_error(*shape, seed=11)
    u, v = lorc_mod.top_singular_factors(E, 8)
    assert runs and runs[0].converged and runs[0].residual <= lorc_mod._KRYLOV_TOL
    u0, v0 = eigh_factors(E, 8)
    exact = u0 @ v0
    fp16 = float((u0.half().double() @ v0.half().double() - exact).norm() / exact.norm())
    assert float((u @ v - exact).norm() / exact.norm()) <= fp16
    assert float((E - u @ v).norm()) == pytest.approx(float((E - exact).norm()), rel=1e-9)


def test_lorc_krylov_falls_back_to_eigh_when_not_converged(krylov_runs, monkeypatch):
    # A space capped at one block cannot converge on a flat spectrum: the full eigh's answer, bit for bit.
    monkeypatch.setattr(lorc_mod, "_KRYLOV_MAX_FRACTION", 0.03)
    E = quant_error(1100, 1536, seed=10)
    u, v = lorc_mod.top_singular_factors(E, 8)
    assert len(krylov_runs) == 1 and not krylov_runs[0].converged
    u0, v0 = eigh_factors(E, 8)
    assert torch.equal(u, u0) and torch.equal(v, v0)


def test_lorc_krylov_batched_equals_one_at_a_time(krylov_runs):
    # A decoder block's Grams stepped together: a fast and a slow spectrum (the fast one leaves the batch first),
    # a zero matrix and a rank-deficient one. Each result is the one-matrix run's, to rounding.
    gen = torch.Generator().manual_seed(12)
    n = 1024
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    separated = (U * torch.cat([torch.tensor([9.0, 7, 5, 4, 3, 2.5]), torch.full((n - 6,), 0.1)])) @ U.t()
    flat = (lambda E: E.t() @ E)(quant_error(2048, n, seed=13))
    low = (lambda A: A @ A.t())(torch.randn(n, 3, generator=gen, dtype=torch.float64))
    grams = torch.stack([flat, separated, torch.zeros(n, n, dtype=torch.float64), low])
    batched = lorc_mod.top_eigenpairs_krylov_batched(grams, 6, tol=1e-8)
    single = [lorc_mod.top_eigenpairs_krylov(g, 6, tol=1e-8) for g in grams]
    assert [r.converged for r in batched] == [True] * 4
    assert batched[1].dim < batched[0].dim  # the separated spectrum stopped early, the batch went on without it
    for got, ref, g in zip(batched, single, grams):
        assert got.dim == ref.dim
        scale = max(float(ref.eigvals[0]), 1e-30)
        torch.testing.assert_close(got.eigvals, ref.eigvals, rtol=0, atol=1e-10 * scale)
        # the same invariant subspace where the eigenvalues are separated: compare projectors on the top pairs
        assert float((g @ got.eigvecs - got.eigvecs * got.eigvals).norm(dim=0).max()) <= 1e-8 * scale


@pytest.mark.parametrize("budget", [None, 1])
def test_lorc_factors_many_equals_lorc_factors(krylov_runs, monkeypatch, budget):
    # One batched call over a block's worth of layers (two Gram widths, two ranks, plain and activation-aware, one
    # layer small enough for the exact eigh) gives each layer's own lorc_factors; with a byte budget of 1 every
    # Krylov run takes one matrix.
    if budget is not None:
        monkeypatch.setattr(lorc_mod, "_KRYLOV_BATCH_BYTES", budget)
    gen = torch.Generator().manual_seed(14)
    shapes = [(512, 512), (512, 512), (1024, 512), (512, 1024), (300, 256), (768, 640)]
    errors = [quant_error(o, i, seed=20 + k).float() for k, (o, i) in enumerate(shapes)]
    ranks = [8, 8, 8, 8, 4, 6]
    X = torch.randn(2048, 512, generator=gen)
    hessians = [X.t() @ X / 2048, None, X.t() @ X / 2048, None, None, None]
    spec = QuantSpec(8, True, PER_ROW)
    names = [f"l{k}" for k in range(len(shapes))]
    together = lorc_factors_many(errors, ranks, spec, hessians, 0.01, names)
    count = len(krylov_runs)
    assert count == 5  # every layer but the small one went through Krylov
    alone = [lorc_factors(e, r, spec, h, 0.01, nm) for e, r, h, nm in zip(errors, ranks, hessians, names)]
    for (u, v), (u0, v0), e in zip(together, alone, errors):
        assert u.shape == u0.shape and v.shape == v0.shape
        # the factors are quantized, so compare the products they make, next to the error they compensate
        assert float((u @ v - u0 @ v0).norm()) <= 1e-4 * float(e.norm())


def test_lorc_factors_many_checks_its_input():
    E = torch.randn(64, 32)
    with pytest.raises(ValueError, match="2 errors, 1 ranks"):
        lorc_factors_many([E, E], [4])
    with pytest.raises(QuantizationError, match="second: LoRC rank 40 exceeds"):
        lorc_factors_many([E, E], [4, 40], names=["first", "second"])
    assert lorc_factors_many([], []) == []


def test_lorc_krylov_not_used_for_small_matrices(monkeypatch):
    # Below _KRYLOV_MIN_N (and for ranks too large next to n) the exact eigh path runs, untouched.
    calls = []
    monkeypatch.setattr(lorc_mod, "top_eigenpairs_krylov_batched", lambda *a, **k: calls.append(a))
    lorc_factors(torch.randn(300, 500), 8)
    assert lorc_mod._KRYLOV_MIN_N >= 2048 and calls == []
    monkeypatch.setattr(lorc_mod, "_KRYLOV_MIN_N", 256)
    lorc_factors(torch.randn(300, 500), 70)  # 4 * 70 + 16 > 300 / 4
    assert calls == []


# --------------------------------------------------------------------------------------
# ZeroQuant-Local
# --------------------------------------------------------------------------------------


def test_ste_quantize_forward_and_gradient():
    w = torch.randn(4, 8, requires_grad=True)
    spec = QuantSpec(3, True, PER_ROW)
    q = ste_quantize(w, spec)
    torch.testing.assert_close(q.detach(), fake_quantize(w.detach(), spec), rtol=0, atol=1e-6)
    g = torch.randn(4, 8)
    q.backward(g)
    assert torch.equal(w.grad, g)


def test_local_objective_is_output_error():
    W, X, H = layer(8, 16, seed=12)
    Q = rtn_quantize(W, QuantSpec(3))
    expected = output_error(X, W, Q) / X.shape[0]
    assert float(local_objective(W, Q, H)) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("spec", [QuantSpec(3, True, PER_ROW), QuantSpec(3, False, 16), QuantSpec(4, True, 16)])
def test_zq_local_improves_on_rtn_and_stays_on_grid(spec):
    W, X, H = layer(16, 32, seed=13)
    res = zq_local_quantize(W, H, spec, steps=80, lr=1e-3)
    Q, history = res.weight, res.history
    torch.testing.assert_close(Q, dequantize_on_grid(Q, res.scale, res.zero, spec), rtol=0, atol=1e-6)  # on its grid
    assert len(history) == 81
    rtn = rtn_quantize(W, spec)
    rtn_obj = output_error(X, W, rtn) / X.shape[0]
    assert history[0] == pytest.approx(rtn_obj, rel=1e-4)  # starts at RTN
    assert min(history) < history[0]
    assert history[-1] < history[0]
    # the returned weight is the best iterate, and better than RTN
    obj = output_error(X, W, Q) / X.shape[0]
    assert obj == pytest.approx(min(history), rel=1e-4)
    assert obj < 0.95 * rtn_obj
    assert Q.shape == W.shape and Q.dtype == W.dtype
    assert on_own_grid(Q, spec)
    assert not torch.equal(Q, rtn)


def test_zq_local_keeps_dtype_and_zero_steps_is_rtn():
    W, X, H = layer(8, 16, seed=14)
    spec = QuantSpec(4, False, PER_ROW)
    res = zq_local_quantize(W, H, spec, steps=0)
    Q, history = res.weight, res.history
    assert len(history) == 1
    torch.testing.assert_close(Q, rtn_quantize(W, spec), rtol=0, atol=1e-6)
    Qh = zq_local_quantize(W.half(), H, spec, steps=3).weight
    assert Qh.dtype == torch.float16


def test_zq_local_turns_tf32_on_only_while_it_runs(monkeypatch):
    # the TF32 switch is process-wide: ZQ-Local sets it for its own products and must give the caller's back,
    # also when it fails midway
    W, X, H = layer(8, 16, seed=15)
    spec = QuantSpec(4, False, PER_ROW)
    seen = []
    previous = torch.backends.cuda.matmul.allow_tf32  # a property of torch's cuBLAS module, not for monkeypatch
    torch.backends.cuda.matmul.allow_tf32 = False
    real_objective = zeroquant.local_objective

    def spy(*args):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real_objective(*args)

    monkeypatch.setattr(zeroquant, "local_objective", spy)
    try:
        zq_local_quantize(W, H, spec, steps=2)
        assert seen == [True, True, True] and torch.backends.cuda.matmul.allow_tf32 is False
        with pytest.raises(RuntimeError):
            zq_local_quantize(W, H[:4, :4], spec, steps=2)  # mismatched Hessian: the product fails
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


# --------------------------------------------------------------------------------------
# ZeroQuant-Global
# --------------------------------------------------------------------------------------


def make_block(hidden: int = 16, ffn: int = 32, seed: int = 0) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(ffn, hidden, generator=gen) / hidden**0.5, 0.1 * torch.randn(ffn, generator=gen)
    w2, b2 = torch.randn(hidden, ffn, generator=gen) / ffn**0.5, 0.1 * torch.randn(hidden, generator=gen)
    return nn.Sequential(QuantLinear(w1, b1, "fc1"), nn.ReLU(), QuantLinear(w2, b2, "fc2"))


def run_block(b: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return b(x)


def block_mse(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(block(inputs), targets))


@pytest.mark.parametrize("spec", [QuantSpec(3, True, PER_ROW), QuantSpec(3, False, 8)])
def test_zq_global_beats_rtn(spec):
    fp = make_block()
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 8, 16, generator=gen) @ (torch.randn(16, 16, generator=gen) / 4)
    with torch.no_grad():
        targets = fp(inputs)

    rtn = copy.deepcopy(fp)
    for m in (rtn[0], rtn[2]):
        m.weight.data.copy_(rtn_quantize(m.weight.data, spec))
    rtn_mse = block_mse(rtn, inputs, targets)

    block = copy.deepcopy(fp)
    linears = {"0": block[0], "2": block[2]}
    history, qparams = zq_global_block(block, linears, spec, run_block, inputs, targets, steps=100, lr=1e-3,
                                       batch_size=4)
    for name, (scale, zero) in qparams.items():  # every learned weight lies on the grid it reports
        w = linears[name].weight.detach().float()
        torch.testing.assert_close(w, dequantize_on_grid(w, scale, zero, spec), rtol=0, atol=1e-6)
    # [RTN-start MSE, 100 training losses, final full-batch MSE]
    assert len(history) == 102 and all(h == h for h in history)
    assert history[0] == pytest.approx(rtn_mse, rel=1e-5)
    mse = block_mse(block, inputs, targets)
    assert history[-1] == pytest.approx(mse, rel=1e-4)
    assert mse < 0.8 * rtn_mse, (mse, rtn_mse)

    for name, m in linears.items():
        assert isinstance(m, QuantLinear)
        assert not parametrize.is_parametrized(m)
        assert isinstance(m.weight, nn.Parameter) and not m.weight.requires_grad
        assert m.weight.dtype == torch.float32
        assert on_own_grid(m.weight.data, spec), f"{name} is off the grid"
        assert not torch.equal(m.weight.data, rtn[int(name)].weight.data)
    # the full-precision block it was copied from is untouched
    assert torch.equal(fp[0].weight, make_block()[0].weight)


def test_zq_global_restores_dtype():
    fp = make_block(8, 16)
    inputs = torch.randn(4, 3, 8)
    with torch.no_grad():
        targets = fp(inputs)
    block = copy.deepcopy(fp).to(torch.bfloat16)
    spec = QuantSpec(4, False, PER_ROW)
    history, _ = zq_global_block(block, {"0": block[0], "2": block[2]}, spec, run_block, inputs, targets, steps=3)
    assert len(history) == 3 + 2  # start MSE, 3 steps, final MSE
    assert all(p.dtype == torch.bfloat16 for p in block.parameters())
    assert not parametrize.is_parametrized(block[0])
