"""Dynamic activation quantization (per token or token-wise groups) as one Triton kernel.

The torch reference (:func:`ptqlab.quantizers.fake_quantize`) launches about
fifteen kernels over float32 copies of the input, plus a device sync for its
non-finite check.  Here one program reads ``BLOCK_R`` rows (tokens, or groups
of a token) once, computes min/max, scale and zero point in registers and
writes either the dequantized values (fake quantization) or the signed int8
codes and the per-row scale (the input of the integer GEMM in
:mod:`ptqlab.kernels.real`).  The grid and rounding are the reference's as
torch runs it on CUDA: a tensor divided by a Python number is multiplied by
the float32 reciprocal there (``range * (1/maxq)``), a tensor divided by a
tensor is IEEE division (``div_rn``), rounding is half-to-even; so codes are
identical to ``fake_quantize`` on the same GPU.  (On the CPU torch divides
by the number itself, which can move a scale by one ulp.)

A row holding NaN or Inf is written as NaN instead of raising (no device
sync per layer); evaluation checks the logits once per window and reports it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quantizers import PER_ROW, PER_TENSOR, QuantizationError, QuantSpec
from .gptq_triton import _rint
from .input_cache import InputCache


@triton.jit
def _act_quant_kernel(
    X, Y, S, rows, C, maxq, inv_maxq,
    SYM: tl.constexpr, INT8: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    rmask = r < rows
    mask = rmask[:, None] & (c < C)[None, :]
    offs = r[:, None] * C + c[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    # rows with NaN/Inf: x - x is NaN there (and 0 for every finite value)
    bad = tl.max(tl.where(x - x == 0.0, 0, 1), axis=1) > 0
    xmin = tl.minimum(tl.min(x, axis=1), 0.0)
    xmax = tl.maximum(tl.max(x, axis=1), 0.0)
    if SYM:
        scale = 2.0 * tl.maximum(-xmin, xmax) * inv_maxq
        scale = tl.where(scale > 0, scale, 1.0)
        zero = tl.zeros_like(scale) + (maxq + 1.0) * 0.5
    else:
        scale = (xmax - xmin) * inv_maxq
        scale = tl.where(scale > 0, scale, 1.0)
        zero = _rint(tl.math.div_rn(-xmin, scale))
    q = _rint(tl.math.div_rn(x, scale[:, None])) + zero[:, None]
    q = tl.minimum(tl.maximum(q, 0.0), maxq)
    if INT8:
        tl.store(Y + offs, (q - zero[:, None]).to(tl.int8), mask=mask)
        tl.store(S + r, tl.where(bad, float("nan"), scale), mask=rmask)
    else:
        y = (q - zero[:, None]) * scale[:, None]
        y = tl.where(bad[:, None], float("nan"), y)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_rows_kernel(X, Y, S, rows, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # FP8 E4M3 per token, ptqlab.formats' grid: scale = absmax / 448 (IEEE division; 1 for a zero row), values
    # x / scale rounded to nearest-even E4M3 by the saturating cast (|x / scale| <= 448 by construction)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    rmask = r < rows
    mask = rmask[:, None] & (c < C)[None, :]
    offs = r[:, None] * C + c[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    bad = tl.max(tl.where(x - x == 0.0, 0, 1), axis=1) > 0
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 448.0)
    scale = tl.where(scale > 0, scale, 1.0)
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -448.0), 448.0)
    tl.store(Y + offs, q.to(Y.dtype.element_ty), mask=mask)
    tl.store(S + r, tl.where(bad, float("nan"), scale), mask=rmask)


def quantize_fp8_rows(x: torch.Tensor, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 per-token quantization of ``x [..., K]`` in one pass: ``float8_e4m3fn`` values ``[rows, K]`` and
    float32 scales ``[rows]``; ``values * scale`` equals :func:`ptqlab.quantizers.fake_quantize` with the ``fp8``
    per-row spec (before its cast to ``x.dtype``).  A row with NaN/Inf gets a NaN scale."""
    x2 = x.contiguous().view(-1, x.shape[-1])
    rows, c = x2.shape
    values = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(rows, dtype=torch.float32, device=x.device)
    block_c = triton.next_power_of_2(c)
    block_r = max(1, 4096 // block_c)
    _fp8_rows_kernel[(triton.cdiv(rows, block_r),)](x2, values, scales, rows, c, BLOCK_R=block_r, BLOCK_C=block_c,
                                                     num_warps=4 if block_r * block_c <= 4096 else 8)
    return values, scales


def supported(spec: QuantSpec) -> bool:
    """Whether the fused kernel covers ``spec`` (per-tensor activation scales need a global reduction first;
    float formats round to their own grids, in :mod:`ptqlab.formats`)."""
    return spec.enabled and spec.group_size != PER_TENSOR and not spec.is_float


def _rows(x: torch.Tensor, spec: QuantSpec, name: str) -> tuple[torch.Tensor, int]:
    """``x`` as a contiguous ``[rows, C]`` matrix, one row per token (or token group)."""
    dim = x.shape[-1]
    if spec.group_size == PER_ROW:
        c = dim
    elif dim % spec.group_size != 0:
        raise QuantizationError(f"{name}: group size {spec.group_size} does not divide the input dimension {dim}")
    else:
        c = spec.group_size
    return x.contiguous().view(-1, c), c


def _warps(rows: int, block_r: int, block_c: int) -> int:
    """Warps a program of the per-token kernel. A few tokens (decoding) of 4096 columns or more: 16, so that each
    thread's chain of correctly rounded divisions (``div_rn``, one an element) is 8-32 long rather than 32-64;
    there every row is one program and its latency is the pass's time. Many rows keep 4 / 8 warps (more
    programs an SM). One H200, session 38 (bench/results/act_quant_warps_h200_session38_call4.jsonl): [1, 16384]
    5.06 -> 4.53 us, [16, 16384] 5.18 -> 4.33, [16, 4096] 2.83 -> 2.36; [2048, 4096] 11.0 us at 4 warps, 14.0 at
    16; W4A8 decode +5.8% / +5.5% at batch 1 / 16 (128 passes a step)."""
    if rows <= 64 and block_r == 1 and block_c >= 4096:
        return 16
    return 4 if block_r * block_c <= 4096 else 8


def _launch(x2: torch.Tensor, y: torch.Tensor, s: torch.Tensor | None, c: int, spec: QuantSpec, int8: bool) -> None:
    block_c = triton.next_power_of_2(c)
    block_r = max(1, 4096 // block_c)
    rows = x2.shape[0]
    grid = (triton.cdiv(rows, block_r),)
    _act_quant_kernel[grid](
        x2, y, s if s is not None else y, rows, c, float(spec.maxq), 1.0 / spec.maxq,
        SYM=spec.symmetric, INT8=int8, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_warps(rows, block_r, block_c),
    )


def fake_quantize_triton(x: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> torch.Tensor:
    """:func:`ptqlab.quantizers.fake_quantize` for per-token/group specs on CUDA, in one launch, without a sync."""
    if not supported(spec):
        raise QuantizationError(f"{name}: the fused activation kernel has no {spec.describe()} path")
    if x.numel() == 0:
        return x
    x2, c = _rows(x, spec, name)
    y = torch.empty_like(x2)
    _launch(x2, y, None, c, spec, int8=False)
    return y.view(x.shape)


def quantize_int8_rows(x: torch.Tensor, spec: QuantSpec, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token quantization of ``x [..., K]`` to signed int8 codes ``[rows, K]`` and float32 scales ``[rows]``.

    ``codes * scale`` equals :func:`fake_quantize` of ``x`` (before its cast to ``x.dtype``).
    """
    if not (spec.enabled and spec.symmetric and spec.group_size == PER_ROW):
        raise QuantizationError(f"{name}: the int8 input path needs symmetric per-token specs, got {spec.describe()}")
    x2, c = _rows(x, spec, name)
    codes = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    _launch(x2, codes, scales, c, spec, int8=True)
    return codes, scales


class SharedInputCache(InputCache):
    """The last input's quantized copy (see :class:`~ptqlab.kernels.input_cache.InputCache`)."""

    def get(self, x: torch.Tensor, spec: QuantSpec, name: str) -> torch.Tensor:
        """:func:`fake_quantize_triton` of ``x``."""
        return self.lookup(x, (spec, "fake"), lambda: fake_quantize_triton(x, spec, name))

    def get_int8(self, x: torch.Tensor, spec: QuantSpec, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`quantize_int8_rows` of ``x``."""
        return self.lookup(x, (spec, "int8"), lambda: quantize_int8_rows(x, spec, name))

    def get_fp8(self, x: torch.Tensor, spec: QuantSpec, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`quantize_fp8_rows` of ``x``."""
        return self.lookup(x, (spec, "fp8"), lambda: quantize_fp8_rows(x, name))


SHARED_INPUTS = SharedInputCache()
