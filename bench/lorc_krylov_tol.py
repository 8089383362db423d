"""How loose may LoRC's block-Krylov residual be (issue 22)? Space size, time and factor error against the exact
eigh, per tolerance, on the OPT-6.7B linear shapes' flat quantization errors.

    OUT=DIR python bench/lorc_krylov_tol.py [--device cpu --shapes 4096x4096 --tols 1e-8,1e-6,1e-4,1e-3]

LoRC stores its factors in fp16 (``--lorc-bits 16``) or fewer bits, so the factors need no more accuracy than fp16
rounding leaves. For each tolerance: the Krylov space size (``dim``, device-independent: the time on a GPU scales
with it), the wall time here, whether it converged, and the error of the rank-``m`` product ``U V`` against the
exact (full-eigh) one, next to the error that rounding the exact factors to fp16 makes. The Frobenius error of
``E - U V`` (the energy LoRC removes) is compared too. Random weights (RTN int4 g128, no outliers: the flat
spectrum, the slow case): accuracy and space size only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench_lorc_svd import eigh_path, error_matrix
from ptqlab.methods import lorc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="4096x4096", help="OUTxIN,...")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tols", default="1e-8,1e-6,1e-4,1e-3")
    p.add_argument("--blocks", default="0", help="Krylov block widths to try (0: the default, 2 rank)")
    a = p.parse_args()
    sink = Path(os.environ["OUT"]) / "lorc_krylov_tol.jsonl" if os.environ.get("OUT") else None
    name = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    for shape in a.shapes.split(","):
        out_f, in_f = (int(s) for s in shape.split("x"))
        E = error_matrix(out_f, in_f, torch.Generator().manual_seed(0), outliers=False, device=a.device).double()
        u0, v0 = eigh_path(E, a.rank)
        ref = u0 @ v0
        ref_err = float((E - ref).norm())
        fp16_err = float((u0.half().double() @ v0.half().double() - ref).norm() / ref.norm())
        gram = E.t() @ E if out_f >= in_f else E @ E.t()
        solver = lorc.top_eigenpairs_krylov
        sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
        solver(gram, a.rank)  # first-call setup (cuSOLVER/cuBLAS handles) outside the timings
        for block, tol in ((int(b) or None, float(t)) for b in a.blocks.split(",") for t in a.tols.split(",")):
            sync()
            t0 = time.perf_counter()
            info = solver(gram, a.rank, tol=tol, block=block)
            sync()
            seconds = time.perf_counter() - t0
            # LoRC's own path at this tolerance (it reads the module's solver; the default tol is bound at import)
            batched = lorc.top_eigenpairs_krylov_batched
            # (the library passes its own tol by keyword: this one replaces it)
            lorc.top_eigenpairs_krylov_batched = lambda g, r, *_, t=tol, b=block, **__: batched(g, r, tol=t, block=b)
            try:
                sync()
                t1 = time.perf_counter()
                u1, v1 = lorc.top_singular_factors(E.float() if a.device == "cuda" else E, a.rank)
                sync()
                factors_s = time.perf_counter() - t1
                u1, v1 = u1.double(), v1.double()
            finally:
                lorc.top_eigenpairs_krylov_batched = batched
            got = u1 @ v1
            row = {"shape": [out_f, in_f], "rank": a.rank, "tol": tol, "block": block or max(2 * a.rank, 8),
                   "device": name, "krylov_dim": info.dim, "converged": info.converged, "residual": info.residual,
                   "krylov_s": round(seconds, 4), "top_singular_factors_s": round(factors_s, 4),
                   "product_rel_err_vs_exact": float((got - ref).norm() / ref.norm()),
                   "fp16_rounding_rel_err_of_exact": fp16_err,
                   "frob_err_rel_diff": (float((E - got).norm()) - ref_err) / ref_err, "torch": torch.__version__}
            print(json.dumps(row), flush=True)
            if sink is not None:
                with sink.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
