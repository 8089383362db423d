"""Where LoRC's time goes on one decoder block, and what batching its Krylov runs buys (issue 22).

    OUT=DIR python bench/profile_lorc.py [--shape opt-6.7b --rank 8 --aware]

On the linears of one block of the shape (OPT-6.7B: q, k, v, out 4096x4096, fc1 16384x4096, fc2 4096x16384), with
flat RTN int4 g128 errors of random weights (the slow spectrum; timing and accuracy only):

* ``one_at_a_time``: ``lorc_factors`` per linear (what the pipeline did before), and ``batched``:
  ``lorc_factors_many`` over the block (what it does now): median wall time of ``--repeat`` calls, peak GPU memory,
  and how far each batched product ``U V`` is from the one-at-a-time one (relative Frobenius).
* the batched call split into its phases (Krylov, factor products), the time the float64 Gram matrices would take
  (the library forms them only where Krylov does not converge), and the torch profiler's top CUDA kernels and CPU
  ops for the Krylov run.
* the Rayleigh-Ritz eigensolve alone (``torch.linalg.eigh`` of a ``d x d`` float64 matrix, ``d`` the Krylov space
  sizes LoRC reaches), on the GPU one at a time and as a batch of 6, in float32, and on the host CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench_lorc_svd import error_matrix
from ptqlab.methods import lorc
from ptqlab.quantizers import QuantSpec

BLOCKS = {  # (out, in) of each linear of one decoder block
    "opt-6.7b": [(4096, 4096)] * 4 + [(16384, 4096), (4096, 16384)],
    "llama-3-8b": [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
                   (4096, 14336)],
}


def timed(fn, sync, repeat: int) -> tuple[float, object]:
    """Median wall seconds of ``repeat`` calls (after one warm-up call), and the last result."""
    result = fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="opt-6.7b", choices=sorted(BLOCKS))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--aware", action="store_true", help="activation-aware LoRC (random input Hessians)")
    p.add_argument("--eigh-sizes", default="512,672,832,1024,1344")
    p.add_argument("--sweep", default="",
                   help="Krylov variants to time on the block's Grams: BLOCK:FIRST_CHECK:STREAMS,... (0: default)")
    a = p.parse_args()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sink = Path(os.environ["OUT"]) / "profile_lorc.jsonl" if os.environ.get("OUT") else None
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"

    def emit(row: dict) -> None:
        row = {"device": name, "torch": torch.__version__, "shape": a.shape, "rank": a.rank, **row}
        print(json.dumps(row), flush=True)
        if sink is not None:
            with sink.open("a") as f:
                f.write(json.dumps(row) + "\n")

    shapes = BLOCKS[a.shape]
    errors = [error_matrix(o, i, torch.Generator().manual_seed(k), outliers=False, device=dev).float()
              for k, (o, i) in enumerate(shapes)]
    hessians = None
    if a.aware:
        gen = torch.Generator(device=dev).manual_seed(1)
        hessians = []
        for _, i in shapes:
            X = torch.randn(2 * i, i, generator=gen, device=dev)
            hessians.append(X.t() @ X / (2 * i))
    ranks = [a.rank] * len(errors)
    spec = QuantSpec(8)
    hs = hessians or [None] * len(errors)

    def one_at_a_time():
        return [lorc.lorc_factors(e, r, spec, h) for e, r, h in zip(errors, ranks, hs)]

    def batched():
        return lorc.lorc_factors_many(errors, ranks, spec, hessians)

    for label, fn in (("one_at_a_time", one_at_a_time), ("batched", batched)):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds, result = timed(fn, sync, a.repeat)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        if label == "one_at_a_time":
            reference = result
            emit({"what": label, "seconds": round(seconds, 4), "peak_gib": peak})
        else:
            diffs = [float((u @ v - u0 @ v0).norm() / (u0 @ v0).norm()) for (u, v), (u0, v0) in zip(result, reference)]
            emit({"what": label, "seconds": round(seconds, 4), "peak_gib": peak,
                  "product_rel_diff_vs_one_at_a_time": diffs})

    # the batched call's phases, as the library runs them
    whitened = errors if hessians is None else [e @ lorc._hessian_factor(h, 0.01, torch.float32, "x")
                                                for e, h in zip(errors, hessians)]
    # (the float64 Grams: formed only for the full-eigh fallback and the exact reference below)
    gram_s, grams = timed(lambda: [lorc._gram(E) for E in whitened], sync, a.repeat)
    runs: list = []
    krylov = lorc.top_eigenpairs_krylov_batched

    def spy(*args, **kwargs):
        runs.append(krylov(*args, **kwargs))
        return runs[-1]

    lorc.top_eigenpairs_krylov_batched = spy
    try:
        eig_s, pairs = timed(lambda: lorc._top_eigenpairs_many(whitened, ranks), sync, a.repeat)
    finally:
        lorc.top_eigenpairs_krylov_batched = krylov
    last = runs[-1] if runs else []
    fac_s, _ = timed(lambda: [lorc._factors_from_eigenpairs(E, *pr) for E, pr in zip(whitened, pairs)], sync,
                     a.repeat)
    emit({"what": "batched_phases", "float64_grams_s": round(gram_s, 4), "eigenpairs_s": round(eig_s, 4),
          "factor_products_s": round(fac_s, 4), "krylov_runs_per_call": len(runs) // (a.repeat + 1),
          "krylov_dims": [r.dim for r in last], "converged": [r.converged for r in last],
          "residuals": [r.residual for r in last]})

    if cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            lorc._top_eigenpairs_many(whitened, ranks)
            sync()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
        cpu_table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60)
        print(table)
        print(cpu_table)
        if os.environ.get("OUT"):
            (Path(os.environ["OUT"]) / f"profile_lorc_{a.shape}.txt").write_text(table + "\n" + cpu_table)

    # Krylov variants: block width, first Rayleigh-Ritz size, concurrent eigh streams; each one's rank-m part of
    # the Gram (V diag(theta) V^T) against the full eigh's, next to what rounding the exact vectors to fp16 moves it
    variants = list(filter(None, a.sweep.split(",")))
    if variants:
        full = [torch.linalg.eigh(g) for g in grams]
        exact = [(vec[:, -r:] * val[-r:]) @ vec[:, -r:].t() for (val, vec), r in zip(full, ranks)]
        fp16 = [float(((vec[:, -r:].half().double() * val[-r:]) @ vec[:, -r:].half().double().t() - x).norm()
                      / x.norm()) for (val, vec), r, x in zip(full, ranks, exact)]
        del full
        emit({"what": "fp16_rounding_of_exact_gram_part", "rel": fp16})
    for variant in variants:
        blk, first, streams = (int(x) for x in variant.split(":"))
        checks: list[int] = []
        ritz, krylov_runs = lorc._ritz_pairs, []

        def count(Qt, GQt, r, ritz=ritz, checks=checks):
            checks.append(Qt.shape[0])
            return ritz(Qt, GQt, r)

        def variant_run(g, r, *_, blk=blk, first=first, **kw):
            krylov_runs.append(krylov(g, r, block=blk or None, first_check=first or None, **kw))
            return krylov_runs[-1]

        saved = lorc._EIGH_STREAMS
        lorc._ritz_pairs, lorc.top_eigenpairs_krylov_batched, lorc._EIGH_STREAMS = count, variant_run, bool(streams)
        try:
            seconds, pairs_v = timed(lambda: lorc._top_eigenpairs_many(whitened, ranks), sync, a.repeat)
        finally:
            lorc._ritz_pairs, lorc.top_eigenpairs_krylov_batched, lorc._EIGH_STREAMS = ritz, krylov, saved
        last = krylov_runs[-1]
        products = [(vec * val) @ vec.t() for val, vec in pairs_v]
        emit({"what": "krylov_variant", "block": blk or max(2 * a.rank, 8), "first_check": first or "default",
              "eigh_streams": bool(streams), "eigenpairs_s": round(seconds, 4),
              "ritz_eighs_per_call": sum(checks) // (a.repeat + 1), "krylov_dims": [r.dim for r in last],
              "converged": [r.converged for r in last],
              "gram_part_rel_err_vs_exact": [float((x - y).norm() / y.norm()) for x, y in zip(products, exact)]})

    # the Rayleigh-Ritz eigensolve alone
    for d in (int(s) for s in a.eigh_sizes.split(",")):
        A = torch.randn(d, d, dtype=torch.float64, device=dev, generator=torch.Generator(device=dev).manual_seed(d))
        A = A @ A.t()
        row = {"what": "ritz_eigh", "d": d}
        row["fp64_s"] = round(timed(lambda: torch.linalg.eigh(A), sync, a.repeat)[0], 5)
        row["fp32_s"] = round(timed(lambda: torch.linalg.eigh(A.float()), sync, a.repeat)[0], 5)
        batch = A.expand(6, d, d).contiguous()
        row["fp64_batch6_s"] = round(timed(lambda: torch.linalg.eigh(batch), sync, a.repeat)[0], 5)
        if cuda:
            row["cpu_fp64_s"] = round(timed(lambda: torch.linalg.eigh(A.cpu()), sync, a.repeat)[0], 5)
            row["cpu_threads"] = torch.get_num_threads()
        emit(row)


if __name__ == "__main__":
    main()
