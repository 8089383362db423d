"""ZQ-Local and ZQ-Global on the testbed models: eager steps against one captured CUDA graph replayed per step
(issue 22: the 82-run methods recipe spends most of its time in these loops, which at the testbed's sizes are
kernel launches and Python, not GPU work).

    python bench/bench_zq_graphs.py --out $OUT/zq_graphs.jsonl

Per model, method and precision: ``quantize_model``'s wall time and its solve phase with ``PTQLAB_ZQ_GRAPHS=0``
(eager) and with the graphs (the default on CUDA), interleaved, after one untimed warm-up run of each (Triton
and cuBLAS set-up; once per model and method), with the methods recipe's settings (128 windows of 512 tokens of the testbed calibration
text, 100 steps, batch 8), and the fraction of quantized weights the two agree on, next to the fraction two eager runs agree on.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

from kernel_common import emit, open_output
from ptqlab import QuantConfig, QuantSpec
from ptqlab.data import calibration_windows
from ptqlab.models import QuantLinear, load_model
from ptqlab.pipeline import quantize_model


def _run(model, calib, config, graphs: bool) -> tuple[float, float, dict]:
    os.environ["PTQLAB_ZQ_GRAPHS"] = "1" if graphs else "0"
    m = copy.deepcopy(model)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    report = quantize_model(m, config, calib, "cuda", progress=False, batch_size=8)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    weights = {n: mod.weight.detach().float().cpu() for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
    return wall, report.timings.get("solve", 0.0), weights


def _equal_fraction(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(int((a[k] == b[k]).sum()) for k in a) / sum(w.numel() for w in a.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="testbed-opt")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each mode (the minimum is kept)")
    ap.add_argument("--methods", default="zq-local,zq-global")
    ap.add_argument("--precisions", default="4:16:128,4:8:0", help="wbits:abits:wgroup,...")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_zq_graphs.py needs a CUDA GPU", file=sys.stderr)
        return 2
    open_output(a.out)
    for name in a.models.split(","):
        model, tokenizer = load_model(name, dtype=torch.float16)
        calib, _ = calibration_windows(tokenizer, "testbed", a.nsamples, a.seqlen, seed=0)
        for method in a.methods.split(","):
            for i, prec in enumerate(a.precisions.split(",")):
                wbits, abits, group = (int(v) for v in prec.split(":"))
                config = QuantConfig(method=method, weight=QuantSpec(wbits, True, group), act=QuantSpec(abits, True, 0))
                if i == 0:  # warm-up of both modes, once per model and method
                    for graphs in (False, True):
                        _run(model, calib, config, graphs)
                times = {False: [], True: []}
                weights = {}
                for _ in range(a.repeats):
                    for graphs in (False, True):
                        wall, solve, weights[graphs] = _run(model, calib, config, graphs)
                        times[graphs].append((wall, solve))
                _, _, eager_again = _run(model, calib, config, False)  # is the eager loop itself repeatable?
                eager, graphed = min(times[False]), min(times[True])
                emit({"model": name, "method": method, "wbits": wbits, "abits": abits, "wgroup": group,
                      "nsamples": a.nsamples, "seqlen": a.seqlen, "eager_s": round(eager[0], 3),
                      "eager_solve_s": round(eager[1], 3), "graphed_s": round(graphed[0], 3),
                      "graphed_solve_s": round(graphed[1], 3), "speedup": round(eager[0] / graphed[0], 2),
                      "weights_equal_fraction": _equal_fraction(weights[False], weights[True]),
                      "eager_rerun_equal_fraction": _equal_fraction(weights[False], eager_again),
                      "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
