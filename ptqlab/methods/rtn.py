"""Round-to-nearest: every weight independently onto its group's grid."""

from __future__ import annotations

import torch

from ..quantizers import QuantSpec, fake_quantize


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> torch.Tensor:
    """``Q(W)`` with scales from each row/group's own range (no calibration)."""
    return fake_quantize(weight.float(), spec, name).to(weight.dtype)
