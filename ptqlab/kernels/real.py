"""Real low-bit execution: quantized :class:`~ptqlab.models.QuantLinear` layers as packed-weight GPU kernels.

Fake quantization keeps dequantized fp16 weights and runs fp16 GEMMs: right numbers, no speed or memory
gain.  Here a quantized layer becomes a :class:`RealLinear` that stores integer codes and runs a kernel
that reads them:

* ``w4a16-mma`` (the ``triton`` preference's first choice for fp16 4-bit weight-only layers, groups
  of a multiple of 64 or per row, where the CUDA toolkit can build it): ptqlab's CUDA tensor-core kernel on the
  weight stored in the MMA's fragment order (:mod:`ptqlab.kernels.w4_mma`), up to ``w4_mma.MMA_MAX_M`` tokens;
  above, the same layout unpacked once and cuBLAS;
* ``w4a16-triton`` (the ``triton`` preference, the default: for 4-bit weight-only layers, groups of 32..4096 or
  per row, either zero point): ptqlab's own Triton GEMV (1 token) / tensor-core GEMM (up to ``w4_gemm.GEMM_MAX_M``
  tokens) reading the packed codes directly (:mod:`ptqlab.kernels.w4_gemm`), above that the same layout unpacked
  once and cuBLAS;
  one layout, 0.5 byte a weight plus fp16 scales (and zero points);
* ``w4a8-mma`` (the ``triton`` preference's first choice for fp16 W4A8 layers without LoRC, where the CUDA
  toolkit can build it): the input quantized per token by the same fused Triton pass as below,
  then ptqlab's CUDA int8 tensor-core kernel on the 4-bit weight in the W4A16 kernel's MMA layout (unpacked to
  int8 in registers, the scales and bias in its epilogue: :mod:`ptqlab.kernels.w4a8_mma`), up to 128 tokens;
  above, the weight unpacked once to int8 and the W8A8 Triton GEMM;
* ``w4a8-triton`` / ``w8a8-triton`` (the ``triton`` preference for symmetric per-row weights with 8-bit
  per-token activations): the input quantized per token by one fused Triton pass
  (:func:`ptqlab.kernels.act_quant.quantize_int8_rows`), then one Triton int8 tensor-core GEMM that reads the
  weight as packed 4-bit codes (unpacked to int8 in registers) or int8, with the per-token x per-channel scales
  and the bias applied to the int32 accumulator in its epilogue;
* ``w8a8-fp8``: FP8 E4M3 weights per output channel and activations per token (``--weight-format fp8``):
  one fused Triton pass quantizes the input (:func:`ptqlab.kernels.act_quant.quantize_fp8_rows`), then
  ``torch._scaled_mm`` with row-wise scales (Hopper and later);
* ``w4a16-tinygemm`` (the ``tinygemm`` preference, the default before the Triton kernels were measured): up to
  ``TINYGEMM_MAX_M`` tokens PyTorch's own int4 weight-only GEMM (``torch._weight_int4pack_mm``: bf16 activations
  and scales on CUDA, so its numbers differ from the fp16 model by bf16 rounding); above, the weight unpacked by one Triton kernel
  (:mod:`ptqlab.kernels.int4_dequant`, bit-identical to the fake-quant weight) and cuBLAS.  It keeps both
  layouts (about 1.06 bytes a weight);
* ``w4a16-gemlite`` / ``w8a16-gemlite`` / ``w2a16-gemlite``: weight-only through gemlite's Triton
  GEMV/GEMM (``A16Wn``, optional dependency; grouped or per-row grids); kept for 8/2-bit weights and for
  comparison (``gemlite`` preference for 4 bits);
* ``w8a8-int8`` / ``w4a8-int8`` (the ``tinygemm`` preference's int8 path): ``torch._int_mm`` and a
  separate Triton epilogue over its int32 result; 4-bit weights stored as int8.

LoRC: the Triton kernels add ``(x V^T) U^T`` inside the same GEMV/GEMM (the product is linear in x, so each
split-K share adds its part; no side GEMMs, no second pass over the output), and so does ``w4a16-mma`` up to 16
tokens (rank <= 32); the other backends, and the paths at many tokens, run it as a thin side GEMM
(``y += (x V^T) U^T``).  Integer codes come from the layer's
``weight_scale``/``weight_zero`` (``codes = clamp(round(W / scale) + zero, 0, 2**bits - 1)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..quantizers import PER_ROW, PER_TENSOR, QuantizationError, QuantSpec

KERNEL_MODES = ("auto", "fake", "real")
#: up to this many tokens W4A16 runs tinygemm; above, unpack + cuBLAS (crossover measured on an H100)
TINYGEMM_MAX_M = 16
#: the kernel family a layer gets when several run it: ptqlab's own kernels ("triton", the name from before its
#: CUDA W4A16 kernel joined: fp16 W4A16 layers run ``w4a16-mma`` where it builds), or "tinygemm"
#: (PyTorch's int4 GEMM and ``torch._int_mm``: the previous default) or "gemlite" (4-bit weight-only through gemlite)
PREFERENCES = ("triton", "tinygemm", "gemlite")
# the Triton family by default since it was measured on an H200 (bench/README.md, "ptqlab's own low-bit kernels"):
# W4A16 decoding of the OPT-6.7B shape 1.15x tinygemm's tokens/s at batch 1 and 2.0x at batch 16 from one layout
# (0.28x FP16 bytes; tinygemm keeps two), LoRC inside the kernel (-4% / -9% of W4A16 against -30% as side GEMMs),
# W8A8 decoding 1.08x / 1.18x FP16, 4-bit W4A8 weights kept packed, and the only FP8 path; with the CUDA W4A16
# kernel (session 32) W4A16 decodes at 1.45x / 1.32x FP16 against the Triton kernels' 1.28x / 1.09x, and with
# LoRC in its epilogue (session 34) W4A16 + LoRC8 at 1.44x / 1.19x FP16 against the Triton kernels' 1.17x / 0.92x
DEFAULT_PREFERENCE = "triton"

@dataclass(frozen=True)
class KernelBackend:
    """One real kernel: which (weight, activation) specs it runs, how it lays out a layer's codes, and its GEMM.

    ``supports(w, a, preference)``: whether it runs these specs (``preference``: one of :data:`PREFERENCES`,
    the user's choice between backends that run the same specs); ``fits(layer)``: whether it runs this layer
    (dtype, shape, LoRC; the next backend that supports the specs runs it otherwise);
    ``build(real, codes, scale, zero, group)`` registers the packed buffers on the :class:`RealLinear`;
    ``forward(real, x, x2)`` returns ``(y [tokens, out], lorc_input)`` for the input ``x`` and its ``[tokens, in]``
    view ``x2`` (``lorc_input`` None: no LoRC to add, or the kernel added LoRC's product itself).
    """

    name: str
    summary: str
    supports: Callable[[QuantSpec, QuantSpec, str], bool]
    build: Callable[..., None]
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    #: whether it runs this particular layer (its dtype, shape, LoRC), beyond the specs; False: the next backend
    fits: Callable[[nn.Module], bool] = lambda layer: True
    #: the dimension of each buffer ``build`` registers that runs over the output channels, so that layers reading
    #: one input fuse into one wider layer (:mod:`ptqlab.kernels.fuse`); None: its layers run one by one (a layout
    #: whose weight runs over the outputs along a later dimension would need a copy of it to fuse)
    out_dims: Mapping[str, int] | None = None


KERNEL_BACKENDS: dict[str, KernelBackend] = {}


def register_kernel(backend: KernelBackend) -> KernelBackend:
    """Add a backend; the first registered that supports a layer's specs runs it (so order is preference)."""
    if backend.name in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend '{backend.name}' is registered twice")
    KERNEL_BACKENDS[backend.name] = backend
    return backend


class KernelError(QuantizationError):
    """No real kernel for this layer/device, or a layer that lacks what a real kernel needs."""


def available_kernels() -> str:
    return "; ".join(f"{k} ({b.summary})" for k, b in KERNEL_BACKENDS.items())


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


def kernel_for(w: QuantSpec, a: QuantSpec, preference: str = DEFAULT_PREFERENCE,
               layer: nn.Module | None = None) -> str | None:
    """The first backend that runs weights ``w`` with activations ``a`` (and fits ``layer``, when given; None:
    none does)."""
    if preference not in PREFERENCES:
        raise KernelError(f"unknown kernel preference {preference!r}; choose one of {', '.join(PREFERENCES)}")
    if not w.enabled or w.group_size == PER_TENSOR:
        return None
    return next((name for name, b in KERNEL_BACKENDS.items()
                 if b.supports(w, a, preference) and (layer is None or b.fits(layer))), None)


def scheme_of(layer: nn.Module, w4a16_backend: str = DEFAULT_PREFERENCE) -> str | None:
    """The real kernel for this layer's (weight, activation) specs, or None if there is none.

    ``w4a16_backend``: the preferred kernel family (:data:`PREFERENCES`; the name is historical)."""
    if getattr(layer, "input_rotation", None):
        kernel_for(layer.weight_spec, layer.act_spec, w4a16_backend)  # (the preference is still checked)
        return None  # no kernel here rotates its input online: the rotation transform's down-projections
    return kernel_for(layer.weight_spec, layer.act_spec, w4a16_backend, layer)


def _describe(layer: nn.Module) -> str:
    rotated = " + online Hadamard" if getattr(layer, "input_rotation", None) else ""
    return f"W {layer.weight_spec.describe()} / A {layer.act_spec.describe()}{rotated}"


class RealLinear(nn.Module):
    """A quantized linear layer executed by a real low-bit kernel (see the module docstring)."""

    def __init__(self, layer: nn.Module, scheme: str, keep_original: bool = True) -> None:
        super().__init__()
        self.name, self.scheme = layer.name, scheme
        # the module the QuantLinear replaced, for the session's restore (a plain attribute, not a submodule);
        # without a restore to come (keep_original False) it is dropped, and its fp16 weight with it
        object.__setattr__(self, "original", getattr(layer, "original", None) if keep_original else None)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.act_spec: QuantSpec = layer.act_spec
        self.weight_spec: QuantSpec = layer.weight_spec
        self.dtype = layer.weight.dtype
        self.bias = layer.bias
        self.lorc_u, self.lorc_v = layer.lorc_u, layer.lorc_v
        codes, scale, zero = weight_codes(layer)
        self.backend = KERNEL_BACKENDS[scheme]
        self.backend.build(self, codes, scale, zero, self.in_features // scale.shape[1])

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
        y, lorc_in = self.backend.forward(self, x, x2)
        if self.lorc_u is not None and lorc_in is not None:  # (None: the kernel added LoRC's product itself)
            y.addmm_(nn.functional.linear(lorc_in, self.lorc_v), self.lorc_u.t())
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        rank = 0 if self.lorc_u is None else self.lorc_u.shape[1]
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme}, lorc_rank={rank}"


def select_kernels(model: nn.Module, mode: str = "fake", device: str | torch.device = "cpu",
                   w4a16_backend: str = DEFAULT_PREFERENCE, offloaded: bool = False,
                   keep_original: bool = True) -> dict:
    """Swap quantized layers for real kernels according to ``mode`` (auto|fake|real); returns a summary.

    ``real``: every quantized layer must have a kernel, on CUDA (else a :class:`KernelError` listing what
    exists).  ``auto``: real where a kernel exists, fake elsewhere, with a one-line notice.
    ``w4a16_backend``: the preferred kernel family (:data:`PREFERENCES`).  ``keep_original`` False: drop the
    ``nn.Linear`` each layer replaced (no restore to come: the memory of the packed model alone).
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
        setattr(parent, child, RealLinear(quantized[name], scheme, keep_original))
        summary["real"][scheme] = summary["real"].get(scheme, 0) + 1
    return summary


# ---------------------------------------------------------------- the backends, in order of preference


def _w4_group_ok(w: QuantSpec) -> bool:
    # the Triton kernels read one scale row per chunk of K: groups of a power of two >= 32, or one per row
    return w.group_size == PER_ROW or (w.group_size >= 32 and w.group_size & (w.group_size - 1) == 0)


def _triton_w4a16(w: QuantSpec, a: QuantSpec, pref: str) -> bool:
    return pref == "triton" and w.bits == 4 and not w.is_float and not a.enabled and _w4_group_ok(w)


def _needs_k8(real: RealLinear) -> None:
    if real.in_features % 8:
        raise KernelError(f"{real.name}: {real.scheme} packs 8 codes a word along the input dimension, which must "
                          f"be divisible by 8 (got {real.in_features}); use --kernel fake or auto")


def _build_w4a16_triton(real: RealLinear, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        group: int) -> None:
    from .w4_gemm import WORKSPACE, pack_int4_k

    _needs_k8(real)
    real.register_buffer("w_packed", pack_int4_k(codes))  # [K/8, N] int32: the only copy of the weight
    real.register_buffer("w_scale", scale.t().to(torch.float16).contiguous())  # [G, N]
    symmetric = bool((zero == 8).all())  # (a symmetric 4-bit grid has zero point 8 everywhere)
    real.register_buffer("w_zero", None if symmetric else zero.t().to(torch.float16).contiguous())
    real.group = group
    WORKSPACE.reserve(real.out_features, codes.device)  # before any CUDA-graph capture


def _forward_w4a16_triton(real: RealLinear, x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from . import w4_gemm

    if x2.shape[0] > w4_gemm.GEMM_MAX_M:  # compute-bound: unpack once, cuBLAS
        wt = w4_gemm.dequant_w4(real.w_packed, real.w_scale, real.w_zero, real.group, x2.dtype)
        y = torch.mm(x2, wt) if real.bias is None else torch.addmm(real.bias, x2, wt)
        return y, x2
    y = w4_gemm.w4a16_gemm(x2, real.w_packed, real.w_scale, real.w_zero, real.group, real.bias, lorc=_lorc(real))
    return y, None


def _mma_w4a16(w: QuantSpec, a: QuantSpec, pref: str) -> bool:
    from .w4_mma import unavailable

    group_ok = w.group_size == PER_ROW or (w.group_size > 0 and w.group_size % 64 == 0)
    return _triton_w4a16(w, a, pref) and group_ok and unavailable() is None


def _mma_fits(layer: nn.Module) -> bool:
    from .w4_mma import check_shape

    # fp16 only and its tile shape (LoRC: in its epilogue up to 16 tokens, an addmm after it beyond)
    return layer.weight.dtype == torch.float16 and check_shape(layer.out_features, layer.in_features) is None


def _build_w4a16_mma(real: RealLinear, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     group: int) -> None:
    from .w4_mma import pack_int4_mma, reserve

    real.register_buffer("w_packed", pack_int4_mma(codes))  # [N/16, K/64, 32, 4] int32: the only copy
    real.register_buffer("w_scale", scale.t().to(torch.float16).contiguous())  # [G, N]
    symmetric = bool((zero == 8).all())
    real.register_buffer("w_zero", None if symmetric else zero.t().to(torch.float16).contiguous())
    real.group = group
    if codes.is_cuda:
        reserve(real.out_features, codes.device)  # the split-K workspace, before any CUDA-graph capture


def _forward_w4a16_mma(real: RealLinear, x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from . import w4_mma

    if x2.shape[0] > w4_mma.MMA_MAX_M:  # compute-bound: unpack once (the same layout), cuBLAS
        w = w4_mma.dequant_mma(real.w_packed, real.w_scale, real.w_zero, real.group)
        return nn.functional.linear(x2, w, real.bias), x2
    return w4_mma.w4a16_mma(x2, real.w_packed, real.w_scale, real.w_zero, real.group, real.bias,
                            lorc=_lorc(real)), None


def _lorc(real: RealLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """LoRC's factors for a kernel that adds their product in its own epilogue (``None``: no LoRC)."""
    return None if real.lorc_u is None else (real.lorc_v, real.lorc_u)


def _triton_w_a8(bits: int) -> Callable[[QuantSpec, QuantSpec, str], bool]:
    def supports(w: QuantSpec, a: QuantSpec, pref: str) -> bool:
        return pref == "triton" and _w_a8(bits)(w, a, "tinygemm")

    return supports


def _build_int_triton(real: RealLinear, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      group: int) -> None:
    from .w4_gemm import WORKSPACE, pack_int4_k

    if real.weight_spec.bits == 4:  # 4-bit codes stay packed: 0.5 byte a weight
        _needs_k8(real)
        real.register_buffer("w_packed", pack_int4_k(codes))
    else:
        real.register_buffer("w_int8", (codes.to(torch.int16) - zero.to(torch.int16)).to(torch.int8).contiguous())
    real.register_buffer("w_scale", scale[:, 0].contiguous())
    WORKSPACE.reserve(real.out_features, codes.device)


def _forward_int_triton(real: RealLinear, x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .act_quant import SHARED_INPUTS
    from .w4_gemm import int_gemm

    codes, sx = SHARED_INPUTS.get_int8(x, real.act_spec, f"{real.name} input")
    w4 = real.weight_spec.bits == 4
    y = int_gemm(codes, sx, real.w_packed if w4 else real.w_int8, real.w_scale, real.bias, real.dtype, w4,
                 lorc=_lorc(real))
    return y, None


def _mma_w4a8(w: QuantSpec, a: QuantSpec, pref: str) -> bool:
    from .w4_mma import unavailable

    return _triton_w_a8(4)(w, a, pref) and unavailable() is None


def _mma_w4a8_fits(layer: nn.Module) -> bool:
    from .w4_mma import check_shape
    from .w4a8_mma import MAX_K

    # fp16 outputs and the MMA layout's tile. LoRC layers take w4a8-triton, whose kernel adds the product itself:
    # here it would be two side GEMMs, 10% slower in decoding at batch 1 (H200, session 37 call 4: 191.6 against
    # 212.2 tok/s; 2424 against 2342 at batch 16)
    return (layer.weight.dtype == torch.float16 and check_shape(layer.out_features, layer.in_features) is None
            and layer.in_features <= MAX_K and layer.lorc_u is None)


def _build_w4a8_mma(real: RealLinear, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    group: int) -> None:
    from .w4_mma import pack_int4_mma, reserve

    real.register_buffer("w_packed", pack_int4_mma(codes))  # [N/16, K/64, 32, 4] int32, zero point 8: one copy
    real.register_buffer("w_scale", scale[:, 0].contiguous())  # [N] float32
    if codes.is_cuda:  # the split-K workspaces (the MMA kernel's, the Triton GEMM's), before any CUDA-graph capture
        from .w4_gemm import WORKSPACE  # (Triton: on a GPU machine only)

        reserve(real.out_features, codes.device)
        WORKSPACE.reserve(real.out_features, codes.device)


def _forward_w4a8_mma(real: RealLinear, x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .act_quant import SHARED_INPUTS
    from .w4a8_mma import w4a8_mma

    codes, sx = SHARED_INPUTS.get_int8(x, real.act_spec, f"{real.name} input")
    y = w4a8_mma(codes, sx, real.w_packed, real.w_scale, real.bias)
    # LoRC (a layer given this backend explicitly: the selection sends LoRC layers to w4a8-triton): (x_q V^T) U^T
    # as two thin GEMMs on the quantized input, as the fake-quant layer and w4a8-triton's in-kernel product
    lorc_in = codes.to(real.dtype) * sx[:, None].to(real.dtype) if real.lorc_u is not None else None
    return y, lorc_in


def _fp8(w: QuantSpec, a: QuantSpec, pref: str) -> bool:
    # in the triton family, with the Triton activation quantizer it depends on
    return pref == "triton" and w.fmt == "fp8" and a.fmt == "fp8" and w.group_size == PER_ROW and a.group_size == PER_ROW


def _build_fp8(real: RealLinear, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> None:
    if real.in_features % 16 or real.out_features % 16:
        raise KernelError(f"{real.name}: torch._scaled_mm needs both dimensions divisible by 16, got "
                          f"{real.in_features}->{real.out_features}; use --kernel fake or auto")
    real.register_buffer("w_fp8", codes.to(torch.float8_e4m3fn).contiguous())  # E4M3 values, exact
    real.register_buffer("w_scale", scale[:, 0].reshape(1, -1).contiguous())  # [1, N] float32
    real.fp8_out = real.dtype  # the output dtype _scaled_mm takes (row-wise scaling: bf16 only on some builds)


def _forward_fp8(real: RealLinear, x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .act_quant import SHARED_INPUTS

    q, sx = SHARED_INPUTS.get_fp8(x, real.act_spec, f"{real.name} input")

    def mm(out: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
        return torch._scaled_mm(q, real.w_fp8.t(), scale_a=sx[:, None], scale_b=real.w_scale, bias=bias,
                                out_dtype=out)

    if real.fp8_out == real.dtype:
        try:
            y = mm(real.dtype, real.bias)
        except RuntimeError:  # e.g. "only bf16 output for row-wise scaling": decided once, on the first call
            real.fp8_out = torch.bfloat16
    if real.fp8_out != real.dtype:
        y = mm(torch.bfloat16, None).to(real.dtype)
        if real.bias is not None:
            y += real.bias
    lorc_in = (q.to(torch.float32) * sx[:, None]).to(real.dtype) if real.lorc_u is not None else None
    return y, lorc_in


def _build_int8(real: RealLinear, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> None:
    # symmetric grid: codes - 2**(bits-1) are the signed integers; one float32 scale per output row
    real.register_buffer("w_int8", (codes.to(torch.int16) - zero.to(torch.int16)).to(torch.int8).contiguous())
    real.register_buffer("w_scale", scale[:, 0].contiguous())


def _forward_int8(real: RealLinear, x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y, codes, sx = real._int8_gemm(x)
    lorc_in = codes.to(real.dtype) * sx[:, None].to(real.dtype) if real.lorc_u is not None else None
    return y, lorc_in


def _w_a8(bits: int) -> Callable[[QuantSpec, QuantSpec, str], bool]:
    def supports(w: QuantSpec, a: QuantSpec, pref: str) -> bool:
        return (pref != "triton" and w.bits == bits and a.bits == 8 and a.symmetric and a.group_size == PER_ROW
                and w.symmetric and w.group_size == PER_ROW and not w.is_float and not a.is_float)

    return supports


def _build_tinygemm(real: RealLinear, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    group: int) -> None:
    # tinygemm's grid: w = (q - 8) * scale + zero_f, so zero_f = (8 - zero) * scale; bf16 scales/zeros
    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
    real.register_buffer("w_packed", torch.ops.aten._convert_weight_to_int4pack(packed, 8))
    sz = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).contiguous()
    real.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
    real.group = group
    # the large-M layout: two codes a byte plus the exact float32 grid
    real.register_buffer("w_nibbles", pack_int4(codes))
    real.register_buffer("w_scale", scale.contiguous())
    real.register_buffer("w_zero", zero.contiguous())


def _forward_tinygemm(real: RealLinear, x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x2.shape[0] > TINYGEMM_MAX_M:
        from .int4_dequant import dequant_int4

        w = dequant_int4(real.w_nibbles, real.w_scale, real.w_zero, real.dtype)
        return nn.functional.linear(x2, w, real.bias), x2
    y = torch._weight_int4pack_mm(x2.to(torch.bfloat16), real.w_packed, real.group, real.scales_and_zeros)
    y = y.to(real.dtype)
    if real.bias is not None:
        y += real.bias
    return y, x2


def _build_gemlite(real: RealLinear, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> None:
    try:
        from gemlite.helper import A16Wn
    except ImportError as err:
        raise KernelError(f"{real.name}: {real.scheme} needs the gemlite package (pip install gemlite)") from err
    try:
        real.gemlite = A16Wn(device=str(codes.device), dtype=real.dtype).from_weights(
            codes, scale.to(real.dtype), zero.to(real.dtype), real.weight_spec.bits, group,
            bias=None if real.bias is None else real.bias.data,
        )
    except Exception as err:  # gemlite asserts on shapes/groups it does not cover
        raise KernelError(f"{real.name}: gemlite cannot pack W {real.weight_spec.describe()} at "
                          f"{tuple(codes.shape)}: {err}") from err


def _forward_gemlite(real: RealLinear, x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return real.gemlite(x2), x2


def _weight_only(bits: int, tinygemm: bool = False) -> Callable[[QuantSpec, QuantSpec, str], bool]:
    def supports(w: QuantSpec, a: QuantSpec, pref: str) -> bool:
        if a.enabled or w.bits != bits or w.is_float:
            return False
        return pref == "tinygemm" and w.group_size in (32, 64, 128, 256) if tinygemm else True

    return supports


register_kernel(KernelBackend(
    "w8a8-triton", "8-bit symmetric per-row weights, 8-bit symmetric per-token activations: Triton int8 GEMM with "
    "the scales and bias in its epilogue", _triton_w_a8(8), _build_int_triton, _forward_int_triton,
    out_dims={"w_int8": 0, "w_scale": 0}))
register_kernel(KernelBackend(
    "w4a8-mma", "4-bit symmetric per-row weights packed in MMA fragment order, 8-bit symmetric per-token "
    "activations: ptqlab's CUDA int8 tensor-core kernel unpacking the weight in registers, scales in its epilogue "
    "(<= 128 tokens), unpack to int8 + the Triton int8 GEMM above; built with nvcc at first use", _mma_w4a8,
    _build_w4a8_mma, _forward_w4a8_mma, _mma_w4a8_fits, out_dims={"w_packed": 0, "w_scale": 0}))
register_kernel(KernelBackend(
    "w4a8-triton", "4-bit symmetric per-row weights kept packed, 8-bit symmetric per-token activations: Triton int8 "
    "GEMM unpacking the weight in registers", _triton_w_a8(4), _build_int_triton, _forward_int_triton))
register_kernel(KernelBackend(
    "w8a8-fp8", "FP8 E4M3 per-channel weights and per-token activations: fused Triton activation quantization + "
    "torch._scaled_mm (row-wise scales)", _fp8, _build_fp8, _forward_fp8, out_dims={"w_fp8": 0, "w_scale": 1}))
register_kernel(KernelBackend(
    "w4a16-mma", "4-bit weights per row or in groups of a multiple of 64, fp16 activations, LoRC in its epilogue up "
    "to 16 tokens: ptqlab's CUDA tensor-core kernel on the weight in MMA fragment order (<= 128 tokens), unpack + "
    "cuBLAS above; built with nvcc at first use", _mma_w4a16, _build_w4a16_mma, _forward_w4a16_mma, _mma_fits,
    out_dims={"w_packed": 0, "w_scale": 1, "w_zero": 1}))
register_kernel(KernelBackend(
    "w4a16-triton", "4-bit weights per row or in groups of 32..4096 (power of two), fp16/bf16 activations: Triton "
    "GEMV/GEMM on the packed codes, unpack + cuBLAS at many tokens", _triton_w4a16, _build_w4a16_triton,
    _forward_w4a16_triton))
register_kernel(KernelBackend(
    "w8a8-int8", "8-bit symmetric per-row weights, 8-bit symmetric per-token activations: torch._int_mm",
    _w_a8(8), _build_int8, _forward_int8, out_dims={"w_int8": 0, "w_scale": 0}))
register_kernel(KernelBackend(
    "w4a8-int8", "4-bit symmetric per-row weights, 8-bit symmetric per-token activations: torch._int_mm",
    _w_a8(4), _build_int8, _forward_int8))
register_kernel(KernelBackend(
    "w4a16-tinygemm", "4-bit weights in groups of 32/64/128/256: torch._weight_int4pack_mm (<= 16 tokens), "
    "else Triton unpack + cuBLAS", _weight_only(4, tinygemm=True), _build_tinygemm, _forward_tinygemm))
register_kernel(KernelBackend(
    "w4a16-gemlite", "4-bit weights (per row or groups), fp16 activations: gemlite A16Wn (optional package)",
    _weight_only(4), _build_gemlite, _forward_gemlite))
register_kernel(KernelBackend(
    "w8a16-gemlite", "8-bit weights (per row or groups), fp16 activations: gemlite A16Wn",
    _weight_only(8), _build_gemlite, _forward_gemlite))
register_kernel(KernelBackend(
    "w2a16-gemlite", "2-bit weights (per row or groups), fp16 activations: gemlite A16Wn",
    _weight_only(2), _build_gemlite, _forward_gemlite))

#: name -> what it runs (for error messages and the README), read from the table
KERNELS: dict[str, str] = {name: b.summary for name, b in KERNEL_BACKENDS.items()}
