"""Rank-m truncated SVD for LoRC on the GPU: time and accuracy of the candidate solvers.

    python bench/bench_lorc_svd.py [--rank 8]

LoRC needs only the top ``m`` singular triplets of each error matrix
``E = W - Q(W)``; a full SVD computes all of them. For each layer shape this
times (median of 3, after a warm-up) every solver and reports the fraction of
the optimal rank-m energy it captures, ``(||E||^2 - ||E - U V||^2) / sum(top-m sigma^2)``
(1.0 is Eckart-Young optimal). Weights are random with a few outlier input
channels (as LLM weights have), RTN int4 g128; timing and accuracy only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ptqlab.quantizers import QuantSpec, fake_quantize

SHAPES = [(768, 768), (3072, 768), (768, 3072), (2048, 8192), (4096, 4096), (16384, 4096), (4096, 16384)]


def error_matrix(out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    outliers = torch.randperm(in_f, generator=gen)[: max(1, in_f // 256)]
    w[:, outliers] *= 20
    w = w.cuda()
    return w - fake_quantize(w, QuantSpec(4, True, 128))


def full_svd(E: torch.Tensor, m: int, driver: str | None = None):
    U, S, Vh = torch.linalg.svd(E, full_matrices=False, driver=driver)
    return U[:, :m] * S[:m], Vh[:m]


def gram_eigh(E: torch.Tensor, m: int, dtype: torch.dtype):
    """Top eigenvectors of the smaller Gram matrix, then the other factor by one product."""
    A = E.to(dtype)
    tall = A.shape[0] >= A.shape[1]
    G = A.t() @ A if tall else A @ A.t()
    _, vecs = torch.linalg.eigh(G)  # ascending
    top = vecs[:, -m:].flip(1)
    if tall:  # E ~ (E V) V^T
        return (A @ top).float(), top.t().float()
    return top.float(), (top.t() @ A).float()  # E ~ U (U^T E)


def lowrank(E: torch.Tensor, m: int, oversample: int, niter: int):
    U, S, V = torch.svd_lowrank(E, q=m + oversample, niter=niter)
    return U[:, :m] * S[:m], V[:, :m].t()


def timed(fn, repeats: int = 3):
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=8)
    a = p.parse_args()
    m = a.rank
    gen = torch.Generator().manual_seed(0)
    solvers = {
        "svd (default driver)": lambda E: full_svd(E, m),
        "svd gesvdj": lambda E: full_svd(E, m, "gesvdj"),
        "gram+eigh fp64": lambda E: gram_eigh(E, m, torch.float64),
        "gram+eigh fp32": lambda E: gram_eigh(E, m, torch.float32),
        "svd_lowrank q=m+8 niter=2": lambda E: lowrank(E, m, 8, 2),
        "svd_lowrank q=m+8 niter=8": lambda E: lowrank(E, m, 8, 8),
        "svd_lowrank q=2m+16 niter=16": lambda E: lowrank(E, m, m + 16, 16),
    }
    for out_f, in_f in SHAPES:
        E = error_matrix(out_f, in_f, gen)
        S = torch.linalg.svdvals(E.double())
        optimal = float((S[:m] ** 2).sum())
        total = float((E.double() ** 2).sum())
        for name, fn in solvers.items():
            try:
                (u, v), seconds = timed(lambda fn=fn: fn(E))
            except RuntimeError as err:  # a driver may not support a shape
                print(json.dumps({"shape": [out_f, in_f], "solver": name, "error": str(err)[:200]}), flush=True)
                continue
            residual = float(((E.double() - u.double() @ v.double()) ** 2).sum())
            print(json.dumps({
                "shape": [out_f, in_f], "rank": m, "solver": name, "seconds": round(seconds, 5),
                "captured_of_optimal": round((total - residual) / optimal, 5),
                "top_m_energy_share": round(optimal / total, 5), "device": torch.cuda.get_device_name(),
            }), flush=True)


if __name__ == "__main__":
    main()
