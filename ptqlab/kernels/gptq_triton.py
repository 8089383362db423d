"""GPTQ's column loop for one block of columns, fused into one Triton kernel.

The torch path launches a dozen small kernels per column; for a 4096-column
layer that is tens of thousands of launches, and launches, not arithmetic,
are what GPTQ's time goes to.  Here each program takes ``BLOCK_R`` rows of the
current block of (at most ``BLOCK_C``) columns into registers and walks the
columns in order, exactly as :func:`ptqlab.methods.gptq.gptq_quantize` does:
quantize column ``i``, ``err = (w - q) / U[i, i]``, subtract ``err * U[i, :]``
from the row tile.  The lazy update of the columns after the block stays a
torch matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rint(x):
    # round half to even, like torch.round, for |x| < 2**22: adding 1.5 * 2**23 leaves no fraction bits
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _gptq_block_kernel(
    W, Q, ERR, LOSS, HINV, S, Z, COLGROUP,
    rows, ncols, stride_w, stride_h, n_groups, first_col, maxq,
    GROUP: tl.constexpr, DYNAMIC: tl.constexpr, SYM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    rmask = r < rows
    cmask = c < ncols
    mask = rmask[:, None] & cmask[None, :]
    tile = tl.load(W + r[:, None] * stride_w + first_col + c[None, :], mask=mask, other=0.0).to(tl.float32)
    qtile = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    etile = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    loss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s = tl.full((BLOCK_R,), 1.0, tl.float32)
    z = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for i in range(0, ncols):
        sel = c[None, :] == i
        w = tl.sum(tl.where(sel, tile, 0.0), axis=1)
        if DYNAMIC:
            if (first_col + i) % GROUP == 0:
                # scale/zero from the group's current (error-updated) columns
                gm = (c[None, :] >= i) & (c[None, :] < i + GROUP)
                xmin = tl.minimum(tl.min(tl.where(gm, tile, float("inf")), axis=1), 0.0)
                xmax = tl.maximum(tl.max(tl.where(gm, tile, float("-inf")), axis=1), 0.0)
                if SYM:
                    s = 2.0 * tl.maximum(-xmin, xmax) / maxq
                    s = tl.where(s > 0, s, 1.0)
                    z = tl.zeros((BLOCK_R,), dtype=tl.float32) + (maxq + 1) / 2
                else:
                    s = (xmax - xmin) / maxq
                    s = tl.where(s > 0, s, 1.0)
                    z = _rint(tl.math.div_rn(-xmin, s))
                g = (first_col + i) // GROUP
                tl.store(S + r * n_groups + g, s, mask=rmask)
                tl.store(Z + r * n_groups + g, z, mask=rmask)
        else:
            g = tl.load(COLGROUP + first_col + i)
            s = tl.load(S + r * n_groups + g, mask=rmask, other=1.0)
            z = tl.load(Z + r * n_groups + g, mask=rmask, other=0.0)
        code = _rint(tl.math.div_rn(w, s)) + z
        code = tl.minimum(tl.maximum(code, 0.0), maxq)
        q = (code - z) * s
        d = tl.load(HINV + (first_col + i) * stride_h + first_col + i)
        err = tl.math.div_rn(w - q, d)
        hrow = tl.load(HINV + (first_col + i) * stride_h + first_col + c, mask=cmask & (c > i), other=0.0)
        tile = tile - err[:, None] * hrow[None, :]
        qtile = tl.where(sel, q[:, None], qtile)
        etile = tl.where(sel, err[:, None], etile)
        loss += (w - q) * (w - q) / (d * d) / 2
    tl.store(Q + r[:, None] * stride_w + first_col + c[None, :], qtile, mask=mask)
    tl.store(ERR + r[:, None] * BLOCK_C + c[None, :], etile, mask=mask)
    tl.store(LOSS + r, tl.load(LOSS + r, mask=rmask, other=0.0) + loss, mask=rmask)


def gptq_block(
    W: torch.Tensor,  # [rows, cols] float32, current (error-updated) weights; columns i1:i2 are read
    Q: torch.Tensor,  # [rows, cols] float32 output
    Hinv: torch.Tensor,  # [cols, cols] upper Cholesky factor of the inverse Hessian
    i1: int,
    i2: int,
    scales: torch.Tensor,  # [rows, n_groups] float32 (read, or written for dynamic groups)
    zeros: torch.Tensor,
    col_group: torch.Tensor | None,  # [cols] int32 group of each column (static params), None for dynamic
    group_size: int,
    symmetric: bool,
    maxq: int,
    loss: torch.Tensor,  # [rows] float32 accumulator
    block_rows: int = 16,
) -> torch.Tensor:
    """Quantize columns ``i1:i2`` in place into ``Q``; returns the scaled errors ``[rows, i2 - i1]``."""
    if W.stride(1) != 1 or Hinv.stride(1) != 1:  # the kernel walks rows by stride(0), columns by 1
        raise ValueError(f"gptq_block needs row-major W and Hinv, got strides {W.stride()} and {Hinv.stride()}")
    rows = W.shape[0]
    ncols = i2 - i1
    block_c = triton.next_power_of_2(ncols)
    err = torch.empty(rows, block_c, device=W.device, dtype=torch.float32)
    dynamic = col_group is None
    colgroup = col_group if col_group is not None else scales  # unused pointer when dynamic
    grid = (triton.cdiv(rows, block_rows),)
    _gptq_block_kernel[grid](
        W, Q, err, loss, Hinv, scales, zeros, colgroup,
        rows, ncols, W.stride(0), Hinv.stride(0), scales.shape[1], i1, float(maxq),
        GROUP=max(group_size, 1), DYNAMIC=dynamic, SYM=symmetric, BLOCK_R=block_rows, BLOCK_C=block_c,
        num_warps=4,
    )
    return err[:, :ncols]
