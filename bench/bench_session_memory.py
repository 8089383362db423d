"""Peak host memory of a study of N runs on one model: the session holds the model once.

    python bench/bench_session_memory.py --shape opt-1.3b --out /tmp/opt13b [--python OTHER_PYTHONPATH]

Writes a random-weight model of the given OPT shape (safetensors, fp32) once, then runs
``ptqlab study --grid "method=rtn wbits=8,4"`` (2 runs + the automatic FP16 baseline = 3 runs, one
evaluation window of 128 tokens) in a child process and reports its peak RSS (``ru_maxrss`` of the
children). ``--pythonpath`` runs another checkout of ptqlab (e.g. the one before the change).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"opt-125m": (768, 12, 12, 3072), "opt-350m": (1024, 24, 16, 4096), "opt-1.3b": (2048, 24, 32, 8192)}


def make_model(shape: str, out: Path) -> None:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from ptqlab.tiny import make_tiny

    if (out / "config.json").exists():
        return
    hidden, layers, heads, ffn = SHAPES[shape]
    make_tiny("opt", out)  # tokenizer files (bytes-level), replaced model below
    config = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                       word_embed_proj_dim=hidden, max_position_embeddings=2048,
                       vocab_size=OPTConfig.from_pretrained(out).vocab_size)
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="opt-1.3b", choices=SHAPES)
    p.add_argument("--out", default="/tmp/ptqlab-bench-model")
    p.add_argument("--pythonpath", default=None, help="import ptqlab from this checkout instead")
    p.add_argument("--data-dir", default=os.environ.get("PTQLAB_DATA"))
    p.add_argument("--label", default="current")
    a = p.parse_args()
    out = Path(a.out)
    make_model(a.shape, out)
    db = Path(f"/tmp/bench_mem_{a.label}.db")
    db.unlink(missing_ok=True)
    env = dict(os.environ)
    if a.pythonpath:
        env["PYTHONPATH"] = a.pythonpath
    cmd = [sys.executable, "-c", "import sys; from ptqlab.cli import main; sys.exit(main())", "study", "--grid",
           "method=rtn wbits=8,4", "--model", str(out), "--db", str(db), "--set", "eval=ptb", "--set", "seqlen=128",
           "--set", "max_eval_windows=1", "--device", "cpu", "--data-dir", a.data_dir]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    weights_gib = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**30
    print(json.dumps({"label": a.label, "shape": a.shape, "runs": 3, "weights_gib_fp32": round(weights_gib, 2),
                      "peak_rss_gib": round(peak_gib, 2), "wall_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
