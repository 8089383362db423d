"""The epilogue of the int8 GEMM: ``y = acc * s_x[:, None] * s_w[None, :] + b`` cast to the model dtype, one pass.

``torch._int_mm`` returns int32 and has no epilogue; in torch ops the scaling, bias and cast are four passes
over an ``[M, N]`` int32/float32 tensor, which at large M cost as much as the GEMM saves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _epilogue_kernel(ACC, SX, SW, B, Y, M, N, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, mn = rm < M, rn < N
    mask = mm[:, None] & mn[None, :]
    offs = rm[:, None] * N + rn[None, :]
    acc = tl.load(ACC + offs, mask=mask, other=0).to(tl.float32)
    sx = tl.load(SX + rm, mask=mm, other=0.0)
    sw = tl.load(SW + rn, mask=mn, other=0.0)
    y = acc * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(B + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def scaled_int32_to(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """``acc [M, N]`` int32 (contiguous) scaled by per-row ``sx [M]`` and per-column ``sw [N]``, plus ``bias``."""
    m, n = acc.shape
    acc = acc.contiguous()
    y = torch.empty(m, n, dtype=dtype, device=acc.device)
    grid = (triton.cdiv(m, 32), triton.cdiv(n, 128))
    _epilogue_kernel[grid](acc, sx, sw, bias if bias is not None else sw, y, m, n,
                           HAS_BIAS=bias is not None, BLOCK_M=32, BLOCK_N=128, num_warps=4)
    return y
