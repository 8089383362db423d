"""The Hessian accumulation on the GPU: fp16/bf16 calibration inputs go to cuBLAS as they are, with float32
accumulation and output (ptqlab.hessian.accumulate_gram), and give the float64 sum up to float32 rounding."""

from __future__ import annotations

import pytest
import torch

from ptqlab import hessian


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4096, 768), (333, 1000)])
def test_gram_of_half_inputs_is_the_float64_sum(dtype, shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(*shape, device="cuda", generator=g) * 3).to(dtype)
    x[:, 0] = 60000.0 if dtype == torch.float16 else 1e15  # squares past fp16's range (not float32's)
    total = torch.zeros(shape[1], shape[1], device="cuda")
    for chunk in x.split(1000):  # accumulated over batches, as the collector does
        hessian.accumulate_gram(total, chunk)
    ref = x.double().t() @ x.double()
    assert total.dtype == torch.float32 and bool(torch.isfinite(total).all())
    for part in (slice(None), slice(1, None)):  # the whole, and without the large column that dominates its norm
        got, want = total.double()[part, part], ref[part, part]
        rel = float((got - want).norm() / want.norm())
        # float32 accumulation of 1000-4096 terms: ~sqrt(n) * 6e-8, a few 1e-6 (cuBLAS's float32 GEMM measured
        # 1.5e-6 to 2.4e-6 here on the float32 case); fp16-rounded output or accumulation would give ~1e-3
        assert rel < 2e-5, (part, rel)
    if dtype != torch.float32:
        assert hessian._HALF_INPUTS[0], "this torch should have addmm(out_dtype=float32) for half inputs on CUDA"
