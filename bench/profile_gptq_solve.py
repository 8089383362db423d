"""Where GPTQ's per-layer solve spends its time on a GPU (issue 22): the inverse-Hessian Cholesky, the Triton column
loop and the lazy updates, on full-size layer shapes, by CUDA kernel (torch.profiler).

    python bench/profile_gptq_solve.py --out $OUT/solve.jsonl        # OPT-6.7B's shapes: qkv, out, fc1, fc2

Each shape: ``W [out, in]`` random, ``H = X^T X / n`` from ``--tokens`` random fp16 inputs (positive definite),
W4 g128; one untimed call (compile, cuSOLVER workspace), then a timed one (wall, synchronised) and a profiled one.
A row per shape: wall seconds of ``gptq_quantize`` and of ``inverse_hessian_cholesky`` alone, and the CUDA time of
the kernels that take the most, grouped by name. Random weights: time only.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from kernel_common import emit, open_output
from ptqlab.methods.gptq import gptq_quantize, inverse_hessian_cholesky
from ptqlab.quantizers import QuantSpec

SHAPES = {"qkv": (12288, 4096), "out": (4096, 4096), "fc1": (16384, 4096), "fc2": (4096, 16384)}


def _wall(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def profile_shape(name: str, out: int, inp: int, tokens: int, top: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(out, inp, device="cuda", generator=g) * 0.02
    x = torch.randn(tokens, inp, device="cuda", generator=g, dtype=torch.float16)
    h = torch.addmm(torch.zeros(inp, inp, device="cuda"), x.t(), x, out_dtype=torch.float32).mul_(2 / tokens)
    del x
    spec = QuantSpec(4, True, 128)

    def run():
        return gptq_quantize(w.clone(), h, spec)

    run()  # compile the Triton loop, cuSOLVER's workspace
    row = {"shape": name, "out": out, "in": inp, "tokens": tokens, "torch": torch.__version__, "gptq_s": _wall(run),
           "cholesky_s": _wall(lambda: inverse_hessian_cholesky(h, 0.01, name))}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            kernels[e.key[:90]] = (t / 1e6, e.count)
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    row["cuda_total_s"] = sum(t for t, _ in kernels.values())
    row["top_kernels"] = [{"kernel": k, "s": round(t, 5), "calls": n} for k, (t, n) in ranked]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_gptq_solve.py needs a CUDA GPU", file=sys.stderr)
        return 2
    open_output(a.out)
    for name in a.shapes.split(","):
        emit(profile_shape(name, *SHAPES[name], a.tokens, a.top))  # (emit adds the GPU's name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
