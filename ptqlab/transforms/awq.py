"""AWQ (Lin et al., 2024): activation-aware per-channel weight scaling for weight-only quantization.

For each group of linears reading one norm (and each V -> output, up -> down pair), channel ``j`` is
scaled by ``s_j = mean|X_j|^a`` (normalised so ``max s * min s = 1``): salient input channels get larger
weights, whose rounding error then costs less relative to them. ``a`` is chosen on a grid of ``--awq-grid``
points in ``[0, 1)`` by the error of the *block output* with those linears quantized (round to nearest on
the run's weight spec) against the full-precision block; ``a = 0`` (no scaling) is on the grid, so AWQ
never picks a scaling worse than none on its own objective. ``--awq-clip`` then searches, per output row and
group, the clipping of the weight range (ratios 1.0 down to 0.5) that minimises that group's output error,
as the AWQ reference does; q and k are not clipped (attention scores amplify their error).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import int_at_least, option, register_options
from ..quantizers import PER_TENSOR, fake_quantize
from .registry import BlockContext, Transform, register_transform
from .scaling import linear_inputs, pair_applies, put_back, scale_norm, scale_pair, snapshot

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 ... 0.5
CLIP_TOKENS = 512  # input rows kept per linear for the clipping search
_NO_CLIP = ("q_proj", "k_proj", "query_key_value")


@dataclass(frozen=True)
class AWQOptions:
    grid: int = option(20, "AWQ: points of the scale exponent grid in [0, 1)", key="awq_grid", check=int_at_least(1))
    clip: bool = option(True, "AWQ: also search the clipping of each group's range", key="awq_clip")


register_options("awq", AWQOptions)


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_mean.clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def _quantize_in_place(ctx: BlockContext, paths: tuple[str, ...]) -> None:
    for path in paths:
        w = ctx.module(path).weight
        w.data = fake_quantize(w.data.float(), ctx.config.weight, path).to(w.dtype)


@torch.no_grad()
def search_scale(ctx: BlockContext, x_mean: torch.Tensor, apply, quantized: tuple[str, ...], touched: tuple[str, ...],
                 targets: torch.Tensor, grid: int) -> tuple[float, list[float]]:
    """The exponent of the grid with the least block-output error (``apply(s)`` scales, ``quantized`` are the
    linears rounded in the trial), and every trial's error; the block is left unscaled."""
    saved = snapshot(ctx.block, touched)
    losses = []
    for i in range(grid):
        alpha = i / grid
        apply(awq_scales(x_mean, alpha))
        _quantize_in_place(ctx, quantized)
        out = ctx.outputs()
        losses.append(float((out.float() - targets.float()).pow(2).mean()))
        put_back(ctx.block, saved)
    best = min(range(grid), key=losses.__getitem__)
    return best / grid, losses


@torch.no_grad()
def search_clip(weight: torch.Tensor, rows: torch.Tensor, spec, chunk: int = 256) -> torch.Tensor:
    """Per (output row, group) clipping ratio with the least output error of that group on ``rows`` [t, in]."""
    out, inp = weight.shape
    g = inp if spec.group_size == 0 else spec.group_size
    ng = inp // g
    x = rows.float().to(weight.device).view(-1, ng, g)  # [t, ng, g]
    best = torch.ones(out, ng, device=weight.device)
    for r0 in range(0, out, chunk):
        w = weight[r0:r0 + chunk].float()
        wg = w.view(-1, ng, g)
        amax = wg.abs().amax(-1, keepdim=True)
        least = torch.full((w.shape[0], ng), float("inf"), device=weight.device)
        for ratio in CLIP_RATIOS:
            clipped = torch.maximum(torch.minimum(wg, amax * ratio), -amax * ratio)
            q = fake_quantize(clipped.view_as(w), spec, "awq clip").view(-1, ng, g)
            err = torch.einsum("tkg,okg->otk", x, wg - q).pow(2).mean(1)  # [rows, ng]
            better = err < least
            least = torch.where(better, err, least)
            best[r0:r0 + chunk] = torch.where(better, torch.full_like(err, ratio), best[r0:r0 + chunk])
    return best


@torch.no_grad()
def _prepare_block(ctx: BlockContext) -> dict:
    opts = ctx.config.options.awq
    pairs = [p for p in ctx.mapping.pairs if pair_applies(ctx.block, p)]
    readers = [m.linears[0] for m in ctx.mapping.norms] + [p.next for p in pairs]
    stats = linear_inputs(ctx, readers, keep_tokens=CLIP_TOKENS if opts.clip else 0)
    targets = ctx.outputs()
    log: dict = {}
    for m in ctx.mapping.norms:
        alpha, losses = search_scale(ctx, stats[m.linears[0]]["mean"], lambda s, m=m: scale_norm(ctx.block, m, s),
                                     m.linears, (m.norm, *m.linears), targets, opts.grid)
        scale_norm(ctx.block, m, awq_scales(stats[m.linears[0]]["mean"], alpha))
        log[m.norm] = {"alpha": alpha, "losses": losses}
    for p in pairs:
        alpha, losses = search_scale(ctx, stats[p.next]["mean"], lambda s, p=p: scale_pair(ctx.block, p, s),
                                     (p.next,), (p.prev, p.next), targets, opts.grid)
        scale_pair(ctx.block, p, awq_scales(stats[p.next]["mean"], alpha))
        log[p.prev] = {"alpha": alpha, "losses": losses}
    if opts.clip and ctx.config.weight.group_size != PER_TENSOR:
        # the clipping search sees each linear's input after the scaling (its columns were multiplied by s)
        clip_stats = linear_inputs(ctx, [p for m in ctx.mapping.norms for p in m.linears]
                                   + [p.next for p in pairs], keep_tokens=CLIP_TOKENS)
        clips = {}
        for path, st in clip_stats.items():
            if any(tag in path for tag in _NO_CLIP):
                continue
            w = ctx.module(path).weight
            ratio = search_clip(w.data, st["rows"], ctx.config.weight)
            out, inp = w.shape
            ng = ratio.shape[1]
            wg = w.data.float().view(out, ng, inp // ng)
            limit = wg.abs().amax(-1, keepdim=True) * ratio[..., None]
            w.data = torch.maximum(torch.minimum(wg, limit), -limit).view(out, inp).to(w.dtype)
            clips[path] = float(ratio.mean())
        log["clip_mean_ratio"] = clips
    return {"layer": ctx.label, "awq": log}


def _check_config(config) -> str | None:
    if config.method == "fp16" or not config.weight.enabled:
        return ("AWQ searches its scales on the weight grid it serves: give a weight method and bits "
                "(--method rtn or gptq, --wbits 4)")
    if config.act.enabled:
        return ("AWQ is weight-only (W4A16, W3A16): with activation quantization (--abits "
                f"{config.act.bits}) use --transform smoothquant or rotate")
    return None


register_transform(Transform("awq", "AWQ: activation-aware weight scaling, searched on the block output (weight-only)",
                             needs_calibration=True, prepare_block=_prepare_block, option_sets=("awq",),
                             check_config=_check_config))
