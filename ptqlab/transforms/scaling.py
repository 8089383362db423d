"""Per-channel scales moved between a norm (or a linear) and the linears after it: SmoothQuant's and AWQ's
common ground. Dividing a norm's weight and bias (or ``prev``'s output rows) by ``s`` and multiplying the
next linears' input columns by ``s`` leaves the block's function unchanged."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..models import NormMapping, ScalePair
from .registry import BlockContext


def linear_inputs(ctx: BlockContext, paths: Iterable[str], keep_tokens: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Per-channel statistics of the inputs of the linears at ``paths``, over every calibration token:
    ``max`` (of |x|), ``mean`` (of |x|), and with ``keep_tokens`` a uniform sample of that many input rows."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    handles = []
    step = max(1, ctx.hidden.shape[0] * ctx.hidden.shape[1] // max(keep_tokens, 1))  # every step-th token

    def hook(path: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = stats.setdefault(path, {"max": torch.zeros(x.shape[1], device=x.device),
                                        "sum": torch.zeros(x.shape[1], device=x.device, dtype=torch.float64)})
            a = x.abs()
            torch.maximum(s["max"], a.amax(0), out=s["max"])
            s["sum"] += a.sum(0, dtype=torch.float64)
            counts[path] = counts.get(path, 0) + x.shape[0]
            if keep_tokens:
                s.setdefault("rows", []).append(x[::step].clone())  # type: ignore[union-attr]

        return record

    for path in dict.fromkeys(paths):
        handles.append(ctx.module(path).register_forward_pre_hook(hook(path)))
    try:
        ctx.forward()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for path, s in stats.items():
        entry = {"max": s["max"], "mean": (s["sum"] / counts[path]).float()}
        if keep_tokens:
            rows = torch.cat(s["rows"])  # type: ignore[arg-type]
            entry["rows"] = rows[torch.linspace(0, len(rows) - 1, min(keep_tokens, len(rows))).long()]
        out[path] = entry
    return out


@torch.no_grad()
def scale_norm(block: nn.Module, mapping: NormMapping, s: torch.Tensor) -> None:
    """``norm /= s``, ``linear[:, j] *= s_j`` for the linears reading the norm."""
    norm = block.get_submodule(mapping.norm)
    for p in (norm.weight, getattr(norm, "bias", None)):
        if p is not None:
            p.data = (p.data.float() / s.to(p.device)).to(p.dtype)
    for path in mapping.linears:
        w = block.get_submodule(path).weight
        w.data = (w.data.float() * s.to(w.device)).to(w.dtype)


@torch.no_grad()
def scale_pair(block: nn.Module, pair: ScalePair, s: torch.Tensor) -> None:
    """``prev``'s output channel ``j`` divided by ``s_j``, ``next``'s input column ``j`` multiplied by it."""
    prev, nxt = block.get_submodule(pair.prev), block.get_submodule(pair.next)
    prev.weight.data = (prev.weight.data.float() / s.to(prev.weight.device)[:, None]).to(prev.weight.dtype)
    if prev.bias is not None:
        prev.bias.data = (prev.bias.data.float() / s.to(prev.bias.device)).to(prev.bias.dtype)
    nxt.weight.data = (nxt.weight.data.float() * s.to(nxt.weight.device)).to(nxt.weight.dtype)


def pair_applies(block: nn.Module, pair: ScalePair) -> bool:
    """A V -> output pair of grouped-query attention has fewer V channels than output inputs: no shared scale."""
    prev, nxt = block.get_submodule(pair.prev), block.get_submodule(pair.next)
    return prev.weight.shape[0] == nxt.weight.shape[1]


def snapshot(block: nn.Module, paths: Iterable[str]) -> dict[str, torch.Tensor]:
    """Copies of the parameters of the modules at ``paths`` (to undo a trial scaling)."""
    out = {}
    for path in dict.fromkeys(paths):
        for name, p in block.get_submodule(path).named_parameters(recurse=False):
            out[f"{path}.{name}"] = p.data.clone()
    return out


def put_back(block: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for key, value in saved.items():
        path, _, name = key.rpartition(".")
        getattr(block.get_submodule(path), name).data = value.clone()
