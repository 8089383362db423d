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
def _dequant_kernel(P, S, Z, W, N, K, G, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    byte = tl.load(P + rn[:, None] * (K // 2) + (rk // 2)[None, :], mask=mask, other=0).to(tl.int32)
    code = ((byte >> ((rk % 2) * 4)[None, :]) & 15).to(tl.float32)  # low nibble = even column
    g = rn[:, None] * G + (rk // GROUP)[None, :]
    s = tl.load(S + g, mask=mask, other=1.0)
    z = tl.load(Z + g, mask=mask, other=0.0)
    tl.store(W + rn[:, None] * K + rk[None, :], ((code - z) * s).to(W.dtype.element_ty), mask=mask)


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``[N, K]`` weight of ``dtype`` from ``packed [N, K/2]`` and float32 ``scale``/``zero`` ``[N, G]``.

    Layout: :func:`ptqlab.kernels.real.pack_int4`; reference: :func:`ptqlab.kernels.real.dequant_int4_reference`.
    """
    n, k = packed.shape[0], packed.shape[1] * 2
    g = scale.shape[1]
    w = torch.empty(n, k, dtype=dtype, device=packed.device)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 128))
    _dequant_kernel[grid](packed, scale, zero, w, n, k, g, GROUP=k // g, BLOCK_N=32, BLOCK_K=128, num_warps=4)
    return w
