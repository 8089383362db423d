"""Perplexity of the testbed models under each method, on full splits (run on the GPU).

    python bench/quality_testbed.py --out quality.jsonl [--models testbed-opt,testbed-bloom] [--set main|zq]

``--set main``: FP16, RTN, GPTQ (+act-order), LoRC (plain and activation-aware), W4A8;
``--set lorc``: only the LoRC runs of the main set;
``--set zq-global``: ZQ-Global steps x lr on each model;
``--set zq``: the ZeroQuant-Local/Global learning-rate and step sweep that chose their defaults.
One JSON record per run (the same records as ``ptqlab run --output``).
"""

from __future__ import annotations

import argparse
import json
import sys

from ptqlab import QuantConfig, QuantSpec, ZQOptions
from ptqlab.experiment import ModelSession, RunSpec, run
from ptqlab.testbed import CALIBRATION_TEXT


def main_set() -> list[QuantConfig]:
    w4, w3, w8 = QuantSpec(4, True, 128), QuantSpec(3, True, 128), QuantSpec(8)
    a8 = QuantSpec(8)
    return [
        QuantConfig("fp16"),
        QuantConfig("rtn", w8), QuantConfig("rtn", w4), QuantConfig("rtn", w3), QuantConfig("rtn", QuantSpec(4)),
        QuantConfig("gptq", w4), QuantConfig("gptq", w3), QuantConfig("gptq", QuantSpec(4)),
        QuantConfig("gptq", w3, options={"gptq": __import__("ptqlab").GPTQOptions(act_order=True)}),
        QuantConfig("rtn", w3, lorc_rank=8), QuantConfig("rtn", w3, lorc_rank=8, lorc_aware=True),
        QuantConfig("gptq", w3, lorc_rank=8), QuantConfig("gptq", w3, lorc_rank=8, lorc_aware=True),
        QuantConfig("gptq", w4, lorc_rank=8), QuantConfig("gptq", w4, lorc_rank=8, lorc_aware=True),
        QuantConfig("rtn", w4, act=a8), QuantConfig("gptq", w4, act=a8), QuantConfig("gptq", w4, act=a8, lorc_rank=8),
        QuantConfig("zq-local", w3), QuantConfig("zq-global", w3), QuantConfig("zq-local", w4),
        QuantConfig("zq-global", w4),
    ]


def lorc_set() -> list[QuantConfig]:
    """The LoRC rows of the main set (rechecks LoRC after a change to its solver)."""
    return [c for c in main_set() if c.lorc_rank]


def zq_set() -> list[QuantConfig]:
    w3 = QuantSpec(3, True, 128)
    out = []
    for lr in (3e-4, 1e-3, 3e-3, 1e-2):
        for steps in (100, 300):
            out.append(QuantConfig("zq-local", w3, options={"zq": ZQOptions(steps=steps, lr=lr)}))
    for lr in (1e-4, 3e-4, 1e-3, 3e-3):
        for steps in (50, 200):
            out.append(QuantConfig("zq-global", w3, options={"zq": ZQOptions(steps=steps, lr=lr)}))
    return out


def zq_global_set() -> list[QuantConfig]:
    """ZQ-Global steps x learning rate at W3 g128 (checks that its defaults carry over across models)."""
    w3 = QuantSpec(3, True, 128)
    return [QuantConfig("zq-global", w3, options={"zq": ZQOptions(steps=steps, lr=lr)})
            for lr in (3e-4, 1e-3, 3e-3) for steps in (50, 100, 200)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="testbed-opt,testbed-bloom")
    p.add_argument("--set", choices=["main", "lorc", "zq", "zq-global"], default="main")
    p.add_argument("--eval", default="wikitext2,ptb,heldout")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    configs = {"main": main_set, "lorc": lorc_set, "zq": zq_set, "zq-global": zq_global_set}[a.set]()
    for model in a.models.split(","):
        session = ModelSession(model, a.device, "auto", a.data_dir, progress=False)
        for config in configs:
            spec = RunSpec(model=model, config=config, eval=tuple(a.eval.split(",")), calib=str(CALIBRATION_TEXT),
                           nsamples=128)
            record = run(spec, session, progress=False)
            record.pop("layers")
            line = json.dumps(record)
            print(json.dumps({"model": model, "name": record["name"], "zq": config.zq.__dict__ if "zq" in config.method else None,
                              "ppl": {k: round(v, 3) for k, v in record["ppl"].items()},
                              "bpw": round(record["bits_per_weight"], 3), "quant_s": round(record["timings"]["quantize"], 2)}),
                  flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
