"""The float64 reference grid shared by the quantizer and method tests (written independently of ptqlab)."""

from __future__ import annotations

import pytest
import torch


def ref_params(xg: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference scale and zero point of each group (last dim) of xg, float64, keepdim."""
    maxq = 2**bits - 1
    lo = torch.clamp(xg.amin(dim=-1, keepdim=True), max=0.0)
    hi = torch.clamp(xg.amax(dim=-1, keepdim=True), min=0.0)
    if symmetric:
        scale = 2.0 * torch.maximum(-lo, hi) / maxq
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.full_like(scale, 2.0 ** (bits - 1))
    else:
        scale = (hi - lo) / maxq
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(-lo / scale)
    return scale, zero


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: threads only add overhead (and stall badly on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
