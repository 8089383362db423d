#!/usr/bin/env python3
"""Training throughput of family members on this GPU, eager and under ``torch.compile`` (random tokens).

Sizes the time budgets of ``train_family.py`` and decides whether ``--compile`` pays for its compile time:

    python scripts/testbed/probe_train_speed.py --members opt-25m,opt-60m,bloom-25m,bloom-60m --steps 20

One JSON line per (member, mode): tokens/s over the timed steps and the seconds the first steps took
(for ``compile``, the compilation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ptqlab.testbed import FAMILY  # noqa: E402


def probe(arch: str, size: str, compiled: bool, steps: int, batch: int, seq: int) -> dict:
    from train import build_model, train_step

    m = FAMILY[f"testbed-{arch}" if size == "7m" else f"testbed-{arch}-{size}"]
    torch.manual_seed(0)
    model = build_model(arch, 8192, seq, 0.0, 1, 0, m.hidden, m.layers, m.heads, m.ffn).cuda().train()
    fwd = torch.compile(model) if compiled else model
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = torch.randint(3, 8192, (batch * 4, seq + 1), device="cuda")

    def one(i: int) -> None:  # train.py's step: bf16 autocast, fp32 loss, clip 1.0, fused AdamW
        train_step(fwd, model, optim, data[(i % 4) * batch:(i % 4 + 1) * batch], torch.device("cuda"), True, 1.0)

    t0 = time.perf_counter()
    for i in range(3):
        one(i)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        one(i)
    torch.cuda.synchronize()
    el = time.perf_counter() - t0
    row = {"member": f"{arch}-{size}", "mode": "compile" if compiled else "eager", "batch": batch, "seq": seq,
           "tok_s": round(steps * batch * seq / el), "ms_per_step": round(1e3 * el / steps, 1),
           "first_3_steps_s": round(first, 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
           "device": torch.cuda.get_device_name()}
    del model, fwd, optim
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", default="opt-25m,opt-60m,bloom-25m,bloom-60m")
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    out = open(args.out, "a") if args.out else None
    for member in args.members.split(","):
        arch, size = member.split("-")
        for mode in args.modes.split(","):
            try:
                row = probe(arch, size, mode == "compile", args.steps, args.batch_size, args.seq_len)
            except Exception as err:  # a compile failure is a finding, not the end of the probe
                row = {"member": member, "mode": mode, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
