"""SmoothQuant (Xiao et al., 2023): migrate activation range into the weights before W8A8 / W4A8.

For the linears reading one norm, channel ``j`` gets ``s_j = max|X_j|^a / max|W_j|^(1 - a)`` (``max|W_j|``
over all of them), the norm is divided by ``s`` and their weight columns multiplied by it: the product is
unchanged, the activation outliers shrink by ``s`` and the weights absorb them. ``a`` (``--sq-alpha``) is
the migration strength; 0.5 is the paper's default for OPT and BLOOM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import option, register_options, unit_float
from .registry import BlockContext, Transform, register_transform
from .scaling import linear_inputs, scale_norm


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float = option(0.5, "SmoothQuant migration strength (0: none, 1: all of the range to the weights)",
                          key="sq_alpha", check=unit_float)


register_options("smoothquant", SmoothQuantOptions)


def smooth_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel scale; 1 where a channel never fires or has no weight (nothing to move)."""
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))


@torch.no_grad()
def _prepare_block(ctx: BlockContext) -> dict:
    alpha = ctx.config.options.smoothquant.alpha
    stats = linear_inputs(ctx, [m.linears[0] for m in ctx.mapping.norms])
    log = {}
    for m in ctx.mapping.norms:
        w_max = torch.stack([ctx.module(p).weight.detach().float().abs().amax(0) for p in m.linears]).amax(0)
        s = smooth_scales(stats[m.linears[0]]["max"], w_max.to(stats[m.linears[0]]["max"].device), alpha)
        scale_norm(ctx.block, m, s)
        log[m.norm] = {"s_min": float(s.min()), "s_max": float(s.max())}
    return {"layer": ctx.label, "smoothquant": log}


def _check_config(config) -> str | None:
    if config.method != "fp16" and not config.act.enabled:
        return ("SmoothQuant moves activation range into the weights: it serves activation quantization "
                "(--abits 8 for W8A8, W4A8); for weight-only W4A16/W3A16 use --transform awq")
    return None


register_transform(Transform("smoothquant", "SmoothQuant: activation outliers migrated into the weights (W8A8, W4A8)",
                             needs_calibration=True, prepare_block=_prepare_block, option_sets=("smoothquant",),
                             check_config=_check_config))
