"""Integer GEMMs that read packed low-bit weights directly: W4A16, W4A8 (4-bit weights, int8 activations), W8A8.

One weight layout, the GPTQ/gemlite one: 4-bit codes packed along K, eight to an int32, ``P [K/8, N]`` with the
code of input column ``8i + j`` in bits ``4j..4j+3`` of row ``i``; scales (and asymmetric zero points, as small
integers) ``[G, N]`` in fp16.  N is the contiguous axis, so a ``[BLOCK_K/8, BLOCK_N]`` tile is one coalesced
load, and one shift per nibble (a broadcast over a third axis of 8) unpacks it to ``[BLOCK_K, BLOCK_N]`` in the
order K needs.  0.5 byte a weight plus 2 (4, asymmetric) bytes per group column: 0.27x FP16 at g128.

Two kernels (the bench places the crossover, :data:`GEMM_MAX_M`, above which W4A16 hands off to unpack + cuBLAS):

* :func:`_gemv_kernel`, one token: no tensor cores (a 1-row product wastes 15/16 of an MMA and forces the
  unpacked tile through shared memory); the weight is unpacked nibble by nibble in its words' own layout, with
  the float "magic number" trick (``q | 0x4B000000`` read as float32 is ``2**23 + q``, so ``- (2**23 + zero)``
  gives ``q - zero`` exactly without a slow int->float conversion), multiplied by the token's inputs in
  registers, and the group scale is applied once per 8 weights; W4A8 at one token runs it on the int8 codes
  (exact in float32) with the token's scale applied at the end, and W8A8 on its int8 ``[N, K]`` weight;
* :func:`_gemm_kernel`, 2+ tokens, on the tensor cores: the same unpack to fp16 (``q | 0x6400`` read as fp16 is
  ``1024 + q``) or, for int8 activations, to int8 ``q - 8``, then ``tl.dot``; the int8 variant applies the per-token
  x per-channel scales and the bias in the epilogue, on the int32 accumulator in registers (no int32 round trip
  through memory as with ``torch._int_mm``).  W8A8 uses the same kernel with an int8 ``[N, K]`` weight.  At 16-64
  tokens configs with the operands swapped (``y^T = W x^T``: the unpacked weight as the MMA's first operand, the
  few tokens as its narrow side) compete with the plain order in autotune.

LoRC (``lorc=(V, U)``): both kernels add ``(x V^T) U^T`` in their epilogue.  The product is linear in x, so each
K share computes its part ``t`` of ``x V^T`` next to the main product and adds ``t U^T``: one launch, no side GEMMs.

Few tokens give few output tiles, too few to fill the GPU, so both kernels can split K (``SPLIT_K`` programs per
tile, up to :data:`SPLIT_MAX_M` tokens): each adds its float32 partial to a shared workspace with atomics, and the
last one to arrive (a ticket counter per tile) adds the bias, writes the output and zeroes the workspace and ticket
for the next call: one launch, no memset.  Block sizes, the split and the operand order come from
``triton.autotune`` over a handful of configs keyed on (M bucket, N, K, group, LoRC rank, weight and activation
kind).  A chunk of K never straddles a quantization group (``BLOCK_K`` divides the group).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: W4A16 above this many tokens: unpack the weight to fp16 and cuBLAS. On the H200 the Triton GEMM (split-K) won
#: at 128 tokens on four of the five OPT/Llama shapes (0.56-0.68x FP16 against 0.39-0.49x) and lost or tied at 256
#: (0.44-0.60x against 0.59-0.65x): bench/results/w4_gemm_h200_session29.jsonl
GEMM_MAX_M = 128
#: split-K only up to this many tokens (it bounds the workspace: SPLIT_MAX_M x N float32, 29 MB at N = 28672)
SPLIT_MAX_M = 256
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def m_bucket(m: int) -> int:
    """The autotune key for M: 1, 2..16, 32, 64, 128, 256, larger (configs differ by bucket, not by exact M)."""
    return 1 if m == 1 else min(max(16, triton.next_power_of_2(m)), 512)


def _prune(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    """Keep the configs of this M bucket; BLOCK_K clamped to the group (a chunk reads one scale row); no split-K
    above SPLIT_MAX_M (no workspace there) or beyond the K chunks there are."""
    bucket, group, k = nargs["M_BUCKET"], nargs["GROUP"], nargs["K"]
    seen, out = set(), []
    for c in configs:
        kw = dict(c.kwargs)
        if kw.pop("BUCKETS") and bucket not in c.kwargs["BUCKETS"]:
            continue
        if group & (group - 1) == 0:  # a power-of-two group (else: per row, one group of any K)
            kw["BLOCK_K"] = min(kw["BLOCK_K"], group)
        kw["BLOCK_K"] = min(kw["BLOCK_K"], max(32, triton.next_power_of_2(k)))
        if bucket > SPLIT_MAX_M:
            kw["SPLIT_K"] = 1
        kw["SPLIT_K"] = max(1, min(kw["SPLIT_K"], triton.cdiv(k, kw["BLOCK_K"])))
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    if out and os.environ.get("PTQLAB_W4_AUTOTUNE") == "rotate":
        # the GPU tests: one config per key, a different one from key to key, so that every config runs somewhere
        # on the suite's hundreds of shapes without compiling and timing all of them for each (minutes per run)
        return [out[(nargs["N"] * 7 + k * 3 + group + bucket) % len(out)]]
    fallback = {k: v for k, v in configs[0].kwargs.items() if k != "BUCKETS"}  # (the kernel's own arguments)
    fallback.update(BLOCK_M=16, BLOCK_N=64, BLOCK_K=min(32, group), SPLIT_K=1)
    if "SWAP" in fallback:
        fallback["SWAP"] = False
    return out or [triton.Config(fallback)]


def _cfg(buckets: tuple[int, ...], bm: int, bn: int, bk: int, split: int, warps: int, stages: int,
         swap: bool | None = None) -> triton.Config:
    kw = {"BUCKETS": buckets, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}
    if swap is not None:  # the GEMM's operand order (its docstring)
        kw["SWAP"] = swap
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def _bench(fn, quantiles=None):  # a short autotune benchmark: a handful of configs per (bucket, N, K)
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


GEMV_CONFIGS = [_cfg((1,), 1, bn, bk, s, w, st) for bn, bk, s, w, st in (
    (64, 128, 4, 4, 2), (128, 128, 4, 4, 2), (64, 128, 8, 4, 2), (128, 64, 8, 4, 3), (256, 64, 4, 8, 2))]
_SMALL_M = {16: ((64, 128, 4, 4, 3), (128, 128, 2, 4, 3), (64, 64, 8, 4, 4), (128, 64, 4, 4, 4))}  # bn, bk, split..
_MID_M = ((32, 64, 128, 4, 4, 3), (32, 128, 64, 2, 4, 4), (64, 128, 64, 2, 4, 4), (64, 64, 128, 2, 4, 3))
GEMM_CONFIGS = [
    # at 16-64 tokens both operand orders compete (autotune keeps the faster per shape)
    *[_cfg((16,), 16, bn, bk, s, w, st, swap) for swap in (False, True) for bn, bk, s, w, st in _SMALL_M[16]],
    *[_cfg((32, 64), bm, bn, bk, s, w, st, swap) for swap in (False, True) for bm, bn, bk, s, w, st in _MID_M],
    *[_cfg((128, 256, 512), bm, bn, bk, 1, w, st, False) for bm, bn, bk, w, st in (
        (64, 128, 64, 4, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3))],
    # 128-256 tokens on a narrow layer (4096 outputs: 32-64 tiles for 132 SMs) need split-K to fill the GPU: without
    # it the H200 measured 0.18-0.27x FP16 there (bench/results/w4_gemm_h200_session29.jsonl)
    *[_cfg((128, 256), bm, bn, bk, s, w, st, swap) for bm, bn, bk, s, w, st, swap in (
        (64, 128, 64, 2, 4, 4, False), (64, 128, 64, 4, 4, 4, False), (128, 128, 64, 2, 8, 3, False),
        (128, 128, 64, 4, 8, 3, False), (64, 128, 64, 4, 4, 4, True), (128, 128, 64, 2, 8, 3, True))],
]
if _INTERPRET:  # the interpreter cannot time configs: one small config (twice: autotune prunes only a list)
    GEMV_CONFIGS = [_cfg((), 1, 32, 64, 2, 4, 1), _cfg((0,), 1, 32, 64, 2, 4, 1)]
    # PTQLAB_W4_SWAP=1: the swapped operand order (the developer's check of that path)
    swap = os.environ.get("PTQLAB_W4_SWAP") == "1"
    GEMM_CONFIGS = [_cfg((), 16, 32, 64, 2, 4, 1, swap), _cfg((0,), 16, 32, 64, 2, 4, 1, swap)]
_TUNE = {"key": ["M_BUCKET", "N", "K", "GROUP", "RANK", "W4", "A8"], "prune_configs_by": {"early_config_prune": _prune}}
if not _INTERPRET:
    _TUNE["do_bench"] = _bench


@triton.jit
def _unpack(p, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[BLOCK_K/8, BLOCK_N]`` int32 words -> ``[BLOCK_K/8, 8, BLOCK_N]`` codes 0..15 (column 8i + j at [i, j])."""
    shifts = (tl.arange(0, 8) * 4)[None, :, None]
    return (p[:, None, :] >> shifts) & 15


@triton.jit
def _finish(y, rm, rn, mask, Y, B, WS, CNT, tile, N, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store ``y`` (+ bias); with split-K, accumulate into the workspace and let the last program of the tile store."""
    offs = rm[:, None] * N + rn[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(WS + offs, y, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is issued before the ticket (release) is taken
        ticket = tl.atomic_add(CNT + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:
            # read the sum where the atomics were performed (L2), then zero it for the next call (a later launch)
            total = tl.atomic_add(WS + offs, tl.zeros_like(y), mask=mask, sem="acquire")
            tl.store(WS + offs, tl.zeros_like(y), mask=mask)
            if HAS_BIAS:
                total += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + offs, total.to(Y.dtype.element_ty), mask=mask)
            tl.store(CNT + tile, 0)


@triton.autotune(configs=GEMV_CONFIGS, **_TUNE)
@triton.jit
def _gemv_kernel(X, P, S, Z, SX, B, LV, LU, Y, WS, CNT, N, K, GROUP, M_BUCKET, RANK,
                 W4: tl.constexpr, SYM: tl.constexpr, A8: tl.constexpr, HAS_BIAS: tl.constexpr, LORC_R: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # weight: W4 packed [K/8, N] int32 with scales [G, N], or (not W4) int8 [N, K] with float32 row scales [N]
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    ri = tl.arange(0, BLOCK_K // 8)
    chunks = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(chunks, SPLIT_K)
    if W4:
        acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)  # reduced over K rows once, at the end
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if LORC_R > 0:
        rr = tl.arange(0, LORC_R)
        t = tl.zeros((LORC_R,), dtype=tl.float32)  # this program's share of the token's x V^T (K is split)
    for c in range(pid_k * per, tl.minimum(pid_k * per + per, chunks)):
        k0 = c * BLOCK_K
        if W4:
            rows = k0 // 8 + ri
            rmask = rows < K // 8
            p = tl.load(P + rows[:, None] * N + rn[None, :], mask=rmask[:, None] & nmask[None, :], other=0)
            g = k0 // GROUP
            s = tl.load(S + g * N + rn, mask=nmask, other=0.0).to(tl.float32)
            if SYM:
                zc = 8388616.0  # 2**23 + 8
            else:
                zc = (8388608.0 + tl.load(Z + g * N + rn, mask=nmask, other=0.0).to(tl.float32))[None, :]
            # nibble j of every word, one at a time, in the words' own [BLOCK_K/8, BLOCK_N] layout: no 3-D unpack,
            # no reshape and no cross-thread sum over the 8 codes of a word (the first version's broadcast over a
            # third axis of 8 did both, and ran at 23-41% of the memory floor on the H200)
            part = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(X + rows * 8 + j, mask=rmask, other=0.0).to(tl.float32)  # input column 8i + j
                v = (((p >> (4 * j)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - zc  # = code - zero, exact
                part += xj[:, None] * v
            acc += part * s[None, :]
        else:  # int8 [N, K]: a [BLOCK_K, BLOCK_N] tile contiguous along K, summed over K per chunk
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            w = tl.load(P + rn[None, :] * K + rk[:, None], mask=kmask[:, None] & nmask[None, :], other=0)
            xk = tl.load(X + rk, mask=kmask, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * xk[:, None], axis=0)
        if LORC_R > 0:
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            xk = tl.load(X + rk, mask=kmask, other=0.0).to(tl.float32)
            lv = tl.load(LV + rr[:, None] * K + rk[None, :], mask=(rr < RANK)[:, None] & kmask[None, :], other=0.0)
            t += tl.sum(lv.to(tl.float32) * xk[None, :], axis=1)
    if W4:
        y = tl.sum(acc, axis=0)[None, :]
    else:
        y = (acc * tl.load(S + rn, mask=nmask, other=0.0).to(tl.float32))[None, :]
    if LORC_R > 0:  # + (x V^T) U^T for this K share: the side product is linear in x, so split-K sums it too
        lu = tl.load(LU + rn[:, None] * RANK + rr[None, :], mask=nmask[:, None] & (rr < RANK)[None, :], other=0.0)
        y += tl.sum(lu.to(tl.float32) * t[None, :], axis=1)[None, :]
    if A8:  # int8 input codes: the token's scale (the weight's row scale came in as its one group's scale)
        y = y * tl.load(SX).to(tl.float32)
    _finish(y, tl.zeros((1,), dtype=tl.int32), rn, nmask[None, :], Y, B, WS, CNT, pid_n, N, HAS_BIAS, SPLIT_K)


@triton.autotune(configs=GEMM_CONFIGS, **_TUNE)
@triton.jit
def _gemm_kernel(X, P, S, Z, SX, B, LV, LU, Y, WS, CNT, M, N, K, GROUP, M_BUCKET, RANK,
                 W4: tl.constexpr, A8: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr, LORC_R: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 SWAP: tl.constexpr):
    # weight: W4 packed [K/8, N] int32 with fp16 scales [G, N] (A16) / float32 row scales [N] (A8),
    #         or (not W4) int8 [N, K] with float32 row scales [N];  input: fp16/bf16 [M, K] or int8 codes + SX [M]
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // tiles_n, pid % tiles_n  # consecutive programs share an input tile, stream the weight
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = rm < M, rn < N
    rk = tl.arange(0, BLOCK_K)
    ri = tl.arange(0, BLOCK_K // 8)
    chunks = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(chunks, SPLIT_K)
    # SWAP: y^T = W x^T, the unpacked weight as the MMA's first operand (on Hopper it may stay in registers, where
    # the second operand must come through shared memory) and the few tokens as its narrow side
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32 if A8 else tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if A8 else tl.float32)
    if LORC_R > 0:
        rr = tl.arange(0, LORC_R)
        t = tl.zeros((BLOCK_M, LORC_R), dtype=tl.float32)  # x V^T over this program's K share
    for c in range(pid_k * per, tl.minimum(pid_k * per + per, chunks)):
        k0 = c * BLOCK_K
        kmask = k0 + rk < K
        a = tl.load(X + rm[:, None] * K + (k0 + rk)[None, :], mask=mmask[:, None] & kmask[None, :], other=0)
        if W4:
            rows = k0 // 8 + ri
            p = tl.load(P + rows[:, None] * N + rn[None, :], mask=(rows < K // 8)[:, None] & nmask[None, :], other=0)
            q = _unpack(p, BLOCK_K, BLOCK_N)
            if A8:
                w = tl.reshape((q - 8).to(tl.int8), (BLOCK_K, BLOCK_N))  # symmetric grid: signed codes
            else:
                g = k0 // GROUP
                s = tl.load(S + g * N + rn, mask=nmask, other=0.0)
                v = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)  # 1024 + code, exact
                if SYM:
                    d = v - 1032.0  # 1024 + 8
                else:
                    z = tl.load(Z + g * N + rn, mask=nmask, other=0.0).to(tl.float16)
                    d = v - (z + 1024.0)[None, None, :]
                w = tl.reshape(d * s[None, None, :], (BLOCK_K, BLOCK_N)).to(X.dtype.element_ty)
        else:
            w = tl.load(P + rn[None, :] * K + (k0 + rk)[:, None], mask=kmask[:, None] & nmask[None, :], other=0)
        if SWAP:
            acc = tl.dot(tl.trans(w), tl.trans(a), acc, out_dtype=tl.int32 if A8 else tl.float32)
        else:
            acc = tl.dot(a, w, acc, out_dtype=tl.int32 if A8 else tl.float32)
        if LORC_R > 0:  # V^T [BLOCK_K, LORC_R] (rank padded to a tensor-core tile); int8 codes are exact in fp16
            lv = tl.load(LV + rr[None, :] * K + (k0 + rk)[:, None], mask=kmask[:, None] & (rr < RANK)[None, :],
                         other=0.0)
            t = tl.dot(a.to(lv.dtype), lv, t)
    if SWAP:
        acc = tl.trans(acc)
    if A8:  # the int32 accumulator scaled in registers: per token x per output channel
        sx = tl.load(SX + rm, mask=mmask, other=0.0)
        sw = tl.load(S + rn, mask=nmask, other=0.0)
        y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    else:
        y = acc
    if LORC_R > 0:  # + (x V^T) U^T, x V^T rounded to the model's dtype as the unfused side GEMMs do
        if A8:
            t = t * tl.load(SX + rm, mask=mmask, other=0.0)[:, None]
        lu = tl.load(LU + rn[None, :] * RANK + rr[:, None], mask=(rr < RANK)[:, None] & nmask[None, :], other=0.0)
        y += tl.dot(t.to(lu.dtype), lu)
    _finish(y, rm, rn, mmask[:, None] & nmask[None, :], Y, B, WS, CNT, pid, N, HAS_BIAS, SPLIT_K)


# ---------------------------------------------------------------- layout and launch


def pack_int4_k(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes 0..15 (K a multiple of 8) to the kernels' ``[K/8, N]`` int32 words (module docstring)."""
    n, k = codes.shape
    if k % 8:
        raise ValueError(f"packing 4-bit codes along K needs K divisible by 8, got {k}")
    c = codes.t().reshape(k // 8, 8, n).to(torch.int64)
    words = (c << (4 * torch.arange(8, device=codes.device)).view(1, 8, 1)).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_int4_k_reference(packed: torch.Tensor) -> torch.Tensor:
    """Torch inverse of :func:`pack_int4_k`: ``[N, K]`` uint8 codes."""
    k8, n = packed.shape
    codes = (packed.to(torch.int64)[:, None, :] >> (4 * torch.arange(8, device=packed.device)).view(1, 8, 1)) & 15
    return codes.reshape(k8 * 8, n).t().to(torch.uint8).contiguous()


class Workspace:
    """The split-K partial sums (float32 ``[SPLIT_MAX_M, N]``) and tile tickets of one device, zero between calls.

    Shared by every layer (one kernel runs at a time on a stream); sized at build time, before any CUDA-graph
    capture, so that a forward never allocates it."""

    def __init__(self) -> None:
        self.buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def reserve(self, n: int, device: torch.device) -> None:
        ws, cnt = self.buffers.get(device, (None, None))
        if ws is None or ws.numel() < SPLIT_MAX_M * n:
            self.buffers[device] = (torch.zeros(SPLIT_MAX_M * n, dtype=torch.float32, device=device),
                                    torch.zeros(SPLIT_MAX_M * triton.cdiv(n, 16), dtype=torch.int32, device=device))

    def get(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        self.reserve(n, device)
        return self.buffers[device]


WORKSPACE = Workspace()


Lorc = tuple[torch.Tensor, torch.Tensor]


def w4a16_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               group: int, bias: torch.Tensor | None = None, perm: torch.Tensor | None = None,
               lorc: Lorc | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T + bias`` for the 4-bit weight ``W = (code - zero) * scale`` in the packed layout.

    ``scale``/``zero`` ``[G, N]`` fp16 (``zero`` None: symmetric, zero point 8); ``group`` = K / G.  Any M (the
    caller hands large M to :func:`dequant_w4`); the output has ``x``'s dtype.  ``perm``: act-order weights whose
    groups are not contiguous in K (GPTQ's ``g_idx``) are stored with their columns sorted by group, ``W[:, perm]``;
    the input is permuted the same way (``x[:, perm] @ W[:, perm]^T = x @ W^T``).  ``lorc``: LoRC's ``(V [r, K],
    U [N, r])`` in ``x``'s dtype (``V``'s columns in the packed weight's order), ``+ (x V^T) U^T`` inside the same
    kernel: no side GEMMs, no second pass over the output.
    """
    m, k = x.shape
    n = packed.shape[1]
    x = x.contiguous() if perm is None else x.index_select(1, perm)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws, cnt = WORKSPACE.get(n, x.device)
    z = zero if zero is not None else scale
    b = bias if bias is not None else scale
    args = (x, packed, scale, z, scale, b, *_lorc_args(lorc, x.dtype, k, n, scale), y, ws, cnt)
    if m == 1:
        _launch_gemv(*args, n, k, group, w4=True, a8=False, sym=zero is None, has_bias=bias is not None)
    else:
        _launch_gemm(*args, m, n, k, group, w4=True, a8=False, sym=zero is None, has_bias=bias is not None)
    return y


def int_gemm(codes: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor, sw: torch.Tensor,
             bias: torch.Tensor | None, dtype: torch.dtype, w4: bool, lorc: Lorc | None = None) -> torch.Tensor:
    """``(codes * sx[:, None]) @ (W * sw[:, None])^T + bias`` in ``dtype``: int8 input codes ``[M, K]``, the weight
    as signed int8 ``[N, K]`` (``w4`` False) or symmetric 4-bit codes packed ``[K/8, N]`` (``w4``), float32 scales.
    ``lorc``: ``(V, U)`` in ``dtype``, ``+ ((codes * sx) V^T) U^T`` in the same kernel (as :func:`w4a16_gemm`)."""
    m, k = codes.shape
    n = weight.shape[1] if w4 else weight.shape[0]
    y = torch.empty(m, n, dtype=dtype, device=codes.device)
    ws, cnt = WORKSPACE.get(n, codes.device)
    b = bias if bias is not None else sw
    args = (codes.contiguous(), weight, sw, sw, sx, b, *_lorc_args(lorc, dtype, k, n, sw), y, ws, cnt)
    if m == 1:
        # one token: a GEMV without tensor cores on the int8 codes (exact as float32), the weight's row scale as
        # its one group's scale and the token's scale at the end. The tensor-core GEMM wastes 15/16 of each MMA
        # here and measured 0.30-0.84x FP16 (W4A8) and 0.20-0.85x (W8A8) on the H200
        # (bench/results/w4_gemm_h200.jsonl), half the GEMV's speed or less.
        _launch_gemv(*args, n, k, k, w4=w4, a8=True, sym=True, has_bias=bias is not None)
    else:
        _launch_gemm(*args, m, n, k, k, w4=w4, a8=True, sym=True, has_bias=bias is not None)
    return y


def _lorc_args(lorc: Lorc | None, dtype: torch.dtype, k: int, n: int, dummy: torch.Tensor) -> tuple:
    """``(V, U, rank)`` for the kernels (any tensor stands in for absent pointers, rank 0)."""
    if lorc is None:
        return dummy, dummy, 0
    v, u = lorc
    r = v.shape[0]
    if v.shape != (r, k) or u.shape != (n, r) or v.dtype != dtype or u.dtype != dtype:
        raise ValueError(f"LoRC factors must be V [{r}, {k}] and U [{n}, {r}] in {dtype}, got "
                         f"{tuple(v.shape)} {v.dtype} and {tuple(u.shape)} {u.dtype}")
    return v.contiguous(), u.contiguous(), r


def _launch_gemv(x, w, s, z, sx, b, lv, lu, rank, y, ws, cnt, n, k, group, w4, a8, sym, has_bias) -> None:
    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"]
    lorc_r = max(2, triton.next_power_of_2(rank)) if rank else 0
    _gemv_kernel[grid](x, w, s, z, sx, b, lv, lu, y, ws, cnt, n, k, group, 1, rank,
                       W4=w4, SYM=sym, A8=a8, HAS_BIAS=has_bias, LORC_R=lorc_r)


def _launch_gemm(x, w, s, z, sx, b, lv, lu, rank, y, ws, cnt, m, n, k, group, w4, a8, sym, has_bias) -> None:
    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"]
    lorc_r = max(16, triton.next_power_of_2(rank)) if rank else 0  # tl.dot's smallest tile side
    _gemm_kernel[grid](x, w, s, z, sx, b, lv, lu, y, ws, cnt, m, n, k, group, m_bucket(m), rank,
                       W4=w4, A8=a8, SYM=sym, HAS_BIAS=has_bias, LORC_R=lorc_r)


@triton.jit
def _dequant_kernel(P, S, Z, W, N, K, GROUP, SYM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # one [BLOCK_K, BLOCK_N] tile of W^T [K, N] (BLOCK_K divides the group, or the group is the whole row)
    rk8 = tl.program_id(0) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    g = tl.program_id(0) * BLOCK_K // GROUP
    p = tl.load(P + rk8[:, None] * N + rn[None, :], mask=(rk8 < K // 8)[:, None] & nmask[None, :], other=0)
    s = tl.load(S + g * N + rn, mask=nmask, other=0.0).to(tl.float32)
    if SYM:
        z = 8.0
    else:
        z = tl.load(Z + g * N + rn, mask=nmask, other=0.0).to(tl.float32)[None, None, :]
    w = tl.reshape((_unpack(p, BLOCK_K, BLOCK_N).to(tl.float32) - z) * s[None, None, :], (BLOCK_K, BLOCK_N))
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(W + rk[:, None] * N + rn[None, :], w.to(W.dtype.element_ty), mask=(rk < K)[:, None] & nmask[None, :])


def dequant_w4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The transposed weight ``W^T [K, N]`` of ``dtype`` (for ``torch.addmm(bias, x, W^T)``), one pass."""
    k, n = packed.shape[0] * 8, packed.shape[1]
    w = torch.empty(k, n, dtype=dtype, device=packed.device)
    block_k = 32
    _dequant_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, 128))](
        packed, scale, zero if zero is not None else scale, w, n, k, group, SYM=zero is None,
        BLOCK_K=block_k, BLOCK_N=128, num_warps=4)
    return w
