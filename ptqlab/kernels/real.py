"""Real low-bit execution: quantized :class:`~ptqlab.models.QuantLinear` layers as packed-weight GPU kernels.

Fake quantization keeps dequantized fp16 weights and runs fp16 GEMMs: right numbers, no speed or memory
gain.  Here a quantized layer becomes a :class:`RealLinear` that stores integer codes and runs a kernel
that reads them:

* ``w4a16-tinygemm`` (the default for 4-bit groups): up to ``TINYGEMM_MAX_M`` tokens PyTorch's own int4
  weight-only GEMM (``torch._weight_int4pack_mm``: bf16 activations and scales on CUDA, so its numbers
  differ from the fp16 model by bf16 rounding); above, the weight unpacked by one Triton kernel
  (:mod:`ptqlab.kernels.int4_dequant`, bit-identical to the fake-quant weight) and cuBLAS, because tinygemm
  runs at a few percent of cuBLAS at thousands of tokens.  It keeps both layouts (about 1.06 bytes a weight);
* ``w4a16-gemlite`` / ``w8a16-gemlite`` / ``w2a16-gemlite``: weight-only through gemlite's Triton
  GEMV/GEMM (``A16Wn``, optional dependency; grouped or per-row grids); slower than the above on an H100
  in our measurements, kept for per-row and 8/2-bit weights and for comparison;
* ``w8a8-int8`` / ``w4a8-int8``: symmetric per-row weights as int8, the input quantized per token by the
  fused Triton kernel (:func:`ptqlab.kernels.act_quant.quantize_int8_rows`), ``torch._int_mm`` on the
  int8 tensor cores, then one Triton epilogue (scales, bias, cast).  4-bit weights run on the int8 path
  (int8 storage: its speed, not 4-bit memory).

LoRC runs as a thin side GEMM (``y += (x V^T) U^T``).  Integer codes come from the layer's
``weight_scale``/``weight_zero`` (``codes = clamp(round(W / scale) + zero, 0, 2**bits - 1)``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..quantizers import PER_ROW, PER_TENSOR, QuantizationError, QuantSpec

KERNEL_MODES = ("auto", "fake", "real")
#: up to this many tokens W4A16 runs tinygemm; above, unpack + cuBLAS (crossover measured on an H100)
TINYGEMM_MAX_M = 16

#: what exists, for error messages and the README
KERNELS: dict[str, str] = {
    "w4a16-gemlite": "4-bit weights (per row or groups), fp16 activations: gemlite A16Wn (optional package)",
    "w8a16-gemlite": "8-bit weights (per row or groups), fp16 activations: gemlite A16Wn",
    "w2a16-gemlite": "2-bit weights (per row or groups), fp16 activations: gemlite A16Wn",
    "w4a16-tinygemm": "4-bit weights in groups of 32/64/128/256: torch._weight_int4pack_mm (<= 16 tokens), "
                      "else Triton unpack + cuBLAS",
    "w8a8-int8": "8-bit symmetric per-row weights, 8-bit symmetric per-token activations: torch._int_mm",
    "w4a8-int8": "4-bit symmetric per-row weights, 8-bit symmetric per-token activations: torch._int_mm",
}


class KernelError(QuantizationError):
    """No real kernel for this layer/device, or a layer that lacks what a real kernel needs."""


def available_kernels() -> str:
    return "; ".join(f"{k} ({v})" for k, v in KERNELS.items())


def weight_codes(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes ``[out, in]`` (uint8), scale and zero ``[out, n_groups]`` (float32) of a quantized layer."""
    from ..quantizers import weight_codes as codes_on_grid

    scale, zero = getattr(layer, "weight_scale", None), getattr(layer, "weight_zero", None)
    if scale is None or zero is None:
        raise KernelError(f"{layer.name}: no weight_scale/weight_zero recorded; real kernels need the integer grid")
    dev = layer.weight.device
    scale, zero = scale.float().to(dev), zero.float().to(dev)
    return codes_on_grid(layer.weight, scale, zero, layer.weight_spec), scale, zero


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes in 0..15 (K even) to ``[N, K/2]`` bytes, the even column in the low nibble."""
    return (codes[:, ::2] | (codes[:, 1::2] << 4)).contiguous()


def dequant_int4_reference(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor:
    """Torch reference of :func:`ptqlab.kernels.int4_dequant.dequant_int4` (the Triton unpack)."""
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1).float()
    reps = codes.shape[1] // scale.shape[1]
    return ((codes - zero.repeat_interleave(reps, 1)) * scale.repeat_interleave(reps, 1)).to(dtype)


def scheme_of(layer: nn.Module, w4a16_backend: str = "tinygemm") -> str | None:
    """The real kernel for this layer's (weight, activation) specs, or None if there is none."""
    w: QuantSpec = layer.weight_spec
    a: QuantSpec = layer.act_spec
    if not w.enabled or w.group_size == PER_TENSOR or getattr(layer, "input_rotation", None):
        return None  # (no kernel here rotates its input online: the rotation transform's down-projections)
    if w.is_float or a.is_float:
        return None  # float formats (fp8, mxfp4, nvfp4) have no real kernel here: the kernels issue
    if a.enabled:
        if a.bits == 8 and a.symmetric and a.group_size == PER_ROW and w.symmetric and w.group_size == PER_ROW:
            return {8: "w8a8-int8", 4: "w4a8-int8"}.get(w.bits)
        return None
    if w.bits == 4 and w4a16_backend == "tinygemm" and w.group_size in (32, 64, 128, 256):
        return "w4a16-tinygemm"
    return {8: "w8a16-gemlite", 4: "w4a16-gemlite", 2: "w2a16-gemlite"}.get(w.bits)


def _describe(layer: nn.Module) -> str:
    rotated = " + online Hadamard" if getattr(layer, "input_rotation", None) else ""
    return f"W {layer.weight_spec.describe()} / A {layer.act_spec.describe()}{rotated}"


class RealLinear(nn.Module):
    """A quantized linear layer executed by a real low-bit kernel (see the module docstring)."""

    def __init__(self, layer: nn.Module, scheme: str) -> None:
        super().__init__()
        self.name, self.scheme = layer.name, scheme
        # the module the QuantLinear replaced, for the session's restore (a plain attribute, not a submodule)
        object.__setattr__(self, "original", getattr(layer, "original", None))
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.act_spec: QuantSpec = layer.act_spec
        self.weight_spec: QuantSpec = layer.weight_spec
        self.dtype = layer.weight.dtype
        self.bias = layer.bias
        self.lorc_u, self.lorc_v = layer.lorc_u, layer.lorc_v
        codes, scale, zero = weight_codes(layer)
        n_groups = scale.shape[1]
        group = self.in_features // n_groups
        if scheme.endswith("-int8"):
            # symmetric grid: codes - 2**(bits-1) are the signed integers; one float32 scale per output row
            self.register_buffer("w_int8", (codes.to(torch.int16) - zero.to(torch.int16)).to(torch.int8).contiguous())
            self.register_buffer("w_scale", scale[:, 0].contiguous())
        elif scheme == "w4a16-tinygemm":
            # tinygemm's grid: w = (q - 8) * scale + zero_f, so zero_f = (8 - zero) * scale; bf16 scales/zeros
            packed = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
            self.register_buffer("w_packed", torch.ops.aten._convert_weight_to_int4pack(packed, 8))
            sz = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
            self.group = group
            # the large-M layout: two codes a byte plus the exact float32 grid
            self.register_buffer("w_nibbles", pack_int4(codes))
            self.register_buffer("w_scale", scale.contiguous())
            self.register_buffer("w_zero", zero.contiguous())
        else:
            try:
                from gemlite.helper import A16Wn
            except ImportError as err:
                raise KernelError(f"{self.name}: {scheme} needs the gemlite package (pip install gemlite)") from err
            try:
                self.gemlite = A16Wn(device=str(layer.weight.device), dtype=self.dtype).from_weights(
                    codes, scale.to(self.dtype), zero.to(self.dtype), self.weight_spec.bits, group,
                    bias=None if self.bias is None else self.bias.data,
                )
            except Exception as err:  # gemlite asserts on shapes/groups it does not cover
                raise KernelError(f"{self.name}: gemlite cannot pack {_describe(layer)} at {tuple(codes.shape)}: {err}") from err

    def _int8_gemm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from .act_quant import SHARED_INPUTS
        from .int8_epilogue import scaled_int32_to

        # keyed on the caller's tensor itself, so q/k/v share one quantization of their common input
        codes, sx = SHARED_INPUTS.get_int8(x, self.act_spec, f"{self.name} input")
        m = codes.shape[0]
        a = codes if m > 16 else torch.nn.functional.pad(codes, (0, 0, 0, 17 - m))  # _int_mm needs M > 16
        acc = torch._int_mm(a, self.w_int8.t())[:m]
        return scaled_int32_to(acc, sx, self.w_scale, self.bias, self.dtype), codes, sx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.scheme.endswith("-int8"):
            y, codes, sx = self._int8_gemm(x)
            lorc_in = codes.to(self.dtype) * sx[:, None].to(self.dtype) if self.lorc_u is not None else None
        elif self.scheme == "w4a16-tinygemm" and x2.shape[0] > TINYGEMM_MAX_M:
            from .int4_dequant import dequant_int4

            y = nn.functional.linear(x2, dequant_int4(self.w_nibbles, self.w_scale, self.w_zero, self.dtype), self.bias)
            lorc_in = x2
        elif self.scheme == "w4a16-tinygemm":
            y = torch._weight_int4pack_mm(x2.to(torch.bfloat16), self.w_packed, self.group, self.scales_and_zeros)
            y = y.to(self.dtype)
            if self.bias is not None:
                y += self.bias
            lorc_in = x2
        else:
            y = self.gemlite(x2)
            lorc_in = x2
        if self.lorc_u is not None:
            y.addmm_(nn.functional.linear(lorc_in, self.lorc_v), self.lorc_u.t())
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        rank = 0 if self.lorc_u is None else self.lorc_u.shape[1]
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme}, lorc_rank={rank}"


def select_kernels(model: nn.Module, mode: str = "fake", device: str | torch.device = "cpu",
                   w4a16_backend: str = "tinygemm", offloaded: bool = False) -> dict:
    """Swap quantized layers for real kernels according to ``mode`` (auto|fake|real); returns a summary.

    ``real``: every quantized layer must have a kernel, on CUDA (else a :class:`KernelError` listing what
    exists).  ``auto``: real where a kernel exists, fake elsewhere, with a one-line notice.
    """
    from ..models import QuantLinear

    if mode not in KERNEL_MODES:
        raise KernelError(f"unknown kernel mode {mode!r}; choose one of {', '.join(KERNEL_MODES)}")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    quantized = {n: m for n, m in layers.items() if m.weight_spec.enabled or m.act_spec.enabled}
    summary = {"mode": mode, "real": {}, "fake": 0}
    if mode == "fake" or not quantized:
        summary["fake"] = len(quantized)
        return summary
    on_cuda = torch.device(device).type == "cuda" and not offloaded
    if not on_cuda:
        where = f"{device}, offloaded evaluation" if offloaded else str(device)
        if mode == "real":
            raise KernelError(f"--kernel real needs the model on a CUDA device (got {where}); real kernels exist "
                              f"for: {available_kernels()}")
        warnings.warn(f"--kernel auto: no real kernels on {where}; evaluating with fake quantization", stacklevel=2)
        summary["fake"] = len(quantized)
        return summary
    plan = {n: scheme_of(m, w4a16_backend) for n, m in quantized.items()}
    missing = sorted({_describe(quantized[n]) for n, s in plan.items() if s is None})
    if missing and mode == "real":
        raise KernelError(f"--kernel real: no real kernel for {', '.join(missing)}; real kernels exist for: "
                          f"{available_kernels()}")
    if missing:
        warnings.warn(f"--kernel auto: no real kernel for {', '.join(missing)}; those layers stay fake-quantized",
                      stacklevel=2)
    for name, scheme in plan.items():
        if scheme is None:
            summary["fake"] += 1
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, RealLinear(quantized[name], scheme))
        summary["real"][scheme] = summary["real"].get(scheme, 0) + 1
    return summary
