"""Rank-m truncated SVD for LoRC on the GPU: time and accuracy of the candidate solvers.

    python bench/bench_lorc_svd.py [--rank 8]
    OUT=/some/dir python bench/bench_lorc_svd.py --krylov [--device cpu --shapes 2048x4096 --ranks 8 --repeats 1]

``--krylov`` instead compares LoRC's own ``top_singular_factors`` on its two paths, the full eigh of the Gram
matrix and the block-Krylov top eigenpairs (used from n = 4096), on the OPT-6.7B linear shapes at ranks 8 and 32,
for an error with outlier input channels and a flat one (no outliers): time of each, the Krylov space size and
whether it converged (else the call fell back to the eigh), and the differences in Frobenius error and singular
values. One row per case, printed and appended to ``$OUT/lorc_krylov.jsonl`` (when ``$OUT`` is set).

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
import os
import statistics
import time
from pathlib import Path

import torch

from ptqlab.methods import lorc
from ptqlab.quantizers import QuantSpec, fake_quantize

SHAPES = [(768, 768), (3072, 768), (768, 3072), (2048, 8192), (4096, 4096), (16384, 4096), (4096, 16384)]


def error_matrix(
    out_f: int, in_f: int, gen: torch.Generator, outliers: bool = True, device: str = "cuda"
) -> torch.Tensor:
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    if outliers:
        w[:, torch.randperm(in_f, generator=gen)[: max(1, in_f // 256)]] *= 20
    w = w.to(device)
    return w - fake_quantize(w, QuantSpec(4, True, 128))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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


def timed(fn, repeats: int = 3, device: str = "cuda", warmup: bool = True):
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def eigh_path(E: torch.Tensor, m: int):
    """top_singular_factors forced onto its full-eigh path (the reference)."""
    saved = lorc._KRYLOV_MIN_N
    lorc._KRYLOV_MIN_N = 10**9
    try:
        return lorc.top_singular_factors(E, m)
    finally:
        lorc._KRYLOV_MIN_N = saved


def krylov_compare(shapes: list[tuple[int, int]], ranks: list[int], device: str, repeats: int) -> None:
    out_dir = os.environ.get("OUT")
    sink = Path(out_dir) / "lorc_krylov.jsonl" if out_dir else None
    gen = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    for out_f, in_f in shapes:
        for outliers in (True, False):
            # as lorc_factors hands it over: float32 on the GPU, float64 on the CPU
            work = torch.float32 if device == "cuda" else torch.float64
            E = error_matrix(out_f, in_f, gen, outliers, device).to(work)
            E64 = E.double()
            total = float((E64**2).sum())
            gram = E64.t() @ E64 if out_f >= in_f else E64 @ E64.t()
            for m in ranks:
                warm = device == "cuda"  # on the CPU one cold call each (a 4096 eigh takes a minute there)
                (u0, v0), t_eigh = timed(lambda m=m: eigh_path(E, m), repeats, device, warmup=warm)
                (u1, v1), t_fast = timed(lambda m=m: lorc.top_singular_factors(E, m), repeats, device, warmup=warm)
                (_, t_gram) = timed(lambda: E64.t() @ E64 if out_f >= in_f else E64 @ E64.t(), repeats, device)
                info = lorc.top_eigenpairs_krylov(gram, m)
                err0 = float((E64 - u0.double() @ v0.double()).norm())
                err1 = float((E64 - u1.double() @ v1.double()).norm())
                s0 = u0.double().norm(dim=0) * v0.double().norm(dim=1)
                s1 = u1.double().norm(dim=0) * v1.double().norm(dim=1)
                row = {
                    "shape": [out_f, in_f], "rank": m, "error": "int4 g128, outlier inputs" if outliers else
                    "int4 g128, flat (no outliers)", "dtype": str(E.dtype), "device": name,
                    "eigh_path_s": round(t_eigh, 5), "krylov_path_s": round(t_fast, 5), "gram_s": round(t_gram, 5),
                    "speedup": round(t_eigh / t_fast, 2), "krylov_converged": info.converged,
                    "krylov_dim": info.dim, "krylov_residual": info.residual,
                    "frob_err_eigh": err0, "frob_err_rel_diff": (err1 - err0) / err0,
                    "sigma_max_rel_diff": float(((s1 - s0).abs() / s0[0]).max()),
                    "top_m_energy_share": round(float(s0.pow(2).sum()) / total, 5), "torch": torch.__version__,
                }
                print(json.dumps(row), flush=True)
                if sink is not None:
                    with sink.open("a") as f:
                        f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--krylov", action="store_true", help="compare LoRC's full-eigh and block-Krylov paths")
    p.add_argument("--shapes", default="4096x4096,16384x4096,4096x16384", help="--krylov: OUTxIN,...")
    p.add_argument("--ranks", default="8,32", help="--krylov: ranks")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="--krylov: timed calls per path (median)")
    a = p.parse_args()
    if a.krylov:
        shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
        krylov_compare(shapes, [int(r) for r in a.ranks.split(",")], a.device, a.repeats)
        return
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
