#!/usr/bin/env python3
"""Train members of the testbed family (ptqlab.testbed.FAMILY) on one GPU.

Each size is ``train.py`` with the member's shape, peak learning rate and time budget, on the
family's token files (``tokenize_family.py``): early stopping on the base held-out set (the one
the shipped ~7M models were selected on), the extra packages' held-out loss reported at the end.
A member is written to a temporary folder and renamed into place when complete:
shipped sizes (~2M) to ``--out`` (default: a folder per member under the cache), the others to
``$PTQLAB_TESTBED_CACHE/<arch>-<size>`` (default ``~/.cache/ptqlab/testbed``), where
``--model testbed-opt-25m`` finds them.

Usage (GPU, minutes):
  python scripts/testbed/train_family.py --arch opt,bloom --sizes 25m,60m
  python scripts/testbed/train_family.py --arch opt --sizes 2m --out ptqlab/testbed --no-compile   # the shipped ~2M member
  python scripts/testbed/train_family.py --arch llama --sizes 2m,7m --out ptqlab/testbed           # shipped Llama members
The ~7M OPT/BLOOM members are the shipped testbed-opt / testbed-bloom (scripts/testbed/README.md, steps 1-5);
every Llama size, the ~7M one included, is trained here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ptqlab.testbed import FAMILY, cache_dir  # noqa: E402


def train_member(arch: str, size: str, data: Path, out_root: Path | None, log_dir: Path,
                 time_scale: float, extra: list[str]) -> Path:
    import train

    member = FAMILY.get(f"testbed-{arch}" if size == "7m" else f"testbed-{arch}-{size}")
    if member is None or member.time_budget_s == 0:
        trainable = sorted(f"{m.arch}-{m.size}" for m in FAMILY.values() if m.time_budget_s > 0)
        raise SystemExit(f"no trainable family member '{arch}-{size}' (trainable: {', '.join(trainable)}; "
                         "testbed-opt / testbed-bloom are the shipped ~7M models of steps 1-5)")
    name = member.name
    folder = member.folder or f"{arch}-{size}"
    dest = (out_root / folder) if out_root else member.path()
    if out_root is None and member.shipped:
        dest = cache_dir() / f"{arch}-{size}"
    tmp = dest.with_name(dest.name + ".partial")
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = ["--arch", arch, "--data", str(data), "--out", str(tmp),
            "--log", str(log_dir / f"{arch}-{size}_train_log.jsonl"),
            "--hidden", str(member.hidden), "--layers", str(member.layers), "--heads", str(member.heads),
            "--ffn", str(member.ffn), "--kv-heads", str(member.key_value_heads), "--lr", str(member.lr), "--dropout", str(member.dropout),
            "--time-budget", str(member.time_budget_s * time_scale), "--batch-size", "128",
            "--extra-heldout", str(data / "heldout_extra.bin"), *extra]
    check_params(member)
    print(f"== {name}: train.py {' '.join(argv)}", flush=True)
    rc = train.main(argv)
    if rc != 0:
        raise SystemExit(f"training {name} failed (exit {rc})")
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    print(f"== {name} -> {dest}", flush=True)
    return dest


def check_params(member) -> None:
    """Refuse to train a member whose built architecture does not have the parameter count FAMILY states."""
    import torch
    import train

    with torch.device("meta"):
        model = train.build_model(member.arch, 8192, 512, member.dropout, 1, 0, member.hidden, member.layers,
                                  member.heads, member.ffn, member.key_value_heads)
    got = train.count_params(model)["total_unique"]
    if got != member.params:
        raise SystemExit(f"{member.name}: the architecture has {got:,} parameters, FAMILY says {member.params:,}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="opt,bloom", help="comma-separated: opt, bloom, llama")
    ap.add_argument("--sizes", default="25m,60m", help="comma-separated sizes, e.g. 2m,25m,60m")
    ap.add_argument("--data", type=Path, default=ROOT / "scripts/testbed/build/family",
                    help="the family's token files (tokenize_family.py)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write <arch>-<size> folders here instead of the cache (e.g. ptqlab/testbed for 2m)")
    ap.add_argument("--log-dir", type=Path, default=ROOT / "runs/testbed_family")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="multiply every member's time budget (seconds of training on one GPU to itself)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile the model (default on: 2.2-2.4x the tokens/s for BLOOM, whose attention "
                         "is eager in transformers; 1.3x for OPT-25M, even for OPT-60M; "
                         "scripts/testbed/probe_train_speed.py measures it)")
    ap.add_argument("train_args", nargs="*", help="extra train.py options after --")
    args = ap.parse_args(argv)
    for arch in args.arch.split(","):
        for size in args.sizes.split(","):
            train_member(arch.strip(), size.strip(), args.data, args.out, args.log_dir, args.time_scale,
                         (["--compile"] if args.compile else []) + args.train_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
