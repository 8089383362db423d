"""Where GPTQ's per-layer solve spends its time on a GPU (issue 22): the inverse-Hessian Cholesky, the Triton column
loop and the lazy updates, on full-size layer shapes, by CUDA kernel (torch.profiler).

    python bench/profile_gptq_solve.py --out $OUT/solve.jsonl        # OPT-6.7B's shapes: qkv, out, fc1, fc2

Each shape: ``W [out, in]`` random, ``H = X^T X / n`` from ``--tokens`` random fp16 inputs (positive definite),
W4 g128; one untimed call (compile, cuSOLVER workspace), then a timed one (wall, synchronised) and a profiled one.
A row per shape: wall seconds of ``gptq_quantize`` and of ``inverse_hessian_cholesky`` alone, and the CUDA time of
the kernels that take the most, grouped by name. Random weights: time only.

    python bench/profile_gptq_solve.py --inverse-variants --out $OUT/inverse.jsonl

times the ways to the upper Cholesky factor of ``H^-1`` instead, per input width: the reference recipe (Cholesky,
``cholesky_inverse``, Cholesky), and one Cholesky of the flipped ``H`` with its triangular inverse by one ``trsm``
(``leaf`` = n) or by halves (``leaf`` < n), each on torch's default and MAGMA linear-algebra backends, with each
factor's relative Frobenius error against the float64 one.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from kernel_common import emit, open_output
from ptqlab.methods.gptq import (gptq_quantize, inverse_hessian_cholesky, lower_triangular_inverse,
                                 reference_upper_cholesky_of_inverse)
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


def _median_wall(fn, repeats: int) -> float:
    fn()  # workspaces, first-call setup
    return sorted(_wall(fn) for _ in range(repeats))[repeats // 2]


def inverse_variants(inp: int, tokens: int, leaves: list[int], repeats: int) -> list[dict]:
    """Time and float64 error of each route to ``U`` with ``U^T U = (H + damp I)^-1``, H from random inputs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, inp, device="cuda", generator=g, dtype=torch.float16)
    h = torch.addmm(torch.zeros(inp, inp, device="cuda"), x.t(), x, out_dtype=torch.float32).mul_(2 / tokens)
    del x
    h.diagonal().add_(0.01 * float(h.diagonal().mean()))
    exact = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h.double())), upper=True)
    routes = {"reference": lambda: reference_upper_cholesky_of_inverse(h)}
    for leaf in leaves:
        routes[f"flip+inverse(leaf={leaf})"] = (
            lambda leaf=leaf: lower_triangular_inverse(torch.linalg.cholesky(h.flip(0, 1)), leaf).flip(0, 1))
    rows = []
    default = torch.backends.cuda.preferred_linalg_library()
    for backend in ("default", "magma"):
        torch.backends.cuda.preferred_linalg_library(default if backend == "default" else "magma")
        try:
            for name, fn in routes.items():
                seconds = _median_wall(fn, repeats)
                err = float((fn().double() - exact).norm() / exact.norm())
                rows.append({"in": inp, "tokens": tokens, "route": name, "backend": backend, "s": round(seconds, 5),
                             "rel_err_vs_float64": err, "torch": torch.__version__})
        finally:
            torch.backends.cuda.preferred_linalg_library(default)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--inverse-variants", action="store_true", help="time the routes to chol(H^-1) instead")
    ap.add_argument("--widths", default="4096,16384", help="input widths for --inverse-variants")
    ap.add_argument("--leaves", default="16384,4096,2048,1024", help="triangular-inverse leaf sizes")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_gptq_solve.py needs a CUDA GPU", file=sys.stderr)
        return 2
    open_output(a.out)
    if a.inverse_variants:
        for inp in (int(w) for w in a.widths.split(",")):
            leaves = sorted({min(int(v), inp) for v in a.leaves.split(",")}, reverse=True)
            for row in inverse_variants(inp, a.tokens, leaves, a.repeats):
                emit(row)
        return 0
    for name in a.shapes.split(","):
        emit(profile_shape(name, *SHAPES[name], a.tokens, a.top))  # (emit adds the GPU's name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
