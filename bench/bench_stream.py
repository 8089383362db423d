"""Host memory of streamed quantization (``ptqlab run --stream --save``) against the size of the checkpoint.

    # on an H200, one command (JSONL in $OUT; the random checkpoint is written to a temp folder and removed):
    PTQLAB_DATA=/path/to/data python bench/bench_stream.py --shape opt-6.7b --method gptq --out $OUT --budget-s 150
    # a tiny shape on the CPU (what the CI test runs):
    python bench/bench_stream.py --shape tiny-opt --method rtn --eval heldout --nsamples 4 --seqlen 32 --device cpu \\
        --out /tmp/s

A random-weight fp16 checkpoint of a full shape of ``bench_scale.SHAPES`` (every decoder block; weights
N(0, 0.02), norms 1, biases 0: memory and time only, its perplexity means nothing) is written as the hub lays out
sharded checkpoints: ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, config.json and the
testbed-opt tokenizer (its ids are < 8192: they index any OPT or Llama vocab). Each tensor is generated on
``--device`` and written on its own (``ptqlab.streaming.write_safetensors``), so the writer holds one tensor in
host memory, never the model. Then ptqlab's own CLI (``ptqlab.cli.main``, in this process) quantizes it with
``--stream --save``, while the process's RSS (and its anonymous and file-backed parts, /proc/self/status) and the
used bytes of the save folder's filesystem are sampled every 20 ms. One row per (shape, method) in stream.jsonl:
write time, checkpoint bytes in and out, peak host RSS against the checkpoint, peak GPU memory, wall time, disk
high-water mark, and ptqlab's own record (perplexity, its memory entry: the most block bytes resident at once).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale  # noqa: E402
from bench_scale import SHAPES, HostPeak  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GIB = 2**30


def _testbed_opt() -> Path:
    from ptqlab.testbed import resolve_model_path

    return Path(resolve_model_path("testbed-opt"))


# ---------------------------------------------------------------- the random checkpoint, one tensor at a time


def checkpoint_tensors(config) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a checkpoint of ``config`` stores (tied weights once), from a meta-device
    model: nothing is allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    params = dict(model.named_parameters())  # a tied head is its embeddings: listed once, under the first name
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {k: v.shape for k, v in model.state_dict().items() if k not in every}  # persistent buffers
    return {**{n: p.shape for n, p in params.items()}, **buffers}


def _random(name: str, shape: torch.Size, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """HF's initialisation in kind: matrices N(0, 0.02), norm weights 1, biases 0; fp16 on the host."""
    if len(shape) == 1:
        fill = torch.ones if name.endswith("weight") else torch.zeros
        return fill(shape, dtype=torch.float16)
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02)
    return t.to(torch.float16).cpu()


def shard_plan(shapes: dict[str, torch.Size], shard_bytes: int) -> list[list[str]]:
    """The tensors of each shard, in model order, a new shard when the next tensor would pass ``shard_bytes``."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def checkpoint_config(shape_name: str):
    """The full model's config (every block) in fp16, with the testbed tokenizer's special ids; its vocab at
    least the tokenizer's (tiny-opt's 512 is raised to 8192)."""
    shape = SHAPES[shape_name]
    tb = json.loads((_testbed_opt() / "config.json").read_text())
    ids = {k: tb[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = bench_scale.model_config(shape, shape.layers, vocab=max(shape.vocab, tb["vocab_size"]), **ids)
    config.dtype = torch.float16
    return config


def write_checkpoint(shape_name: str, folder: Path, device: torch.device, shard_bytes: int, seed: int = 0) -> dict:
    """Write the random fp16 checkpoint of ``shape_name`` to ``folder``; returns what was written and how fast."""
    from ptqlab.streaming import write_safetensors

    shape = SHAPES[shape_name]
    testbed = _testbed_opt()
    config = checkpoint_config(shape_name)
    shapes = checkpoint_tensors(config)
    plan = shard_plan(shapes, shard_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map = {}
    t0 = time.perf_counter()
    with HostPeak() as host:
        for i, names in enumerate(plan):
            file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            entries = {n: (torch.float16, tuple(shapes[n]), lambda n=n: _random(n, shapes[n], gen, device))
                       for n in names}
            write_safetensors(entries, folder / file, {"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
    write_s = time.perf_counter() - t0
    total = sum(s.numel() * 2 for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(testbed / name, folder / name)
    return {"params": sum(s.numel() for s in shapes.values()), "bytes": _folder_bytes(folder), "tensor_bytes": total,
            "shards": len(plan), "vocab": config.vocab_size, "layers": shape.layers, "write_s": round(write_s, 2),
            "write_gib_per_s": round(total / GIB / write_s, 3), "write_peak_host_rss_gib": round(host.peak / GIB, 3)}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- the streamed run and what it costs


def _rss_split() -> dict[str, int]:
    """RssAnon, RssFile and RssShmem of this process in bytes ({} where /proc/self/status has none)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in lines)
            if k in ("RssAnon", "RssFile", "RssShmem")}


class StreamPeaks(HostPeak):
    """:class:`HostPeak`, and the peaks of the anonymous and file-backed RSS (each on its own) and of the used
    bytes of ``disk``'s filesystem, sampled with it."""

    def __init__(self, disk: Path) -> None:
        self.disk = disk

    def __enter__(self) -> StreamPeaks:
        self.split: dict[str, int] = {}
        self.disk_start = self.disk_peak = shutil.disk_usage(self.disk).used
        self._more()
        return super().__enter__()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._more()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._more()

    def _more(self) -> None:
        for k, v in _rss_split().items():
            self.split[k] = max(self.split.get(k, 0), v)
        self.disk_peak = max(self.disk_peak, shutil.disk_usage(self.disk).used)


def stream_one(checkpoint: Path, info: dict, a: argparse.Namespace, method: str, workdir: Path) -> dict:
    """One ``ptqlab run --stream --save`` of ``checkpoint`` in this process; its row."""
    import psutil

    from ptqlab.cli import main

    device = torch.device(a.device)
    save, records = workdir / f"q-{method}", workdir / f"records-{method}.jsonl"
    args = ["run", "--model", str(checkpoint), "--method", method, "--wbits", str(a.wbits), "--wgroup",
            str(a.wgroup), "--calib", a.calib, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--eval",
            a.eval, "--max-eval-windows", str(a.max_eval_windows), "--device", a.device, "--no-progress",
            "--stream", "--save", str(save), "--output", str(records)]
    row = {"shape": a.shape, "method": method, "ptqlab_args": args[1:], "checkpoint": info,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start_rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with StreamPeaks(workdir) as peaks:
        rc = main(args)
    wall = time.perf_counter() - start
    row.update(exit_code=rc, stream_wall_s=round(wall, 2))
    if rc != 0 or not records.is_file():
        row["error"] = f"ptqlab run exited {rc} (its message is on stderr)"
        return row
    record = json.loads(records.read_text().splitlines()[-1])
    out_bytes = _folder_bytes(save)
    row.update({
        "peak_host_rss_gib": round(peaks.peak / GIB, 3),
        "host_rss_at_start_gib": round(start_rss / GIB, 3),  # torch, CUDA and the libraries, before the run
        "peak_host_rss_above_start_gib": round((peaks.peak - start_rss) / GIB, 3),
        "peak_rss_split_gib": {k: round(v / GIB, 3) for k, v in peaks.split.items()},  # each its own peak
        "peak_host_rss_over_checkpoint": round(peaks.peak / info["bytes"], 4),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3) if device.type == "cuda" else None,
        "disk_high_water_gib": round((peaks.disk_peak - peaks.disk_start) / GIB, 3),  # above the run's start
        "saved_bytes": out_bytes, "saved_over_checkpoint": round(out_bytes / info["bytes"], 4),
        "ptqlab_time_s": record.get("time_s"), "ptqlab_timings": record.get("timings"), "ppl": record.get("ppl"),
        "stored_bits_per_weight": record.get("stored_bits_per_weight"),
        # ptqlab's own memory entry: its peak_host_rss_gib is ru_maxrss, the process's lifetime peak
        "ptqlab_memory": record.get("memory"),
    })
    if not a.keep:
        shutil.rmtree(save, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="opt-6.7b", help=f"one of {', '.join(SHAPES)} (every block is written)")
    p.add_argument("--method", default="gptq", help="comma-separated ptqlab methods (rtn, gptq, ...): one row each")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--wgroup", type=int, default=128)
    p.add_argument("--calib", default="testbed", help="calibration text (the shipped testbed text: any tokenizer)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval", default="wikitext2", help="evaluation set (wikitext2 needs PTQLAB_DATA)")
    p.add_argument("--max-eval-windows", type=int, default=8)
    p.add_argument("--shard-mb", type=int, default=2048, help="safetensors shard size of the random checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the random checkpoint and the quantized folders")
    p.add_argument("--out", required=True, help="folder: stream.jsonl, one row per method")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no streamed run after this many seconds; those left get a 'skipped' row")
    a = p.parse_args(argv)
    methods = a.method.split(",")
    if a.shape not in SHAPES:
        p.error(f"--shape {a.shape}: unknown; choose one of {', '.join(SHAPES)}")
    if a.shard_mb < 1:
        p.error("--shard-mb must be at least 1")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="bench-stream-"))
    workdir.mkdir(parents=True, exist_ok=True)
    need = sum(s.numel() * 2 for s in checkpoint_tensors(checkpoint_config(a.shape)).values())
    free = shutil.disk_usage(workdir).free
    if free < need:  # ptqlab checks the quantized checkpoint's own need before its first block
        p.error(f"--workdir {workdir}: the {a.shape} checkpoint needs {need / GIB:.1f} GiB, {free / GIB:.1f} GiB free")
    t_start = time.perf_counter()
    checkpoint = workdir / f"random-{a.shape}"
    try:
        info = write_checkpoint(a.shape, checkpoint, torch.device(a.device), a.shard_mb * 2**20)
        print(f"# {a.shape}: {info['bytes'] / GIB:.2f} GiB in {info['shards']} shards written in "
              f"{info['write_s']:.1f}s", file=sys.stderr)
        with open(out / "stream.jsonl", "a", encoding="utf-8") as sink:
            for method in methods:
                if a.budget_s and time.perf_counter() - t_start > a.budget_s:
                    row = {"shape": a.shape, "method": method, "skipped": "--budget-s"}
                else:
                    row = stream_one(checkpoint, info, a, method, workdir)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                print(f"# {a.shape} {method}: {row.get('stream_wall_s', row.get('skipped'))} s, peak RSS "
                      f"{row.get('peak_host_rss_gib')} GiB", file=sys.stderr)
    finally:
        if not a.keep:
            shutil.rmtree(checkpoint, ignore_errors=True)
            if not a.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
