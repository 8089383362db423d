"""Integer codes as compressed-tensors stores them.

ptqlab's codes are unsigned, ``u`` in ``[0, 2**bits - 1]`` with a zero point
``z`` in the same range, decoding as ``(u - z) * scale``; symmetric grids have
``z = 2**(bits-1)``.  compressed-tensors stores *signed* codes
``q`` in ``[-2**(bits-1), 2**(bits-1) - 1]`` and signed zero points, decoding as
``(q - zp) * scale``.  Shifting both by ``2**(bits-1)`` maps one onto the other
exactly: ``q - zp = u - z``, and a symmetric grid gets ``zp = 0`` (which is why
the format can drop it).

Sub-byte packing (``bits`` bits each, 32 codes to ``bits`` int32 words, along
the last dimension; zero points along the first; the words hold the signed
values shifted back by ``2**(bits-1)``, i.e. ptqlab's unsigned codes) is compressed-tensors' own
``pack_to_int32`` / ``unpack_from_int32``, so what is written is byte for byte
what its decompressor, transformers and vLLM read.
"""

from __future__ import annotations

import math

import torch

from ..quantizers import QuantizationError


def _helpers():
    # imported on use: compressed-tensors pulls in much of transformers, which plain runs do not need
    from compressed_tensors.compressors.pack_quantized import helpers

    return helpers.pack_to_int32, helpers.unpack_from_int32


def _offset(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise QuantizationError(f"codes of {bits} bits cannot be stored: compressed-tensors packs 2..8 bits here")
    return 1 << (bits - 1)


def to_signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ptqlab codes (or zero points) ``[0, 2**bits)`` -> compressed-tensors' signed int8."""
    offset = _offset(bits)
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 2 * offset - 1):
        raise QuantizationError(f"codes outside [0, {2 * offset - 1}] cannot be stored as {bits}-bit integers")
    return (c - offset).to(torch.int8)


def to_unsigned(signed: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' signed codes -> ptqlab's unsigned codes (uint8)."""
    return (signed.to(torch.int32) + _offset(bits)).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[rows, cols]`` -> int32 ``[rows, ceil(cols * bits / 32)]`` (compressed-tensors layout)."""
    pack_to_int32, _ = _helpers()
    return pack_to_int32(to_signed(codes, bits), bits, packed_dim=1)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: unsigned codes of ``shape``."""
    _offset(bits)
    expected = (shape[0], math.ceil(shape[1] * bits / 32))
    if packed.dtype != torch.int32 or tuple(packed.shape) != expected:
        raise QuantizationError(
            f"packed codes of shape {tuple(packed.shape)} ({packed.dtype}) do not hold a {shape[0]}x{shape[1]} "
            f"{bits}-bit tensor (expected int32 {expected})"
        )
    _, unpack_from_int32 = _helpers()
    return to_unsigned(unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=1), bits)


def pack_zero_points(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned zero points ``[rows, n_groups]`` -> int32 ``[ceil(rows * bits / 32), n_groups]`` (packed along rows)."""
    pack_to_int32, _ = _helpers()
    return pack_to_int32(to_signed(zero, bits), bits, packed_dim=0)


def unpack_zero_points(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`pack_zero_points`: unsigned zero points of ``shape``."""
    _offset(bits)
    expected = (math.ceil(shape[0] * bits / 32), shape[1])
    if packed.dtype != torch.int32 or tuple(packed.shape) != expected:
        raise QuantizationError(
            f"packed zero points of shape {tuple(packed.shape)} ({packed.dtype}) do not hold {shape[0]}x{shape[1]} "
            f"{bits}-bit values (expected int32 {expected})"
        )
    # Unpacked as rows of the transpose: compressed-tensors 0.20's 4-bit fast path fails on its own
    # packed_dim=0 transpose when there is one packed word (a size-1 dim with a non-unit stride).
    _, unpack_from_int32 = _helpers()
    rows_first = packed.t().clone(memory_format=torch.contiguous_format)
    signed = unpack_from_int32(rows_first, bits, torch.Size((shape[1], shape[0])), packed_dim=1).t()
    return to_unsigned(signed, bits)


def packed_bytes(rows: int, cols: int, bits: int) -> int:
    """Bytes of :func:`pack_codes`' output for a ``rows x cols`` tensor."""
    return rows * math.ceil(cols * bits / 32) * 4
