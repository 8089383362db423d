"""W4A8 with 4-bit weights on the tensor cores: ptqlab's CUDA int8 MMA kernel (``csrc/w4_mma.cu``, the same cubin
as the W4A16 kernel of :mod:`ptqlab.kernels.w4_mma`).

The weight is stored once, packed as :func:`~ptqlab.kernels.w4_mma.pack_int4_mma` lays out the W4A16 kernel's
(0.5 byte a weight, one float32 scale a row: symmetric per-row 4-bit weights, the ``w4a8-triton`` backend's
grid); the input is quantized per token to int8 by one fused Triton pass before
(:func:`ptqlab.kernels.act_quant.quantize_int8_rows`, shared by the layers that read the same input).  The
kernel unpacks each weight word to int8 in registers (``16 (code - 8)``: two bit operations and a shift per
eight weights), feeds ``mma.sync.m16n8k32`` s8 x s8 -> s32 (exact int32 sums; half the MMAs of the fp16 path
for the same K), and scales each sum by its row's and token's scales in its epilogue (no int32 round trip through
memory).  Its body is the W4A16 kernel's pipelined "p" body (every operand of a k-tile staged by ``cp.async``,
:data:`STAGES` k-tiles ahead; warps take different row tiles; K shares across blocks meet in the float32 split-K
workspace), tuned per (tokens bucket, shape) from CUDA-graph replays as the W4A16 kernel is.

From 17 tokens on, the weight unpacked once to int8 (``w4a8_mma_unpack``) + the W8A8 Triton int8 GEMM
(:func:`ptqlab.kernels.w4_gemm.int_gemm`, scales and bias in its epilogue) is a tuning candidate too, and above
:data:`MMA_MAX_M` tokens the path taken.  Limits: fp16 outputs, ``N`` divisible by 16, ``K`` by 64 (as the
layout), ``K`` at most 131072 (exact int32 sums).
"""

from __future__ import annotations

import ctypes

import torch

from . import w4_mma
from .w4_mma import Config, _graph_ms, _ptr, pick_fastest, reserve, token_tiles

#: up to this many tokens the MMA kernel (the split-K workspace's rows: w4_mma.MMA_MAX_M); above, unpack + int8 GEMM
MMA_MAX_M = w4_mma.MMA_MAX_M
#: csrc/w4_mma.cu's ``A8_XROW`` (bytes a token row of a staged int8 slice) and ``A8_STAGES``
XROW = 64
STAGES = 4
#: the largest K whose int32 sums cannot overflow (|16 (code - 8)| <= 128, |x| <= 128)
MAX_K = 131072
#: row tiles a warp with a kernel for each token-tile count (csrc/w4_mma.cu: ``W4A8_MMAP``)
ROWS: dict[int, tuple[int, ...]] = {1: (1, 2, 4), 2: (1, 2, 4), 4: (1, 2, 4), 8: (1, 2, 4), 16: (1, 2)}
#: (token tiles) -> the configs tried, ``("p", R, warps, S)`` (the W4A16 kernel's :data:`w4_mma.Config`); the
#: first is the default where no tuning can run (inside a CUDA-graph capture)
CONFIGS: dict[int, list[Config]] = {
    nt: [("p", r, w, s) for r in rows for w in (4, 8) for s in (1, 2, 4, 8, 16)] for nt, rows in ROWS.items()
}
#: the hand-off a key can tune to from 17 tokens on: the weight unpacked once to int8 and the Triton int8 GEMM
UNPACK: Config = ("unpack", 0, 0, 0)


def shared_bytes(nt: int, r: int, warps: int) -> int:
    """The kernel's dynamic shared memory: :data:`STAGES` stages of the int8 input slice and the warps' weight
    tiles (csrc/w4_mma.cu traps if a launch gives it less: the same formula)."""
    return STAGES * (8 * nt * XROW + warps * r * 512)


def _run(cfg: Config, nt: int, device: int, args: list, n: int) -> None:
    _, r, warps, shares = cfg
    blocks = -(-(n // 16) // (r * warps))
    w4_mma._driver().launch(device, f"w4a8_mmap_nt{nt}_r{r}", blocks, 32 * warps, args, grid_y=shares,
                            shared=shared_bytes(nt, r, warps))


_TUNED: dict[tuple, Config] = {}


def _tune(key: tuple, nt: int, device: int, args: list, n: int, unpack) -> Config:
    """The fastest config for this key (from 17 tokens on, :data:`UNPACK` among them), timed on the call's own
    tensors; inside a CUDA-graph capture the default runs and the next eager call tunes."""
    return pick_fastest(_TUNED, key, CONFIGS[nt], lambda cfg: _run(cfg, nt, device, args, n), _graph_ms,
                        (UNPACK, unpack) if nt >= 4 else None)


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """The signed int8 weight ``code - 8`` ``[N, K]`` (row-major) from the MMA layout, in one pass on the GPU."""
    n, k = packed.shape[0] * 16, packed.shape[1] * 64
    w = torch.empty(n, k, dtype=torch.int8, device=packed.device)
    lanes = packed.numel() // 4
    w4_mma._driver().launch(packed.device.index or 0, "w4a8_mma_unpack", -(-lanes // 256), 256,
                            [_ptr(packed), _ptr(w), ctypes.c_int(n), ctypes.c_int(k)])
    return w


def _unpack_path(codes: torch.Tensor, sx: torch.Tensor, packed: torch.Tensor, sw: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """Many tokens: the weight unpacked once to int8 and the W8A8 Triton GEMM (its scales and bias in its
    epilogue; H200, session 37: 1.38-1.57x FP16 at 2048 tokens against 1.02-1.21x for torch._int_mm + a separate
    epilogue)."""
    from .w4_gemm import int_gemm

    return int_gemm(codes, sx, unpack_int8(packed), sw, bias, torch.float16, w4=False)


def w4a8_mma(codes: torch.Tensor, sx: torch.Tensor, packed: torch.Tensor, sw: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(codes * sx[:, None]) @ ((q - 8) * sw[:, None])^T + bias`` in fp16: int8 input codes ``[M, K]`` and their
    float32 per-token scales ``[M]``, the symmetric 4-bit codes ``q`` packed by
    :func:`~ptqlab.kernels.w4_mma.pack_int4_mma`, float32 row scales ``sw [N]``, fp16 ``bias [N]`` or None."""
    m, k = codes.shape
    n = packed.shape[0] * 16
    if codes.dtype != torch.int8 or m < 1 or packed.shape[1] * 64 != k or packed.dtype != torch.int32:
        raise ValueError(f"w4a8_mma: int8 codes [M, {packed.shape[1] * 64}] and the int32 packed weight expected, "
                         f"got {codes.dtype} {tuple(codes.shape)} and {packed.dtype} {tuple(packed.shape)}")
    if sx.dtype != torch.float32 or sx.shape != (m,) or sw.dtype != torch.float32 or sw.shape != (n,):
        raise ValueError(f"w4a8_mma: float32 scales [{m}] and [{n}] expected, got {sx.dtype} {tuple(sx.shape)} "
                         f"and {sw.dtype} {tuple(sw.shape)}")
    if bias is not None and (bias.dtype != torch.float16 or bias.shape != (n,)):
        raise ValueError(f"w4a8_mma: an fp16 bias [{n}] expected, got {bias.dtype} {tuple(bias.shape)}")
    if k > MAX_K:
        raise ValueError(f"w4a8_mma: K = {k} exceeds {MAX_K}, where the int32 sums could overflow")
    codes, sx, sw = codes.contiguous(), sx.contiguous(), sw.contiguous()
    if codes.data_ptr() % 16:  # the kernel copies the input 16 bytes at a time (cp.async)
        codes = codes.clone()
    if m > MMA_MAX_M:
        return _unpack_path(codes, sx, packed, sw, bias)
    y = torch.empty(m, n, dtype=torch.float16, device=codes.device)
    nt, device = token_tiles(m), codes.device.index or 0
    ws, cnt = reserve(n, codes.device)
    args = [_ptr(codes), _ptr(sx), _ptr(packed), _ptr(sw), _ptr(bias), _ptr(y), _ptr(ws), _ptr(cnt),
            ctypes.c_int(m), ctypes.c_int(n), ctypes.c_int(k)]
    cfg = _tune((nt, n, k, device), nt, device, args, n, lambda: _unpack_path(codes, sx, packed, sw, bias))
    if cfg == UNPACK:
        return _unpack_path(codes, sx, packed, sw, bias)
    _run(cfg, nt, device, args, n)
    return y


def emulate(codes: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """The kernel's int32 sums ``[M, N]`` computed on the CPU the way its registers hold them (for the tests):
    each word's bytes unpacked by the same bit operations to ``16 (code - 8)``, the input's bytes permuted by the
    same byte selector, each m16n8k32 step's A [16, 32] x B [32, 8] placed as PTX defines the fragments."""
    tn, chunks = packed.shape[:2]
    n, k = tn * 16, chunks * 64
    m = codes.shape[0]
    words = packed.to(torch.int64) & 0xFFFFFFFF  # [T, C, 32, 4]

    def bytes_of(w: torch.Tensor) -> torch.Tensor:  # uint32 words -> [..., 4] signed bytes, byte 0 first
        b = torch.stack([(w >> (8 * i)) & 0xFF for i in range(4)], dim=-1)
        return torch.where(b >= 128, b - 256, b)

    lo = bytes_of((((words << 4) & 0xFFFFFFFF) & 0xF0F0F0F0) ^ 0x80808080)  # rows g
    hi = bytes_of((words & 0xF0F0F0F0) ^ 0x80808080)  # rows g + 8
    x = torch.zeros(8 * token_tiles(m), k, dtype=torch.int64)
    x[:m] = codes.to(torch.int64)
    xw = x.view(x.shape[0], chunks, 4, 4, 4)  # [tokens, C, t, word of 4 bytes, byte]
    xw = xw[..., [0, 2, 1, 3]]  # prmt 0x3120: result byte b = source byte (0, 2, 1, 3)[b]
    y = torch.zeros(x.shape[0], n, dtype=torch.int64)
    for c in range(chunks):
        for h in range(2):
            a = torch.zeros(tn, 16, 32, dtype=torch.int64)  # [tile, row, mma k]
            b = torch.zeros(32, x.shape[0], dtype=torch.int64)  # [mma k, token]
            for lane in range(32):
                g, t = lane // 4, lane % 4
                # a0: (g, 4t..4t+3) a1: (g+8, 4t..) a2: (g, 16+4t..) a3: (g+8, 16+4t..): words 2h, 2h + 1
                a[:, g, 4 * t:4 * t + 4] = lo[:, c, lane, 2 * h]
                a[:, g + 8, 4 * t:4 * t + 4] = hi[:, c, lane, 2 * h]
                a[:, g, 16 + 4 * t:20 + 4 * t] = lo[:, c, lane, 2 * h + 1]
                a[:, g + 8, 16 + 4 * t:20 + 4 * t] = hi[:, c, lane, 2 * h + 1]
            for t in range(4):  # b0: (k 4t..4t+3, token g) from the lane's word 2h; b1: (16 + 4t..) word 2h + 1
                b[4 * t:4 * t + 4] = xw[:, c, t, 2 * h].t()
                b[16 + 4 * t:20 + 4 * t] = xw[:, c, t, 2 * h + 1].t()
            y += torch.einsum("trk,km->mtr", a, b).reshape(x.shape[0], n)
    return y[:m]

