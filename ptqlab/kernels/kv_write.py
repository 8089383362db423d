"""The fused q/k/v output into attention's operands in one Triton kernel (the CUDA-graph decoder's, ptqlab.speed).

Why: after the one q/k/v linear of a layer, the decoder ran three small kernels a layer: ``q * scaling``, and one
``index_copy_`` each for k and v into the static KV cache.  At one to sixteen tokens they move a few KB and cost
their latency: on an H200 (bench/README.md, session 38) the two copies took 2.5 us each (162 us of a 2.6 ms
W4A16 step at batch 1) and the scaling 1 us.  One program a (token, head) reads its q, k and v slices of the fused
output once, writes k and v into the cache at the token's position and the scaled q for SDPA.

Numbers: q is scaled in float32 and rounded once to the model's dtype, as torch's ``q * scaling`` (its opmath);
k and v are copied bit for bit.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def qkv_to_cache_kernel(QKV, POS, KC, VC, Q, T, H, L, D, HD, scaling, BLOCK: tl.constexpr):
        bt = tl.program_id(0).to(tl.int64)  # token bt of the [B * T] rows of the fused output
        h = tl.program_id(1).to(tl.int64)
        b, ti = bt // T, bt % T
        d = tl.arange(0, BLOCK)
        mask = d < D
        row = QKV + bt * 3 * HD + h * D + d
        q = tl.load(row, mask=mask, other=0.0)
        k = tl.load(row + HD, mask=mask, other=0.0)
        v = tl.load(row + 2 * HD, mask=mask, other=0.0)
        p = tl.load(POS + ti).to(tl.int64)
        ok = mask & (p < L)  # (the decoder's positions are inside its cache: never dropped there)
        dst = ((b * H + h) * L + p) * D + d
        tl.store(KC + dst, k, mask=ok)
        tl.store(VC + dst, v, mask=ok)
        tl.store(Q + ((b * H + h) * T + ti) * D + d, (q.to(tl.float32) * scaling).to(Q.dtype.element_ty), mask=mask)

    return qkv_to_cache_kernel


def write_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, heads: int, scaling: float) -> torch.Tensor:
    """Torch's ops for separate ``q``/``k``/``v [B, T, H D]``: k and v into the caches ``[B, H, L, D]`` at
    ``pos [T]`` (``index_copy_``), the scaled ``q [B, H, T, D]`` (a view) returned; HF scales q before the
    product and attends with scale 1."""
    b, t, width = q.shape

    def split_heads(y: torch.Tensor) -> torch.Tensor:
        return y.view(b, t, heads, width // heads).transpose(1, 2)

    k_cache.index_copy_(2, pos, split_heads(k))
    v_cache.index_copy_(2, pos, split_heads(v))
    return split_heads(q * scaling)


def qkv_to_cache(qkv: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 heads: int, scaling: float) -> torch.Tensor:
    """From the fused ``qkv [B, T, 3 H D]`` (q, k, v side by side): k and v into ``k_cache``/``v_cache``
    ``[B, H, L, D]`` at positions ``pos [T]``, and the scaled ``q [B, H, T, D]`` returned (what SDPA reads).

    One Triton kernel on CUDA; elsewhere (CPU) torch's ops (:func:`write_cache`), the same results."""
    b, t, width = qkv.shape
    if width % (3 * heads):
        raise ValueError(f"qkv_to_cache: {width} columns are not q, k and v of {heads} heads each")
    d = width // (3 * heads)
    if k_cache.shape != (b, heads, k_cache.shape[2], d) or v_cache.shape != k_cache.shape or pos.shape != (t,):
        raise ValueError(f"qkv_to_cache: caches [{b}, {heads}, L, {d}] and positions [{t}] expected, got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)} and {tuple(pos.shape)}")
    if not (qkv.is_cuda and k_cache.is_contiguous() and v_cache.is_contiguous()
            and k_cache.dtype == v_cache.dtype == qkv.dtype):
        return write_cache(*qkv.split(heads * d, dim=-1), pos, k_cache, v_cache, heads, scaling)
    import triton

    qkv = qkv.contiguous()
    q = torch.empty(b, heads, t, d, dtype=qkv.dtype, device=qkv.device)
    _kernel()[(b * t, heads)](qkv, pos, k_cache, v_cache, q, t, heads, k_cache.shape[2], d, heads * d, scaling,
                              BLOCK=triton.next_power_of_2(d), num_warps=1 if d <= 128 else 2)
    return q
