"""Integers against FP8, MXFP4 and NVFP4 on the testbed family (run on one GPU; ~5 minutes on an H200).

    OUT=bench/results python bench/formats.py --out $OUT/formats_h200.jsonl [--models ...] [--eval heldout]

Per model: FP16; W8A8 INT8 (per channel / per token) against FP8 (E4M3, per channel / per token); W4A16 INT4 g128
against MXFP4 (g32, E8M0 scales) and NVFP4 (g16, E4M3 scales + fp32 per tensor); W4A4 NVFP4 without and with the
rotation transform (``--transform rotate``), each with RTN and GPTQ. Models: testbed-opt,
testbed-bloom, their -2m members and the ~25M/~60M members where they are built in $PTQLAB_TESTBED_CACHE (absent
ones are skipped with a line saying so). One JSON line per run: the model, the run's name, its flat config, held-out
PPL, bits per weight (the paper's count, every scale included) and stored bits per weight (bytes on disk), times.
``--quick`` is the CPU check of the script itself (one tiny config, a prefix of the evaluation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ptqlab.config import from_flat
from ptqlab.experiment import ModelSession, run
from ptqlab.testbed import is_testbed_model, resolve_model_path

MODELS = ["testbed-opt-2m", "testbed-bloom-2m", "testbed-opt", "testbed-bloom", "testbed-opt-25m",
          "testbed-bloom-25m", "testbed-opt-60m", "testbed-bloom-60m"]

# (label, flat options); every row but fp16 runs with RTN and with GPTQ
PRECISIONS = [
    ("W8A8 int8", {"wbits": 8, "abits": 8}),
    ("W8A8 fp8", {"wfmt": "fp8", "afmt": "fp8"}),
    ("W4A16 int4 g128", {"wbits": 4, "wgroup": 128}),
    ("W4A16 mxfp4", {"wfmt": "mxfp4"}),
    ("W4A16 nvfp4", {"wfmt": "nvfp4"}),
    ("W4A4 nvfp4 (no rotation)", {"wfmt": "nvfp4", "afmt": "nvfp4"}),
    ("W4A4 nvfp4 + rotation", {"wfmt": "nvfp4", "afmt": "nvfp4", "transform": "rotate"}),
]


def cells(quick: bool) -> list[tuple[str, dict]]:
    if quick:
        return [("FP16", {"method": "fp16"}), ("W4A16 nvfp4", {"method": "gptq", "wfmt": "nvfp4"})]
    out = [("FP16", {"method": "fp16"})]
    for label, flat in PRECISIONS:
        out += [(label, {"method": method, **flat}) for method in ("rtn", "gptq")]
    return out


def available(model: str) -> bool:
    try:
        resolve_model_path(model)
    except FileNotFoundError:
        return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--eval", default="heldout")
    p.add_argument("--device", default="cuda")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-eval-windows", type=int, default=None)
    p.add_argument("--out", default=None, help="append the JSON lines here too")
    p.add_argument("--quick", action="store_true", help="CPU check: one tiny config, 4 windows")
    a = p.parse_args()
    if a.quick:
        a.nsamples, a.seqlen, a.max_eval_windows = 4, 64, a.max_eval_windows or 4
    sink = open(a.out, "a") if a.out else None
    start = time.perf_counter()
    for model in a.models.split(","):
        if not is_testbed_model(model):
            print(json.dumps({"model": model, "skipped": "not a testbed family member"}), flush=True)
            continue
        if not available(model):
            print(json.dumps({"model": model, "skipped": "not built in $PTQLAB_TESTBED_CACHE"}), flush=True)
            continue
        session = ModelSession(model, a.device, "auto", progress=False)
        for label, flat in cells(a.quick):
            spec = from_flat({"model": model, "eval": a.eval, "seqlen": a.seqlen, "nsamples": a.nsamples,
                              "calib": "testbed", "max_eval_windows": a.max_eval_windows, **flat})
            record = run(spec, session, progress=False)
            row = {"model": model, "precision": label, "method": flat["method"], "name": record["name"],
                   "config": record["config"], "ppl": record["ppl"], "bits_per_weight": record["bits_per_weight"],
                   "stored_bits_per_weight": record["stored_bits_per_weight"],
                   "quantize_s": record["timings"]["quantize"], "time_s": record["time_s"],
                   "device": record["versions"]["device"], "versions": record["versions"]}
            line = json.dumps(row)
            print(line, flush=True)
            if sink:
                sink.write(line + "\n")
                sink.flush()
    print(json.dumps({"total_s": time.perf_counter() - start}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
