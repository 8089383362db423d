"""The residual add and the LayerNorm after it as one Triton kernel (the CUDA-graph decoder's, ptqlab.speed).

Why: in a decode step of OPT-6.7B on an H200 (bench/README.md, session 32) torch's LayerNorm kernel took 8 us a
call on a [1, 4096] fp16 row (65 calls: 519 us of a 3871 us W4A16 step, more than the attention), and every one
follows a residual add (one more launch).  At one to a few tokens the work is a few KB: what costs is the kernel's
latency, so one program a row does both in one pass, the row in registers.

Numbers: the sum ``x + delta`` is rounded to the residual's dtype first (what the separate add stores), then
normalized in float32 with the biased variance and ``eps`` inside the square root, as ``torch.layer_norm``; the
two differ only in the order of the float32 sums.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

#: rows longer than this run the torch path (one program holds a row in registers)
MAX_COLUMNS = 16384


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def add_layer_norm_kernel(X, D, W, B, S, Y, C, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        mask = c < C
        x = tl.load(X + row * C + c, mask=mask, other=0.0)
        if HAS_DELTA:
            x = (x.to(tl.float32) + tl.load(D + row * C + c, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(S + row * C + c, x, mask=mask)  # the new residual, rounded as the separate add rounds it
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=0) / C
        diff = tl.where(mask, xf - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / C + eps)
        w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * C + c, (diff * rstd * w + b).to(Y.dtype.element_ty), mask=mask)

    return add_layer_norm_kernel  # (built once: Triton needs a GPU build, imported only where it runs)


def _fused_ok(x: torch.Tensor, ln: nn.LayerNorm) -> bool:
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and ln.elementwise_affine
            and ln.bias is not None and len(ln.normalized_shape) == 1 and x.shape[-1] <= MAX_COLUMNS
            and ln.weight.dtype == x.dtype)


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor | None, ln: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + delta`` (``x`` itself when ``delta`` is None) and ``ln(s)``, in one kernel on CUDA.

    Returns ``(s, ln(s))``.  Elsewhere (CPU, a LayerNorm without affine bias, rows over :data:`MAX_COLUMNS`)
    the same two results from torch's own ops."""
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"add_layer_norm: the residual {tuple(x.shape)} and the added {tuple(delta.shape)} differ")
    if x.shape[-1] != ln.normalized_shape[-1]:
        raise ValueError(f"add_layer_norm: rows of {x.shape[-1]} for a LayerNorm over {ln.normalized_shape[-1]}")
    if not _fused_ok(x, ln):
        s = x if delta is None else x + delta
        return s, ln(s)
    x = x.contiguous()
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    s = x if delta is None else torch.empty_like(x)
    y = torch.empty_like(x)
    if rows:
        import triton

        block = triton.next_power_of_2(cols)
        warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
        _kernel()[(rows,)](x, x if delta is None else delta.contiguous(), ln.weight, ln.bias, s, y, cols, ln.eps,
                           HAS_DELTA=delta is not None, BLOCK=block, num_warps=warps)
    return s, y
