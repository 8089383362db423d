"""Write ptqlab/testbed/reference_ppl.json: the FP16 perplexities that MODEL_CARD.md states and CI reproduces.

    python scripts/testbed/reference_ppl.py --data-dir ../shared/data [--full-records bench/results/quality_main.jsonl]

``prefix``: measured here, on the CPU in float32, on the first PREFIX_WINDOWS windows of 512 tokens of each split
(what tests/test_testbed.py re-measures). ``full``: the full splits, taken from GPU records of
``bench/quality_testbed.py`` (fp16 on an H100) when given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ptqlab import QuantConfig
from ptqlab.experiment import ModelSession, RunSpec, run
from ptqlab.testbed import TESTBED_DIR

PREFIX_WINDOWS = 32
DATASETS = ("wikitext2", "ptb", "heldout")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.add_argument("--full-records", default=None)
    p.add_argument("--models", default="testbed-opt,testbed-bloom",
                   help="comma-separated; entries of other models already in the file are kept")
    a = p.parse_args()
    path = TESTBED_DIR / "reference_ppl.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    for model in a.models.split(","):
        session = ModelSession(model, "cpu", "float32", a.data_dir, progress=False)
        record = run(RunSpec(model=model, config=QuantConfig("fp16"), eval=DATASETS, seqlen=512,
                             max_eval_windows=PREFIX_WINDOWS, dtype="float32"), session, progress=False)
        out[model] = {"prefix": {"windows": PREFIX_WINDOWS, "seqlen": 512, "dtype": "float32", "device": "cpu",
                                 "ppl": {k: round(v, 4) for k, v in record["ppl"].items()},
                                 "sources": record["data_sources"]}}
        if a.full_records:
            for line in Path(a.full_records).read_text().splitlines():
                r = json.loads(line)
                cfg = r["config"]
                method = cfg["method"] if "method" in cfg else cfg["config"]["method"]  # flat, or before issue 12
                if cfg["model"] == model and method == "fp16":
                    out[model]["full"] = {"seqlen": r["config"]["seqlen"], "dtype": r["config"]["dtype"],
                                          "device": r["versions"]["device"],
                                          "ppl": {k: round(v, 3) for k, v in r["ppl"].items()}}
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
