"""Round-to-nearest: every weight independently onto its group's grid."""

from __future__ import annotations

import torch

from ..quantizers import QuantSpec, fake_quantize, weight_qparams
from .registry import Method, WeightResult, register


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> torch.Tensor:
    """``Q(W)`` with scales from each row/group's own range (no calibration)."""
    return fake_quantize(weight.float(), spec, name).to(weight.dtype)


def _solve(W: torch.Tensor, H: torch.Tensor | None, config, name: str) -> WeightResult:
    scale, zero = weight_qparams(W, config.weight, name)
    return WeightResult(rtn_quantize(W, config.weight, name), scale, zero)


register(Method("rtn", "round to nearest", needs_calibration=False, solve_layer=_solve))
