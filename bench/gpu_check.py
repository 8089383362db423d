"""GPU correctness and speed of the fused Triton GPTQ kernel against the per-column torch loop.

    python bench/gpu_check.py

For each layer shape and spec: the fraction of weights where both paths agree,
the output error tr(D H D^T)/tr(W H W^T) of each, and the time of each.
Then: calibration hidden states offloaded to CPU memory give the same model
(GPTQ + LoRC, ZQ-Global) on the testbed OPT.
"""

from __future__ import annotations

import json
import time

import torch

from ptqlab.methods.gptq import gptq_quantize
from ptqlab.methods.zeroquant import local_objective
from ptqlab.quantizers import QuantSpec


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> None:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    cases = [
        (768, 768, QuantSpec(4, True, 128), False),
        (3072, 768, QuantSpec(4, True, 0), False),
        (768, 3072, QuantSpec(3, False, 128), False),
        (2304, 768, QuantSpec(4, True, 128), True),
        (4096, 4096, QuantSpec(4, True, 128), False),
        (4096, 16384, QuantSpec(4, True, 128), False),
    ]
    for rows, cols, spec, act_order in cases:
        X = torch.randn(8192, cols, device=dev, generator=gen) @ (torch.randn(cols, cols, device=dev, generator=gen) / cols**0.5)
        H = 2 * X.t() @ X / X.shape[0]
        W = torch.randn(rows, cols, device=dev, generator=gen) * 0.02
        gptq_quantize(W[:64], H, spec, act_order=act_order, use_triton=True)  # compile
        ref, t_torch = timed(lambda: gptq_quantize(W, H, spec, act_order=act_order, use_triton=False))
        got, t_triton = timed(lambda: gptq_quantize(W, H, spec, act_order=act_order, use_triton=True))
        den = local_objective(W, torch.zeros_like(W), H)
        print(json.dumps({
            "rows": rows, "cols": cols, "spec": spec.describe(), "act_order": act_order,
            "frac_equal": round(float(torch.isclose(got.weight, ref.weight, rtol=0, atol=1e-7).float().mean()), 6),
            "rel_err_torch": float(local_objective(W, ref.weight, H) / den),
            "rel_err_triton": float(local_objective(W, got.weight, H) / den),
            "torch_s": round(t_torch, 3), "triton_s": round(t_triton, 3),
        }), flush=True)

    check_offload()


def check_offload() -> None:
    """Calibration hidden states kept in CPU memory give the same quantized model as kept on the GPU."""
    from ptqlab import QuantConfig, ZQOptions, quantize_
    from ptqlab.models import load_model

    calib = torch.randint(0, 8192, (16, 512), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(4, True, 128)
    for config in (QuantConfig("gptq", spec, lorc_rank=8), QuantConfig("zq-global", spec, options={"zq": ZQOptions(steps=20)})):
        models = []
        for offload in (False, False, True):  # the repeat shows how deterministic the GPU run is by itself
            model, _ = load_model("testbed-opt", torch.float16)
            torch.manual_seed(0)
            report = quantize_(model, config, calib, "cuda", batch_size=4, offload_activations=offload)
            models.append((model, report))
        (a, ra), (again, _), (b, rb) = models

        def identical(x, y) -> str:
            same = [torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters())]
            return f"{sum(same)}/{len(same)}"

        print(json.dumps({"offload_check": config.name(), "params_identical_offloaded": identical(a, b),
                          "params_identical_repeat": identical(a, again),
                          "quantize_s_on_gpu": round(sum(ra.timings.values()), 3),
                          "quantize_s_offloaded": round(sum(rb.timings.values()), 3)}), flush=True)

if __name__ == "__main__":
    main()
