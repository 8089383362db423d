"""GPTQ (Frantar et al., 2022): quantize one column at a time, feeding each
column's rounding error back into the not-yet-quantized columns through the
inverse Hessian of the layer's reconstruction loss ``||XW^T - XQ^T||^2``.

With ``Hinv = H^-1`` and ``U = chol(Hinv)^T`` (upper), quantizing column ``j``
and compensating the rest is::

    q_j   = quant(w_j)
    err   = (w_j - q_j) / U[j, j]
    W[:, j+1:] -= err  U[j, j+1:]

Columns are processed in blocks of ``blocksize``; inside a block the update is
applied column by column, to the rest of the matrix once per block (lazy batch
updates), which is what makes it fast.

``quant`` rounds onto the spec's grid in its number format (:mod:`ptqlab.formats`): a group's scale
is fixed once, when the walk reaches the group (or from the weight before the walk, for per-row,
per-tensor and act-order grids), and every column of it rounds to the format's grid with that
scale. NVFP4's per-tensor second scale is taken from the weight before the walk.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..formats import tensor_scale
from ..options import int_at_least, option, positive_float, register_options
from ..quantizers import PER_TENSOR, QuantizationError, QuantSpec, check_finite, round_on_grid, scale_and_zero
from .registry import Method, WeightResult, register


@dataclass(frozen=True)
class GPTQOptions:
    blocksize: int = option(128, "GPTQ lazy-update block size", key="blocksize", check=int_at_least(1))
    # the GPTQ paper's 1% of the mean Hessian diagonal; activation-aware LoRC damps its Hessian the same way
    percdamp: float = option(0.01, "GPTQ dampening, fraction of the mean Hessian diagonal", key="percdamp",
                             check=positive_float)
    act_order: bool = option(False, "GPTQ: columns by decreasing Hessian diagonal", key="act_order")


register_options("gptq", GPTQOptions)


@dataclass
class GPTQResult:
    weight: torch.Tensor  # quantized weight, dequantized, in the input dtype
    scale: torch.Tensor  # [out, n_groups] (n_groups = 1 for per-row / per-tensor)
    zero: torch.Tensor  # [out, n_groups]
    damp: float  # dampening actually added to the diagonal
    loss: float  # sum of (w - q)^2 / (2 U_jj^2): the reference code's estimate of the output error


def _group_params(w: torch.Tensor, spec: QuantSpec, ts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero of ``w`` [out, cols] as one group per row (or one for the whole tensor)."""
    if spec.group_size == PER_TENSOR:
        s, z = scale_and_zero(w.reshape(1, -1), spec, ts)
        return s.expand(w.shape[0], 1), z.expand(w.shape[0], 1)
    return scale_and_zero(w, spec, ts)


def lower_triangular_inverse(L: torch.Tensor, leaf: int = 2048) -> torch.Tensor:
    """``L^-1`` of a lower-triangular ``L`` (non-zero diagonal), by halves: with ``L = [[A, 0], [C, B]]``,
    ``L^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]]``. The off-diagonal blocks are two GEMMs (2n^3/3 flops in all at the
    GEMM rate), where one triangular solve against the identity (``trsm``) costs n^3 at a lower rate; blocks of at
    most ``leaf`` rows are solved directly."""
    n = L.shape[0]
    out = torch.zeros(L.shape, dtype=L.dtype, device=L.device)  # row-major (LAPACK's factors are column-major)

    def fill(i0: int, i1: int) -> None:
        if i1 - i0 <= leaf:
            eye = torch.eye(i1 - i0, dtype=L.dtype, device=L.device)
            out[i0:i1, i0:i1] = torch.linalg.solve_triangular(L[i0:i1, i0:i1], eye, upper=False)
            return
        mid = (i0 + i1) // 2
        fill(i0, mid)
        fill(mid, i1)
        out[mid:i1, i0:mid] = out[mid:i1, mid:i1] @ (L[mid:i1, i0:mid] @ out[i0:mid, i0:mid])
        out[mid:i1, i0:mid].neg_()

    fill(0, n)
    return out


def upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor | None:
    """The upper-triangular ``U`` with ``U^T U = H^-1`` (``torch.linalg.cholesky(H^-1, upper=True)``), or None
    when ``H`` is not positive definite.

    With ``J`` the reversal permutation and ``J H J = L L^T`` (one Cholesky of the flipped matrix),
    ``H^-1 = J L^-T L^-1 J = (J L^-1 J)^T (J L^-1 J)``, and ``J L^-1 J`` is upper triangular with a positive
    diagonal, so it is that factor. One Cholesky and one triangular inverse: the reference code's recipe (Cholesky,
    ``cholesky_inverse``, Cholesky of the inverse; :func:`reference_upper_cholesky_of_inverse`) makes the same
    factor with two Cholesky factorisations and an explicit inverse, about twice the flops, and on an H200 fc2's
    16384-wide Hessian took 0.31 s of OPT-6.7B's 0.47 s solve per block (bench/README.md). Equal up to float
    rounding; ``tests/test_methods.py`` holds both against float64."""
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info) != 0:
        return None
    L_inv = lower_triangular_inverse(L)
    del L  # at fc2's width each [in, in] float32 matrix is 1 GiB: at most three live here, with the caller's H
    U = L_inv.flip(0, 1)  # a row-major copy (the Triton solve reads rows of U)
    del L_inv
    return U if bool(torch.isfinite(U.diagonal()).all()) else None


def reference_upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor | None:
    """The same factor as :func:`upper_cholesky_of_inverse` by the IST-DASLab/gptq recipe (kept for tests and
    benchmarks): Cholesky of ``H``, the explicit inverse, and the upper Cholesky factor of that."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        return None
    Hinv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    return U.contiguous() if int(info) == 0 else None


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float, name: str = "layer") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1``, raising ``damp`` (with a warning) until it exists.

    ``H`` is damped in place and restored: at FFN widths every extra
    ``[in, in]`` float32 matrix is hundreds of MiB of GPU memory.
    """
    mean_diag = torch.mean(torch.diag(H)).item()
    damp = percdamp * mean_diag
    added = 0.0
    for attempt in range(8):
        H.diagonal().add_(damp - added)
        added = damp
        U = upper_cholesky_of_inverse(H)
        if U is not None:
            H.diagonal().sub_(added)  # give the caller its matrix back (up to float rounding of the diagonal)
            return U, damp
        new_damp = max(damp * 10, 1e-8 * max(mean_diag, 1.0))
        warnings.warn(f"{name}: Hessian not positive definite with damp={damp:.3g}; retrying with {new_damp:.3g}")
        damp = new_damp
    H.diagonal().sub_(added)
    raise QuantizationError(f"{name}: Hessian could not be made positive definite (last damp {damp:.3g})")


def _torch_block(W, Q, Hinv, i1, i2, scales, zeros, col_group, spec, static, loss, ts=None) -> torch.Tensor:
    """Columns ``i1:i2`` one at a time (the reference path); returns the scaled errors."""
    g = spec.group_size
    W1 = W[:, i1:i2].clone()
    Err1 = torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
        col = i1 + i
        if not static and col % g == 0:
            s, z = scale_and_zero(W1[:, i : i + g], spec, ts)
            scales[:, col // g], zeros[:, col // g] = s[:, 0], z[:, 0]
        gi = col_group[col]
        s, z = scales[:, gi], zeros[:, gi]
        w = W1[:, i]
        q = round_on_grid(w, s, z, spec)
        d = Hinv1[i, i]
        Q[:, col] = q
        err = (w - q) / d
        loss += (w - q) ** 2 / d**2 / 2
        W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Err1


def _triton_block():
    try:
        from ..kernels.gptq_triton import gptq_block
    except ImportError:  # no triton (CPU-only installs)
        return None
    return gptq_block


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    name: str = "layer",
    use_triton: bool | None = None,
) -> GPTQResult:
    """GPTQ-quantize ``weight`` [out, in] given the input Hessian ``H`` [in, in].

    Groups (``spec.group_size > 0``) always cover contiguous *original*
    columns; with ``act_order`` their scales are fixed from the weight before
    any update ("static groups"), so the result can be stored group-wise.
    ``use_triton`` (default: when on CUDA and Triton is installed) runs each
    block of columns as one fused kernel; the torch loop below is the reference.
    The kernel rounds to integer grids: float formats always take the torch loop.
    """
    if not spec.enabled:
        raise QuantizationError(f"{name}: GPTQ needs a weight spec of 2..8 bits")
    check_finite(weight, f"{name} weight")
    check_finite(H, f"{name} Hessian")
    W = weight.detach().to(torch.float32, copy=True)
    # Work on the caller's float32 Hessian in place (restored below) rather than on a copy: at
    # FFN widths each [in, in] copy is hundreds of MiB of GPU memory.
    H = H.detach()
    if H.dtype != torch.float32 or not H.is_contiguous():
        H = H.float().contiguous()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise QuantizationError(f"{name}: Hessian shape {tuple(H.shape)} does not match {cols} input columns")
    g = spec.group_size
    grouped = g > 0
    if grouped and cols % g != 0:
        raise QuantizationError(f"{name}: group size {g} does not divide the input dimension {cols}")

    # Inputs that were always zero carry no information: their weights cannot matter.
    dead = torch.diag(H) == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0

    n_groups = cols // g if grouped else 1
    scales = torch.zeros(rows, n_groups, device=W.device)
    zeros = torch.zeros(rows, n_groups, device=W.device)
    static = not grouped or act_order
    ts = tensor_scale(W, spec)  # nvfp4's second scale, fixed before the walk (None for the others)
    if not grouped:
        scales[:, :1], zeros[:, :1] = _group_params(W, spec, ts)
    elif act_order:
        s, z = scale_and_zero(W.reshape(rows, n_groups, g), spec, ts)
        scales, zeros = s[..., 0].contiguous(), z[..., 0].contiguous()

    perm = None
    H_work = H
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H_work = W[:, perm], H[perm][:, perm]
    col_group = (perm if perm is not None else torch.arange(cols, device=W.device)) // (g if grouped else cols)

    Hinv, damp = inverse_hessian_cholesky(H_work, percdamp, name)
    del H_work
    H.diagonal()[dead] = 0
    # Blocks are a multiple of the group size, so a group never straddles a lazy update.
    if grouped and not act_order:
        blocksize = max(g, (blocksize // g) * g)

    if use_triton and spec.is_float:
        raise QuantizationError(f"{name}: the Triton GPTQ kernel rounds to integer grids, not {spec.fmt}; "
                                f"use use_triton=False (the default for float formats)")
    wants_kernel = use_triton or (use_triton is None and W.is_cuda and not spec.is_float)
    kernel = _triton_block() if wants_kernel else None
    if use_triton and kernel is None:
        raise QuantizationError(f"{name}: the Triton GPTQ kernel needs the triton package")
    Q = torch.zeros_like(W)
    loss = torch.zeros(rows, device=W.device)
    col_group_list = col_group.tolist()  # one transfer, not one device sync per column
    col_group_i32 = col_group.to(torch.int32)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if kernel is not None:
            Err1 = kernel(W, Q, Hinv, i1, i2, scales, zeros, None if not static else col_group_i32,
                          g, spec.symmetric, spec.maxq, loss)
        else:
            Err1 = _torch_block(W, Q, Hinv, i1, i2, scales, zeros, col_group_list, spec, static, loss, ts)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    if not grouped:
        scales, zeros = scales[:, :1], zeros[:, :1]
    return GPTQResult(Q.to(weight.dtype), scales, zeros, damp, float(loss.sum()))


def _solve(W: torch.Tensor, H: torch.Tensor | None, config, name: str) -> WeightResult:
    o = config.options.gptq
    res = gptq_quantize(W, H, config.weight, o.blocksize, o.percdamp, o.act_order, name)
    rows = W.shape[0]
    # per-tensor GPTQ keeps one pair; store it per row like every other spec
    return WeightResult(res.weight, res.scale.expand(rows, -1).contiguous(), res.zero.expand(rows, -1).contiguous())


register(Method("gptq", "GPTQ (Frantar et al., 2022): column-wise with inverse-Hessian error feedback",
                needs_calibration=True, solve_layer=_solve, options=("blocksize", "percdamp", "act_order")))
