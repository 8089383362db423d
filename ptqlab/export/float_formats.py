"""FP8, MXFP4 and NVFP4 layers in compressed-tensors' own formats (the float side of ``checkpoint.py``/``load.py``).

=========  ========================  ===================================================================
ptqlab     compressed-tensors        tensors of one linear (what transformers and vLLM read)
=========  ========================  ===================================================================
fp8        ``float-quantized``       ``weight`` float8_e4m3fn, ``weight_scale`` [out, 1] or [1] (fp16/fp32)
mxfp4      ``mxfp4-pack-quantized``  ``weight_packed`` uint8 (two E2M1 a byte), ``weight_scale`` uint8 E8M0
nvfp4      ``nvfp4-pack-quantized``  ``weight_packed``, ``weight_scale`` float8_e4m3fn, ``weight_global_scale``
=========  ========================  ===================================================================

The packed tensors are written by the format's compressor (``BaseCompressor`` of compressed-tensors)
from weights rebuilt out of ptqlab's element values and scales, then checked to hold exactly those
values and scales. NVFP4's fp32 block scales ``e4m3 / G`` (``G`` a power of two,
:mod:`ptqlab.formats`) are split back into the E4M3 block scales and ``G`` exactly, or refused.
Activations: fp8 per token or per tensor and mxfp4 per block of 32, dynamic, as ``input_activations``;
ptqlab's nvfp4 activations (a per-token second scale) have no compressed-tensors form (its NVFP4
activations take a static, calibrated ``input_global_scale``) and are refused before any work.
"""

from __future__ import annotations

import torch

from ..quantizers import PER_ROW, PER_TENSOR, QuantSpec

FLOAT_FORMATS = {"fp8": "float-quantized", "mxfp4": "mxfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized"}
#: (weight format, activation format) pairs a checkpoint can carry; "none": activations not quantized
EXPORTABLE_ACTS = {"fp8": ("none", "fp8"), "mxfp4": ("none", "mxfp4", "fp8"), "nvfp4": ("none",)}


def exportable_reason(weight: QuantSpec, act: QuantSpec) -> str | None:
    """Why (weight, act) cannot be saved when one of them is a float format (None: it can)."""
    afmt = act.fmt if act.enabled else "none"
    if not weight.is_float:
        if afmt != "none" and act.is_float:
            return (f"integer weights with {act.fmt} activations have no compressed-tensors scheme ptqlab writes "
                    f"(saved: integer weights with integer or no activation quantization)")
        return None
    allowed = EXPORTABLE_ACTS[weight.fmt]
    if afmt not in allowed:
        extra = (" (compressed-tensors' NVFP4 activations take a static, calibrated input_global_scale; ptqlab's "
                 "take theirs per token)") if afmt == "nvfp4" else ""
        shown = ", ".join("--abits 16" if a == "none" else f"--afmt {a}" for a in allowed)
        return f"--wfmt {weight.fmt} weights are saved with {shown}, not {act.describe()} activations{extra}"
    if act.enabled and act.fmt == "fp8" and act.group_size not in (PER_ROW, PER_TENSOR):
        return "fp8 activations are saved per token (--agroup 0) or per tensor (--agroup -1)"
    return None


def weight_args(spec: QuantSpec):
    from compressed_tensors.quantization import QuantizationArgs

    if spec.fmt == "fp8":
        strategy = "tensor" if spec.group_size == PER_TENSOR else "channel"
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)
    if spec.fmt == "mxfp4":  # compressed-tensors' MXFP4A16 preset
        return QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="group", group_size=32,
                                scale_dtype=torch.uint8, zp_dtype=torch.uint8)
    # NVFP4A16 preset
    return QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                            scale_dtype=torch.float8_e4m3fn, zp_dtype=torch.float8_e4m3fn)


def act_args(spec: QuantSpec):
    from compressed_tensors.quantization import QuantizationArgs

    if spec.fmt == "fp8":
        strategy = "tensor" if spec.group_size == PER_TENSOR else "token"
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, dynamic=True)
    # mxfp4 (the MXFP4 preset's input activations)
    return QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="group", group_size=32, dynamic=True,
                            scale_dtype=torch.uint8, zp_dtype=torch.uint8)


def spec_of_args(args) -> QuantSpec | None:
    """The ptqlab spec of compressed-tensors float QuantizationArgs (None: a float scheme ptqlab does not model)."""
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if args.num_bits == 8 and strategy in ("channel", "token", "tensor") and args.symmetric:
        return QuantSpec(8, True, PER_TENSOR if strategy == "tensor" else PER_ROW, "fp8")
    if args.num_bits == 4 and strategy == "group" and args.group_size == 32 and args.scale_dtype == torch.uint8:
        return QuantSpec(4, True, 32, "mxfp4")
    if args.num_bits == 4 and strategy == "tensor_group" and args.group_size == 16:
        return QuantSpec(4, True, 16, "nvfp4")
    return None


def split_nvfp4_scales(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(e4m3 block scales as float32, G [1])`` with ``e4m3 / G == scale`` exactly in float32 and ``G`` a power of
    two, the E4M3 scales as large as they go (max <= 448); None when ``scale`` has no such form."""
    top = scale.max()
    mantissa, exponent = torch.frexp(top)
    # largest k with top * 2**k <= 448 = 0.875 * 2**9
    k = int(9 - exponent) if float(mantissa) <= 0.875 else int(8 - exponent)
    g = torch.ldexp(torch.ones(1), torch.tensor([k]))
    local = scale * g
    if not bool(torch.isfinite(g).all()) or not torch.equal(local.to(torch.float8_e4m3fn).float(), local):
        return None
    if not torch.equal(local / g, scale):
        return None
    return local, g


def compress_float_layer(name: str, spec: QuantSpec, values: torch.Tensor, scale: torch.Tensor, scheme,
                         scale_dtype: torch.dtype, error) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one float-format linear, written by the format's compressor and checked
    to hold ``values`` (element values [out, in]) and ``scale`` ([out, G] float32) exactly."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    groups = scale.shape[1]
    step = values.shape[1] // groups
    state: dict[str, torch.Tensor] = {}
    if spec.fmt == "fp8":
        stored = (scale[:1, :1].reshape(1) if spec.group_size == PER_TENSOR else scale).to(scale_dtype)
        if not torch.equal(stored.float().expand_as(scale) if spec.group_size == PER_TENSOR else stored.float(),
                           scale):
            raise error(f"{name}: its fp8 scales are not exactly {str(scale_dtype).replace('torch.', '')} numbers")
        state["weight_scale"] = stored
        local = scale
    elif spec.fmt == "mxfp4":
        state["weight_scale"] = scale
        local = scale
    else:
        split = split_nvfp4_scales(scale)
        if split is None:
            raise error(f"{name}: its nvfp4 block scales are not E4M3 numbers over one power-of-two tensor scale "
                        f"(was the layer quantized by ptqlab?)")
        local, g = split
        state["weight_scale"], state["weight_global_scale"] = local, g
    state["weight"] = values * scale.repeat_interleave(step, dim=1)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    out = dict(compressor.compress(state, scheme))
    if spec.fmt == "fp8":
        same = torch.equal(out["weight"].float(), values) and out["weight"].dtype == torch.float8_e4m3fn
    else:
        same = torch.equal(out["weight_packed"], pack_fp4_to_uint8(values))
        if spec.fmt == "mxfp4":
            from compressed_tensors.compressors.mx_utils import decompress_mx_scale

            same = same and torch.equal(decompress_mx_scale(out["weight_scale"]).float(), scale)
        else:
            same = same and torch.equal(out["weight_scale"].float(), local)
    if not same:
        raise error(f"{name}: compressed-tensors' {scheme.format} compressor did not reproduce ptqlab's {spec.fmt} "
                    f"values and scales")
    return out


def weight_tensor_names(fmt: str) -> tuple[str, ...]:
    return {"float-quantized": ("weight", "weight_scale"),
            "mxfp4-pack-quantized": ("weight_packed", "weight_scale"),
            "nvfp4-pack-quantized": ("weight_packed", "weight_scale", "weight_global_scale")}[fmt]


def stored_weight_bytes(spec: QuantSpec, out_f: int, in_f: int, scale_bytes: int) -> int:
    """Bytes of a float-format linear's weight tensors on disk."""
    if spec.fmt == "fp8":
        n_scales = 1 if spec.group_size == PER_TENSOR else out_f
        return out_f * in_f + n_scales * scale_bytes
    blocks = out_f * (in_f // spec.group_size)
    return out_f * in_f // 2 + blocks + (4 if spec.fmt == "nvfp4" else 0)


def decode_float_layer(name: str, spec: QuantSpec, fmt: str, take, out_f: int, in_f: int, error
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(element values [out, in] float32, scale [out, G] float32)`` of a stored float-format linear;
    ``take(key)`` pops ``(tensor, file)``."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    groups = in_f // spec.group_size if spec.group_size > 0 else 1
    if fmt != FLOAT_FORMATS[spec.fmt]:
        raise error(f"{name}: {spec.fmt} weights stored as '{fmt}' (expected {FLOAT_FORMATS[spec.fmt]})")
    scale, where = take(f"{name}.weight_scale")
    if spec.fmt == "fp8":
        weight, where = take(f"{name}.weight")
        if weight.dtype != torch.float8_e4m3fn or tuple(weight.shape) != (out_f, in_f):
            raise error(f"{where}: {name}.weight is {weight.dtype} {tuple(weight.shape)}, expected float8_e4m3fn "
                        f"{(out_f, in_f)}")
        values = weight.float()
        expected = (1,) if spec.group_size == PER_TENSOR else (out_f, 1)
        if tuple(scale.shape) not in (expected, (1, 1)):
            raise error(f"{where}: {name}.weight_scale has shape {tuple(scale.shape)}, expected {expected}")
        scale = scale.float().reshape(-1, 1).expand(out_f, 1)
    else:
        packed, where = take(f"{name}.weight_packed")
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (out_f, in_f // 2):
            raise error(f"{where}: {name}.weight_packed is {packed.dtype} {tuple(packed.shape)}, expected uint8 "
                        f"{(out_f, in_f // 2)}")
        values = unpack_fp4_from_uint8(packed, out_f, in_f, dtype=torch.float32)
        if tuple(scale.shape) != (out_f, groups):
            raise error(f"{where}: {name}.weight_scale has shape {tuple(scale.shape)}, expected {(out_f, groups)}")
        if spec.fmt == "mxfp4":
            if scale.dtype != torch.uint8 or int(scale.max()) == 255:
                raise error(f"{where}: {name}.weight_scale must hold E8M0 exponents (uint8 below 255)")
            scale = torch.ldexp(torch.ones(out_f, groups), scale.to(torch.int32) - 127)
        else:
            g, _ = take(f"{name}.weight_global_scale")
            if scale.dtype != torch.float8_e4m3fn or g.numel() != 1 or not float(g.reshape(())) > 0:
                raise error(f"{where}: {name}: nvfp4 needs float8_e4m3fn weight_scale and one positive "
                            f"weight_global_scale")
            scale = scale.float() / g.float().reshape(())
    return values, scale.contiguous()
