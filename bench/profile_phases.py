"""Where quantize_model's time goes, per phase and per block (random weights: timing only).

    # CPU, an OPT-like shape (the table in bench/README.md, issue 22):
    python bench/profile_phases.py --hidden 768 --ffn 3072 --heads 12 --nsamples 32 --seqlen 256 --device cpu
    # an H200, the OPT-6.7B block shape (2 blocks; add --out $OUT for a JSONL row):
    python bench/profile_phases.py --hidden 4096 --ffn 16384 --heads 32 --nsamples 128 --seqlen 2048

Prints the wall time of ``quantize_model`` beside the sum of its report's phases (they should agree: the phases
cover the whole call, "other" is what no phase names) and, with ``--cprofile N``, the N functions with the most
cumulative time. On a GPU, ``--move-probe`` also times moving one block between host and device the ways the
pipeline could: ``block.to`` both ways (what it does: fresh pageable host memory on the way back), copying back
into the block's existing host tensors, and through pinned memory.
"""

from __future__ import annotations

import argparse
import cProfile
import copy
import json
import pstats
import sys
import time
from pathlib import Path

import torch

from ptqlab import QuantConfig, QuantSpec
from ptqlab.pipeline import quantize_model


def build(hidden: int, ffn: int, heads: int, layers: int, vocab: int, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, OPTConfig

    cfg = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                    vocab_size=vocab, max_position_embeddings=2048, word_embed_proj_dim=hidden)
    torch.manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.cpu().eval().requires_grad_(False)
    model.config.use_cache = False
    return model


def _sync_time(fn, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def move_probe(block: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """Seconds to move ``block`` (in host memory) to ``device`` and back, several ways (best of 3 each)."""
    host = {n: t.data for n, t in block.state_dict(keep_vars=True).items()}
    nbytes = sum(t.numel() * t.element_size() for t in host.values())
    out: dict[str, float] = {"block_bytes": nbytes}
    for _ in range(3):
        dev = {}
        times = {
            "to_device_pageable_s": _sync_time(lambda: dev.update({n: t.to(device) for n, t in host.items()}), device),
            "to_host_fresh_pageable_s": _sync_time(lambda: [t.to("cpu") for t in dev.values()], device),
            "to_host_existing_pageable_s": _sync_time(lambda: [host[n].copy_(t) for n, t in dev.items()], device),
        }
        pinned = {n: torch.empty_like(t).pin_memory() for n, t in host.items()}
        times["to_host_existing_pinned_s"] = _sync_time(
            lambda: [pinned[n].copy_(t, non_blocking=True) for n, t in dev.items()], device)
        times["to_device_pinned_s"] = _sync_time(
            lambda: [t.copy_(pinned[n], non_blocking=True) for n, t in dev.items()], device)
        for k, v in times.items():
            out[k] = round(min(out.get(k, v), v), 5)
        del dev, pinned
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1, help="runs (the first on a GPU is a warm-up and not reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cprofile", type=int, default=0, help="print this many functions by cumulative time")
    p.add_argument("--move-probe", action="store_true", help="also time host <-> device moves of one block (GPU)")
    p.add_argument("--out", default=None, help="folder: profile_phases.jsonl gets one row per run")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = build(a.hidden, a.ffn, a.heads, a.layers, a.vocab, device)
    calib = torch.randint(0, a.vocab, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(method="gptq", weight=QuantSpec(4, True, 128))
    runs = a.repeat + (1 if device.type == "cuda" else 0)
    for run in range(runs):
        m = copy.deepcopy(model)
        prof = cProfile.Profile() if a.cprofile and run == runs - 1 else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if prof:
            prof.enable()
        report = quantize_model(m, config, calib, device, progress=False, batch_size=a.calib_batch)
        if prof:
            prof.disable()
        wall = time.perf_counter() - start
        if device.type == "cuda" and run == 0:
            continue
        phases = {k: round(v, 4) for k, v in report.timings.items()}
        row = {"hidden": a.hidden, "ffn": a.ffn, "layers": a.layers, "nsamples": a.nsamples, "seqlen": a.seqlen,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "wall_s": round(wall, 4), "phases_sum_s": round(sum(report.timings.values()), 4), "phases_s": phases,
               "per_block_s": {k: round(v / a.layers, 4) for k, v in phases.items() if k != "capture"}}
        print(json.dumps(row))
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            with open(Path(a.out) / "profile_phases.jsonl", "a", encoding="utf-8") as sink:
                sink.write(json.dumps(row) + "\n")
        if prof:
            pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(a.cprofile)
    if a.move_probe and device.type == "cuda":
        from ptqlab.models import get_adapter

        row = {"hidden": a.hidden, "ffn": a.ffn, "move_probe": move_probe(get_adapter(model).blocks[0], device)}
        print(json.dumps(row))
        if a.out:
            with open(Path(a.out) / "profile_phases.jsonl", "a", encoding="utf-8") as sink:
                sink.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
