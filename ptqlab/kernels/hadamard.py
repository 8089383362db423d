"""Hadamard matrices and the fast Walsh-Hadamard transform (the rotation transform's building blocks).

Orders are powers of two (Sylvester's construction, natural order: ``H_2m = [[H, H], [H, -H]] / sqrt 2``);
a dimension ``n = m k`` with ``m`` its largest power-of-two factor gets a block-diagonal matrix of ``k``
such blocks, still orthogonal, which spreads outliers only within each block of ``m`` channels. Below
:data:`MIN_BLOCK` channels per block a Hadamard does little, so such dimensions are refused.
"""

from __future__ import annotations

import math

import torch

MIN_BLOCK = 8  # the smallest power-of-two block ptqlab accepts for a block-diagonal Hadamard


class HadamardError(ValueError):
    pass


def hadamard_block(n: int, what: str = "dimension") -> int:
    """The order ``m`` of the Hadamard blocks for a dimension ``n`` (``n`` itself when a power of two)."""
    if n < 1:
        raise HadamardError(f"{what} {n}: no Hadamard matrix")
    m = n & -n  # largest power of two dividing n
    if m < MIN_BLOCK:
        raise HadamardError(f"no Hadamard construction of order {n} ({what}): ptqlab builds Hadamard matrices of "
                            f"order 2^k and block-diagonal ones of 2^k >= {MIN_BLOCK} blocks, and the largest "
                            f"power of two dividing {n} is {m}")
    return m


def fwht(x: torch.Tensor) -> torch.Tensor:
    """``x H`` along the last dimension (a power of two), ``H`` the orthonormal Sylvester Hadamard."""
    m = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, m)
    h = 1
    while h < m:
        y = y.view(-1, m // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2).view(-1, m)
        h *= 2
    return (y * (1.0 / math.sqrt(m))).view(*lead, m)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x H`` along the last dimension with the (block-diagonal) orthonormal Hadamard of its size, computed in
    float32 and returned in ``x``'s dtype."""
    n = x.shape[-1]
    m = hadamard_block(n)
    y = fwht(x.float().reshape(*x.shape[:-1], n // m, m)).reshape(x.shape)
    return y.to(x.dtype)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
    """The dense orthonormal (block-diagonal) Hadamard matrix ``H`` of order ``n``; symmetric, ``H H = I``."""
    m = hadamard_block(n)
    eye = torch.eye(m, dtype=torch.float64, device=device)
    block = fwht(eye)  # rows of I times H: H itself
    return torch.block_diag(*([block] * (n // m))).to(dtype)


ROTATIONS = {"hadamard": hadamard_transform}


def rotate_online(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Apply a :class:`~ptqlab.models.QuantLinear`'s online input rotation."""
    return ROTATIONS[kind](x)
