"""Number formats beside integers: FP8 (E4M3), MXFP4 and NVFP4, as kinds of :class:`~ptqlab.quantizers.QuantSpec`.

A spec's ``fmt`` names one entry of :data:`FORMATS`. ``int`` is ptqlab's integer grid
(:mod:`ptqlab.quantizers`); the others are small floating-point element grids with a scale per
group, chosen as compressed-tensors 0.20 (and so llm-compressor and vLLM) choose it:

* ``fp8``: E4M3 values (max 448, subnormals down to 2**-9), one float scale ``absmax / 448`` per
  row (weights per output channel, activations per token) or per tensor;
* ``mxfp4``: E2M1 values (0, 0.5, 1, 1.5, 2, 3, 4, 6) with a power-of-two (E8M0) scale per block
  of 32, ``2**(floor(log2(round_to_power_2(absmax))) - 2)``: the block maximum's exponent less
  E2M1's ``floor(log2 6) = 2``, taken one octave up when its mantissa is 1.75 or more
  (compressed-tensors' ``generate_mx_scales``);
* ``nvfp4``: E2M1 values with an E4M3 scale per block of 16 and an fp32 scale ``G`` per tensor
  (per token for activations): block scale ``e4m3(G * absmax / 6) / G``. compressed-tensors takes
  ``G = 448 * 6 / amax``; ptqlab takes the power of two at or below it, so that ``e4m3 / G`` is
  exact in float32 and the per-block fp32 scale alone describes the grid (the export recovers
  ``G`` and the E4M3 scales from it exactly). The block scales use the same E4M3 values either
  way; only blocks below ~3e-5 of the tensor's maximum (E4M3 subnormal scales) can differ.

Rounding is to the nearest grid value, ties to even, saturating at the format's maximum (NaN
stays NaN): E4M3 by torch's own ``float8_e4m3fn`` cast after a clamp, E2M1 by
compressed-tensors' ``cast_to_fp4``. A block of zeros gets scale 1 (it decodes to zeros under
any scale), as ptqlab's integer grids do; nvfp4 block scales are at least the smallest E4M3 number,
2**-9 (zero blocks included), so no block scale is 0.

Float formats are symmetric (sign and magnitude, no zero point): their ``zero`` is 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E4M3_MIN_SUBNORMAL = 2.0**-9
MX_ELEMENT_EMAX = 2  # floor(log2(6)): compressed-tensors' _MX_ELEM_OFFSET for FP4
E8M0_EXP_RANGE = (-127, 127)  # the E8M0 exponents (255 is NaN)


def round_e4m3(y: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 value of each element (float32 in and out), ties to even, saturating at +-448."""
    return y.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of each element (float32 in and out), ties to even, saturating at +-6."""
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    # a fresh tensor: on CUDA cast_to_fp4 rounds its argument in place
    return cast_to_fp4(y.float().clamp(-E2M1_MAX, E2M1_MAX).contiguous()).float()


def _absmax(xg: torch.Tensor) -> torch.Tensor:
    return xg.float().abs().amax(dim=-1, keepdim=True)


def _ones_where_zero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _exact_div(x: torch.Tensor, d: float) -> torch.Tensor:
    """``x / d`` rounded once, on every device: CUDA divides by a Python scalar as a multiplication by its
    reciprocal (1/448 is inexact), which moved scales by one float32 ulp from the CPU's."""
    return x / torch.full_like(x, d)


def _fp8_scales(xg: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    return _ones_where_zero(_exact_div(_absmax(xg), E4M3_MAX))


def _mx_scales(xg: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    amax = _absmax(xg)
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2**exponent, mantissa in [0.5, 1)
    # round_to_power_2: a mantissa of 1.75 or more (0.875 here) goes to the next power of two
    exp = exponent - 1 + (mantissa >= 0.875).to(exponent.dtype) - MX_ELEMENT_EMAX
    exp = exp.clamp(*E8M0_EXP_RANGE)
    scale = torch.ldexp(torch.ones_like(amax), exp)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def nvfp4_tensor_scale(x: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """NVFP4's fp32 second-level scale ``G``: the largest power of two with ``G * amax / 6 <= 448``, of the whole
    tensor (float32, 0-dimensional) or, with ``per_row``, of each row (``[*rows, 1, 1]``, against the
    ``[*rows, n_groups, 1]`` block scales); 1 for zeros."""
    a = x.float().abs()
    amax = a.amax(dim=-1, keepdim=True).unsqueeze(-1) if per_row else a.amax()
    target = E4M3_MAX * E2M1_MAX / amax  # inf for an all-zero tensor
    _, exponent = torch.frexp(torch.where(torch.isfinite(target), target, torch.ones_like(target)))
    g = torch.ldexp(torch.ones_like(amax), (exponent - 1).clamp(-126, 127))
    return torch.where(amax > 0, g, torch.ones_like(g))


def _nv_scales(xg: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    if tensor_scale is None:
        raise ValueError("nvfp4 block scales need the tensor's second-level scale")
    local = round_e4m3(_exact_div(tensor_scale * _absmax(xg), E2M1_MAX)).clamp(min=E4M3_MIN_SUBNORMAL)
    return local / tensor_scale


@dataclass(frozen=True)
class Format:
    """One number format: its element grid, how a group's scale is chosen, and what it stores."""

    name: str
    summary: str
    bits: int | None  # the element bits the format fixes (None: any, the integers)
    groups: tuple[int, ...] | None  # the group sizes it allows (None: any); 0 per row, -1 per tensor
    block: int | None = None  # a block format reads "per row" (the default 0) as this block
    round: Callable[[torch.Tensor], torch.Tensor] | None = None  # elementwise onto the grid (None: integers)
    scales: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    scale_bits: int = 16  # bits of each stored group/row scale (bits per weight)
    tensor_scale_bits: int = 0  # bits of a second-level per-tensor scale on top
    two_level: bool = False  # needs a per-tensor (per-token) scale before its group scales

    @property
    def is_float(self) -> bool:
        return self.round is not None

    @property
    def allowed_groups(self) -> str:
        words = {0: "0 (per row/token)", -1: "-1 (per tensor)"}
        return ", ".join(words.get(g, str(g)) for g in self.groups or ())


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"format '{fmt.name}' is registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


register(Format("int", "integers of 2..8 bits, symmetric or asymmetric (ptqlab.quantizers)", None, None))
register(Format("fp8", "FP8 E4M3, scale absmax/448 per row (channel/token) or per tensor", 8, (0, -1),
                round=round_e4m3, scales=_fp8_scales, scale_bits=16))
register(Format("mxfp4", "MXFP4: E2M1 with an E8M0 (power-of-two) scale per block of 32", 4, (32,), block=32,
                round=round_e2m1, scales=_mx_scales, scale_bits=8))
register(Format("nvfp4", "NVFP4: E2M1 with an E4M3 scale per block of 16 and an fp32 scale per tensor", 4, (16,),
                block=16, round=round_e2m1, scales=_nv_scales, scale_bits=8, tensor_scale_bits=32, two_level=True))

FORMAT_NAMES = tuple(FORMATS)


def _error(field: str, message: str):
    """A QuantizationError that says which field of the spec it is about (``bits``, ``group_size``, ``symmetric``),
    so that the config can name the flag."""
    from .quantizers import QuantizationError

    err = QuantizationError(message)
    err.field = field
    return err


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        from .quantizers import QuantizationError

        raise QuantizationError(f"unknown number format {name!r}; choose from {', '.join(FORMATS)}") from None


def normalize(bits: int, symmetric: bool, group_size: int, fmt: str) -> tuple[int, int]:
    """``(bits, group_size)`` of a spec in format ``fmt``, checked: a float format fixes its bits (16, the
    "not quantized" default, is read as them) and its blocks (0, the per-row default, is read as its block)."""
    from .quantizers import FULL_PRECISION_BITS, PER_ROW

    f = get_format(fmt)
    if not f.is_float:
        return bits, group_size
    if bits == FULL_PRECISION_BITS:
        bits = f.bits
    if bits != f.bits:
        raise _error("bits", f"{fmt} stores {f.bits}-bit values: bits must be {f.bits} (or left at the default), "
                             f"got {bits}")
    if not symmetric:
        raise _error("symmetric", f"{fmt} is a sign-magnitude float format (no zero point): it cannot be asymmetric")
    if group_size == PER_ROW and f.block:
        group_size = f.block
    if group_size not in f.groups:
        raise _error("group_size", f"{fmt} allows group size {f.allowed_groups}"
                     + (" (or the default 0, read as it)" if f.block else "") + f", got {group_size}")
    return bits, group_size


def implied_bits(fmt: str, bits: int) -> int:
    """The bits a flat config's ``(fmt, bits)`` stands for (a float format's own when ``bits`` is the default 16)."""
    f = FORMATS.get(fmt)
    return f.bits if f is not None and f.is_float and bits == 16 else bits


# ---------------------------------------------------------------- quantization with a float format


def tensor_scale(x: torch.Tensor, spec, per_row: bool = False) -> torch.Tensor | None:
    """The second-level scale a two-level format (nvfp4) needs for ``x`` (None for the others)."""
    return nvfp4_tensor_scale(x, per_row) if get_format(spec.fmt).two_level else None


def group_scales(xg: torch.Tensor, spec, tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 scale of each group (last dim) of ``xg``, keepdim; ``tensor_scale`` broadcasts against it."""
    f = get_format(spec.fmt)
    if f.two_level and tensor_scale is None:
        tensor_scale = nvfp4_tensor_scale(xg)
    return f.scales(xg, tensor_scale)


def on_grid(x: torch.Tensor, scale: torch.Tensor, spec) -> torch.Tensor:
    """``round(x / scale) * scale`` in float32: ``x`` rounded onto the format's grid of ``scale``."""
    return get_format(spec.fmt).round(x.float() / scale) * scale


def grid_values(x: torch.Tensor, scale: torch.Tensor, spec) -> torch.Tensor:
    """The element values (float32: E4M3 or E2M1 numbers) of ``x`` on the grid of ``scale``."""
    return get_format(spec.fmt).round(x.float() / scale)


def fake_quantize(x: torch.Tensor, spec, grouped: Callable, activation: bool = False, name: str = "tensor"
                  ) -> torch.Tensor:
    """Float-format fake quantization of ``x`` (``grouped(x)`` views it as ``[rows..., n_groups, group]``).
    A two-level format takes its second scale per tensor, or per token for activations."""
    xg = grouped(x).float()
    ts = tensor_scale(xg.flatten(-2) if activation else xg, spec, per_row=activation)
    scale = group_scales(xg, spec, ts)
    return on_grid(xg, scale, spec).reshape(x.shape).to(x.dtype)


def storage_bits(spec, in_features: int, out_features: int, n_scales: int) -> float:
    """Bits per weight of a float-format weight: elements, ``n_scales`` group scales and a per-tensor scale."""
    f = get_format(spec.fmt)
    total = n_scales * f.scale_bits + f.tensor_scale_bits
    return f.bits + total / (in_features * out_features)
