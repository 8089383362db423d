"""Peak host memory of a study of N runs on one model: the session holds the model once.

    python bench/bench_session_memory.py --shape opt-1.3b --out /tmp/opt13b [--python OTHER_PYTHONPATH]

Writes a random-weight model of the given OPT shape (safetensors, fp32) once, then runs
``ptqlab study --grid "method=rtn wbits=8,4"`` (2 runs + the automatic FP16 baseline = 3 runs, one
evaluation window of 128 tokens) in a child process and reports the peak, over its process tree, of
its anonymous resident memory (``RssAnon``: what a second copy of the model costs) and of its whole
resident set (``ru_maxrss``, which also counts the memory-mapped checkpoint pages the page cache can
drop). ``--pythonpath`` runs another checkout of ptqlab (e.g. the one before the change).
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


def make_model(shape: str, out: Path, dtype: str) -> None:
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
    OPTForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(out)


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:  # the process ended between listing and reading
        pass
    return 0


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (the study spawns its worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="opt-1.3b", choices=SHAPES)
    p.add_argument("--out", default=None, help="model folder (default /tmp/ptqlab-bench-<shape>-<dtype>)")
    p.add_argument("--pythonpath", default=None, help="import ptqlab from this checkout instead")
    p.add_argument("--data-dir", default=os.environ.get("PTQLAB_DATA"))
    p.add_argument("--label", default="current")
    p.add_argument("--checkpoint-dtype", default="float16", choices=["float16", "float32"],
                   help="float16 as on the hub: loading it in float32 on the CPU makes the weights anonymous "
                        "memory; a float32 file is memory-mapped as it is")
    a = p.parse_args()
    out = Path(a.out or f"/tmp/ptqlab-bench-{a.shape}-{a.checkpoint_dtype}")
    make_model(a.shape, out, a.checkpoint_dtype)
    db = Path(f"/tmp/bench_mem_{a.label}.db")
    db.unlink(missing_ok=True)
    env = dict(os.environ)
    if a.pythonpath:
        env["PYTHONPATH"] = a.pythonpath
    cmd = [sys.executable, "-c", "import sys; from ptqlab.cli import main; sys.exit(main())", "study", "--grid",
           "method=rtn wbits=8,4", "--model", str(out), "--db", str(db), "--set", "eval=ptb", "--set", "seqlen=128",
           "--set", "max_eval_windows=1", "--device", "cpu", "--data-dir", a.data_dir]
    t0 = time.perf_counter()
    # run from the model folder: with ``python -c`` the current directory comes first on sys.path, and a
    # checkout there would shadow --pythonpath
    child = subprocess.Popen(cmd, env=env, cwd=out)
    peak_anon = 0
    while child.poll() is None:
        peak_anon = max(peak_anon, sum(_status_kib(pid, "RssAnon") for pid in _tree(child.pid)))
        time.sleep(0.05)
    if child.returncode:
        raise SystemExit(f"the study failed (exit {child.returncode})")
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    weights_gib = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**30
    print(json.dumps({"label": a.label, "shape": a.shape, "runs": 3, "checkpoint_dtype": a.checkpoint_dtype,
                      "checkpoint_gib": round(weights_gib, 2), "loaded_as": "float32",
                      "peak_rss_gib": round(peak_gib, 2), "peak_anon_gib": round(peak_anon / 2**20, 2), "wall_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
