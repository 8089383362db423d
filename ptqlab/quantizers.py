"""Quantization schemes: what quantized numbers look like.

A :class:`QuantSpec` says how many bits, symmetric or asymmetric, in which number format
(``fmt``: ``int`` here; FP8, MXFP4 and NVFP4 in :mod:`ptqlab.formats`) and at
which granularity scales are shared.  Granularity always runs along the
*last* dimension of the tensor, which is the input dimension of a weight
``[out, in]`` and the hidden dimension of an activation ``[..., tokens, hidden]``:

* ``group_size == 0``: one scale per row (per output channel of a weight,
  per token of an activation);
* ``group_size > 0``: fine-grained quantization (FGQ), one scale per
  contiguous group of ``group_size`` elements of a row;
* ``group_size == -1``: one scale for the whole tensor.

Grids follow the GPTQ reference code so that perplexities are comparable
with published ones: codes are unsigned integers in ``[0, 2**bits - 1]``;
the symmetric grid puts the zero point at the centre ``2**(bits-1)`` with
``scale = 2 * max|x| / (2**bits - 1)``; the asymmetric grid takes scale and
zero point from ``min(x, 0)`` and ``max(x, 0)`` (zero is always exactly
representable, so padding and dead inputs stay zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL_PRECISION_BITS = 16
PER_ROW = 0
PER_TENSOR = -1


class QuantizationError(ValueError):
    """Bad quantization input: reported with the layer and the offending value."""


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is quantized. ``bits == 16`` means "left in full precision"."""

    bits: int = FULL_PRECISION_BITS
    symmetric: bool = True
    group_size: int = PER_ROW
    fmt: str = "int"  # a name in ptqlab.formats.FORMATS: int, fp8, mxfp4, nvfp4

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not (2 <= self.bits <= 8 or self.bits == FULL_PRECISION_BITS):
            raise QuantizationError(f"bits must be an integer in 2..8 (or 16 for no quantization), got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < PER_TENSOR:
            raise QuantizationError(
                f"group_size must be 0 (per row/token), -1 (per tensor) or a positive group size, got {self.group_size!r}"
            )
        if self.fmt != "int":
            from .formats import normalize

            # a float format fixes its bits and blocks: the defaults (16 bits, per row) are read as them
            bits, group = normalize(self.bits, self.symmetric, self.group_size, self.fmt)
            object.__setattr__(self, "bits", bits)
            object.__setattr__(self, "group_size", group)

    @property
    def is_float(self) -> bool:
        """A floating-point element format (fp8, mxfp4, nvfp4): no zero point, codes are grid values."""
        return self.fmt != "int"

    @property
    def enabled(self) -> bool:
        return self.bits != FULL_PRECISION_BITS

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def describe(self) -> str:
        if not self.enabled:
            return "fp16"
        gran = {PER_ROW: "row", PER_TENSOR: "tensor"}.get(self.group_size, f"g{self.group_size}")
        if self.fmt == "fp8":
            return f"fp8-e4m3-{gran}"
        if self.is_float:
            return f"{self.fmt}-{gran}"
        return f"int{self.bits}-{'sym' if self.symmetric else 'asym'}-{gran}"


@dataclass
class QuantizedTensor:
    """Real quantization: integer codes plus the scales and zero points that decode them (for a float format:
    its element values, float32, with zero points 0).

    ``codes`` has the shape of the original tensor; ``scale`` and ``zero`` have
    the shape ``[*rows, n_groups, 1]`` (broadcast over each group).
    """

    codes: torch.Tensor  # uint8
    scale: torch.Tensor  # float32
    zero: torch.Tensor  # float32, integer valued
    spec: QuantSpec
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def check_finite(x: torch.Tensor, name: str = "tensor") -> None:
    """Raise a clear error if ``x`` holds NaN or Inf (quantizing them silently gives garbage)."""
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad_index = tuple(int(i) for i in (~finite).nonzero()[0])
        bad_value = x[bad_index].item()
        raise QuantizationError(
            f"{name}: cannot quantize a non-finite value ({bad_value}) at index {bad_index}"
        )


def _grouped(x: torch.Tensor, spec: QuantSpec, name: str) -> torch.Tensor:
    """View ``x`` as ``[rows..., n_groups, group]`` according to the granularity."""
    if x.dim() == 0:
        raise QuantizationError(f"{name}: cannot quantize a 0-dimensional tensor")
    if spec.group_size == PER_TENSOR:
        return x.reshape(1, 1, -1)
    dim = x.shape[-1]
    if spec.group_size == PER_ROW:
        return x.reshape(*x.shape[:-1], 1, dim)
    if dim % spec.group_size != 0:
        raise QuantizationError(
            f"{name}: group size {spec.group_size} does not divide the input dimension {dim}"
        )
    return x.reshape(*x.shape[:-1], dim // spec.group_size, spec.group_size)


def scale_and_zero(xg: torch.Tensor, spec: QuantSpec,
                   tensor_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each group (last dim) of ``xg``; float32, keepdim.

    ``tensor_scale``: a two-level format's second scale (nvfp4, :func:`ptqlab.formats.tensor_scale`) when
    ``xg`` is part of a larger tensor; by default it is taken from ``xg`` itself."""
    if spec.is_float:
        from .formats import group_scales

        scale = group_scales(xg, spec, tensor_scale)
        return scale, torch.zeros_like(scale)
    xg = xg.float()
    xmin = xg.amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = xg.amax(dim=-1, keepdim=True).clamp(min=0)
    if spec.symmetric:
        absmax = torch.maximum(-xmin, xmax)
        scale = 2 * absmax / spec.maxq
        zero = torch.full_like(scale, float(2 ** (spec.bits - 1)))
    else:
        scale = (xmax - xmin) / spec.maxq
        zero = None
    # An all-zero group has no range: any scale decodes it exactly, so use 1.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if zero is None:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round ``x`` onto the integer grid given by ``scale`` and ``zero``."""
    return torch.clamp(torch.round(x.float() / scale) + zero, 0, maxq)


def round_on_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` rounded onto the grid of ``scale``/``zero`` in ``spec``'s format and decoded (float32)."""
    if spec.is_float:
        from .formats import on_grid

        return on_grid(x, scale, spec)
    return (quantize_codes(x, scale, zero, spec.maxq) - zero) * scale


def quantize(x: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> QuantizedTensor:
    """Real quantization of ``x``: codes, scales and zero points that round-trip exactly."""
    if not spec.enabled:
        raise QuantizationError(f"{name}: a 16-bit spec means 'not quantized'; there are no codes to compute")
    check_finite(x, name)
    xg = _grouped(x, spec, name)
    scale, zero = scale_and_zero(xg, spec)
    if spec.is_float:
        from .formats import grid_values

        codes = grid_values(xg, scale, spec).reshape(x.shape)
        return QuantizedTensor(codes=codes, scale=scale, zero=zero, spec=spec, dtype=x.dtype)
    codes = quantize_codes(xg, scale, zero, spec.maxq).to(torch.uint8).reshape(x.shape)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, spec=spec, dtype=x.dtype)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Decode integer codes back to real numbers in the original dtype."""
    cg = _grouped(q.codes, q.spec, "codes").float()
    return ((cg - q.zero) * q.scale).reshape(q.codes.shape).to(q.dtype)


def fake_quantize(x: torch.Tensor, spec: QuantSpec, name: str = "tensor", activation: bool = False,
                  check: bool = True) -> torch.Tensor:
    """Quantize then dequantize ``x``, returning a tensor of its dtype and shape.

    A 16-bit spec returns ``x`` unchanged. ``activation``: ``x`` is a layer input, so a two-level format
    (nvfp4) takes its second scale per token instead of per tensor (the integers ignore it). ``check=False`` skips
    the NaN/Inf check (a device sync) for callers that check their result themselves, e.g. inside an optimisation
    loop or a captured CUDA graph.
    """
    if not spec.enabled:
        return x
    if check:
        check_finite(x, name)
    if spec.is_float:
        from .formats import fake_quantize as float_fake_quantize

        return float_fake_quantize(x, spec, lambda t: _grouped(t, spec, name), activation, name)
    xg = _grouped(x, spec, name)
    scale, zero = scale_and_zero(xg, spec)
    q = quantize_codes(xg, scale, zero, spec.maxq)
    return ((q - zero) * scale).reshape(x.shape).to(x.dtype)


def weight_qparams(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``[out, n_groups]`` (float32) of a weight ``[out, in]`` on its own range.

    ``n_groups`` is ``in / group_size`` for groups and 1 per row; a per-tensor
    pair is repeated over the rows, so every spec stores the same shape. Float formats have zero points 0
    (and nvfp4's scales are the per-block fp32 scales ``e4m3 / G``, :mod:`ptqlab.formats`).
    """
    scale, zero = scale_and_zero(_grouped(weight, spec, name), spec)
    scale, zero = scale[..., 0], zero[..., 0]
    if spec.group_size == PER_TENSOR:
        scale, zero = scale.expand(weight.shape[0], 1), zero.expand(weight.shape[0], 1)
    return scale.contiguous(), zero.contiguous()


def weight_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The integer codes (uint8) of a weight that lies on the grid of ``scale``/``zero`` ``[out, n_groups]``
    (for a float format: its element values, float32).

    Exact for a dequantized weight even in fp16: the nearest code is at most
    2**-3 of a step away after fp16 rounding, far from a rounding tie (float formats: an E4M3/E2M1 value
    has at most 4 significant bits, and a bf16/fp16 weight holds 8/11).
    """
    group = weight.shape[1] // scale.shape[1]
    s = scale.repeat_interleave(group, dim=1)
    z = zero.repeat_interleave(group, dim=1)
    if spec.is_float:
        from .formats import grid_values

        return grid_values(weight, s, spec)
    return quantize_codes(weight.float(), s, z, spec.maxq).to(torch.uint8)


def storage_bits_per_weight(spec: QuantSpec, in_features: int, out_features: int = 1) -> float:
    """Average storage bits per weight, scales (fp16) and zero points (``bits`` each, asym only) included;
    float formats count their own scales (fp8: fp16 per row/tensor, mxfp4: an 8-bit E8M0 per 32, nvfp4: an
    8-bit E4M3 per 16 and an fp32 per tensor)."""
    if not spec.enabled:
        return float(FULL_PRECISION_BITS)
    if spec.group_size == PER_TENSOR:
        n_scales = 1
    elif spec.group_size == PER_ROW:
        n_scales = out_features
    else:
        n_scales = out_features * (in_features // spec.group_size)
    if spec.is_float:
        from .formats import storage_bits

        return storage_bits(spec, in_features, out_features, n_scales)
    per_scale = FULL_PRECISION_BITS + (0 if spec.symmetric else spec.bits)
    return spec.bits + n_scales * per_scale / (in_features * out_features)
