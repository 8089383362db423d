"""Unpack 4-bit weight codes (two per byte) to the fp16 weight ``(code - zero) * scale``, one pass.

The large-M path of W4A16: at thousands of tokens a GEMM is compute-bound, and tinygemm's int4 kernel runs
far below cuBLAS there (measured 4% of FP16 speed at M = 2048 on an H100, bench/README.md); unpacking the
layer's weight once per call (read 0.5 byte, write 2 bytes per weight) and running cuBLAS costs a few
percent instead.  The arithmetic is the fake-quant weight's (float32 ``(code - zero) * scale``, then the
cast), so the unpacked weight equals the dequantized ``QuantLinear.weight`` bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_kernel(P, S, Z, W, N, K, G, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    # one program: BLOCK_N rows x one group of GROUP columns (GROUP/2 bytes a row, one scale/zero a row),
    # contiguous byte loads, both nibbles interleaved back in registers, contiguous fp16 stores
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    grp = tl.program_id(1)
    rb = grp * (GROUP // 2) + tl.arange(0, GROUP // 2)
    nmask = rn < N
    byte = tl.load(P + rn[:, None] * (K // 2) + rb[None, :], mask=nmask[:, None], other=0).to(tl.int32)
    s = tl.load(S + rn * G + grp, mask=nmask, other=1.0)[:, None]
    z = tl.load(Z + rn * G + grp, mask=nmask, other=0.0)[:, None]
    lo = ((byte & 15).to(tl.float32) - z) * s  # even columns
    hi = ((byte >> 4).to(tl.float32) - z) * s  # odd columns
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, GROUP))
    rk = grp * GROUP + tl.arange(0, GROUP)
    tl.store(W + rn[:, None] * K + rk[None, :], w.to(W.dtype.element_ty), mask=nmask[:, None])


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``[N, K]`` weight of ``dtype`` from ``packed [N, K/2]`` and float32 ``scale``/``zero`` ``[N, G]``.

    Layout: :func:`ptqlab.kernels.real.pack_int4`; reference: :func:`ptqlab.kernels.real.dequant_int4_reference`.
    """
    n, k = packed.shape[0], packed.shape[1] * 2
    g = scale.shape[1]
    group = k // g
    if group * g != k or group < 2 or group & (group - 1) or group > 4096:
        raise ValueError(f"int4 unpack needs a power-of-two group size of 2..4096 dividing {k}, got {k}/{g}")
    w = torch.empty(n, k, dtype=dtype, device=packed.device)
    block_n = max(1, 8192 // group)
    _dequant_kernel[(triton.cdiv(n, block_n), g)](packed, scale, zero, w, n, k, g, BLOCK_N=block_n, GROUP=group,
                                                  num_warps=4)
    return w
