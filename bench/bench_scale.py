"""Time and memory of every method on full-size block shapes (random weights: timing and memory only).

    # on an H200, one command (< 8 min; JSONL in $OUT):
    python bench/bench_scale.py --out $OUT --budget-s 420
    # a tiny shape on the CPU (what the CI test runs):
    python bench/bench_scale.py --shape tiny-opt --methods rtn,gptq --nsamples 4 --seqlen 32 --device cpu --out /tmp/b

The model is built from a config of the real shape (OPT-6.7B/13B/30B/66B, Llama-3-8B/70B) with only ``--layers``
decoder blocks (default 2), in fp16, randomly initialised on the GPU and then kept in host memory as a run keeps
it. Each (shape, method) row holds the phases of :class:`ptqlab.pipeline.QuantReport` (capture, hessian, solve,
lorc, propagate, targets, transform, setup, log, move, finish, other: they sum to the call), the end-to-end
quantization time, peak GPU memory (``max_memory_allocated``; ``max_memory_reserved``, with the allocator's cache)
and peak host RSS (sampled every 20 ms) during that method, and, for every phase, its floor: the FLOPs it must do
at the rate measured here for that arithmetic (bf16 matmul for the block forwards and the Hessian sums (fp16
inputs, float32 output), fp32/TF32 for the solves, fp64 for LoRC's Gram matrix) plus the bytes it must move host <-> device at the measured pinned-copy bandwidth. The
full model is extrapolated per layer: ``once + (quantize - once) * L_full / L`` with ``once`` the phases run once
per model (capture, pin, finish) (every block of a shape is the same shape), stated in each row. ``quantize_s`` is the
``quantize_model`` call alone; the phases sum to it (``other`` is what no phase names), freeing the model
afterwards is ``cleanup_s``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ptqlab import QuantConfig, QuantSpec
from ptqlab import moves as moves_module
from ptqlab.pipeline import quantize_model


@dataclass(frozen=True)
class Shape:
    family: str
    hidden: int
    layers: int  # of the full model (the bench builds --layers of them)
    heads: int
    kv_heads: int
    ffn: int
    vocab: int


SHAPES = {
    "opt-6.7b": Shape("opt", 4096, 32, 32, 32, 16384, 50272),
    "opt-13b": Shape("opt", 5120, 40, 40, 40, 20480, 50272),
    "opt-30b": Shape("opt", 7168, 48, 56, 56, 28672, 50272),
    "opt-66b": Shape("opt", 9216, 64, 72, 72, 36864, 50272),
    "llama-3-8b": Shape("llama", 4096, 32, 32, 8, 14336, 128256),
    "llama-3-70b": Shape("llama", 8192, 80, 64, 8, 28672, 128256),
    # for the CPU test: the same code path in a few seconds
    "tiny-opt": Shape("opt", 128, 4, 4, 4, 512, 512),
    "tiny-llama": Shape("llama", 128, 4, 4, 2, 256, 512),
}
DEFAULT_SHAPES = "opt-6.7b,llama-3-8b,opt-13b,opt-30b,llama-3-70b"

W4 = QuantSpec(4, True, 128)
W8, A8 = QuantSpec(8, True, 0), QuantSpec(8, True, 0)
METHODS = {
    "rtn": QuantConfig(method="rtn", weight=W4),
    "gptq": QuantConfig(method="gptq", weight=W4),
    "gptq+lorc": QuantConfig(method="gptq", weight=W4, lorc_rank=8),
    "gptq+lorc-aware": QuantConfig(method="gptq", weight=W4, lorc_rank=8, lorc_aware=True),
    "zq-local": QuantConfig(method="zq-local", weight=W4),
    "zq-global": QuantConfig(method="zq-global", weight=W4),
    "smoothquant+rtn-w8a8": QuantConfig(method="rtn", weight=W8, act=A8, transform="smoothquant"),
    "awq+rtn": QuantConfig(method="rtn", weight=W4, transform="awq"),
    "rotate+gptq": QuantConfig(method="gptq", weight=W4, transform="rotate"),
}


def model_config(shape: Shape, layers: int, vocab: int | None = None, **extra):
    """The transformers config of ``shape`` with ``layers`` decoder blocks (``vocab``: instead of the shape's)."""
    from transformers import LlamaConfig, OPTConfig

    vocab = vocab or shape.vocab
    if shape.family == "opt":
        return OPTConfig(hidden_size=shape.hidden, num_hidden_layers=layers, num_attention_heads=shape.heads,
                         ffn_dim=shape.ffn, vocab_size=vocab, max_position_embeddings=2048,
                         word_embed_proj_dim=shape.hidden, **extra)
    return LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, intermediate_size=shape.ffn, vocab_size=vocab,
                       max_position_embeddings=8192, tie_word_embeddings=False, **extra)


def build(shape: Shape, layers: int, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = model_config(shape, layers)
    torch.manual_seed(0)
    with torch.device(device):  # random init is slow on the CPU; the model then lives there as a run keeps it
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    model = model.cpu().eval().requires_grad_(False)
    model.config.use_cache = False
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


# ---------------------------------------------------------------- measured rates and the floors


def _time(fn, repeat: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / repeat


def measure_rates(device: torch.device) -> dict[str, float]:
    """FLOP/s of large matmuls in bf16, TF32 (fp32 inputs, tensor cores), fp32 and fp64; pinned host->device
    bytes/s (None on the CPU: nothing moves)."""
    n = 8192 if device.type == "cuda" else 256
    rates = {}
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                              ("fp32", torch.float32, False), ("fp64", torch.float64, False)):
        m = n if dtype != torch.float64 else n // 2
        a = torch.randn(m, m, device=device, dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            rates[f"{name}_flops"] = 2 * m**3 / _time(lambda: a @ a, 5 if device.type == "cuda" else 2, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        del a
    if device.type == "cuda":
        host = torch.empty(2**28, dtype=torch.uint8).pin_memory()
        rates["h2d_bytes_per_s"] = host.numel() / _time(lambda: host.to(device, non_blocking=True), 5, device)
        del host
    else:
        rates["h2d_bytes_per_s"] = None
    return rates


def block_linears(shape: Shape) -> list[tuple[str, int, int, str]]:
    """``(name, out, in, input group)`` of one block's linears; linears of a group read one input."""
    h, f = shape.hidden, shape.ffn
    if shape.family == "opt":
        return [("q", h, h, "attn_in"), ("k", h, h, "attn_in"), ("v", h, h, "attn_in"), ("out", h, h, "attn_out"),
                ("fc1", f, h, "mlp_in"), ("fc2", h, f, "mlp_out")]
    kv = shape.kv_heads * (h // shape.heads)
    return [("q", h, h, "attn_in"), ("k", kv, h, "attn_in"), ("v", kv, h, "attn_in"), ("o", h, h, "attn_out"),
            ("gate", f, h, "mlp_in"), ("up", f, h, "mlp_in"), ("down", h, f, "mlp_out")]


def floors(shape: Shape, config: QuantConfig, tokens: int, seqlen: int, rates: dict, device: torch.device,
           zq_steps: int = 100, zq_batch_tokens: int = 8 * 2048) -> dict[str, dict]:
    """Per phase and per block: ``{"flops", "bytes", "floor_s"}``; the floor is flops at the phase's rate plus
    bytes at the host->device bandwidth (what no implementation of this algorithm can beat on this machine)."""
    lin = block_linears(shape)
    params = sum(o * i for _, o, i, _ in lin)
    forward = 2 * params * tokens + 2 * seqlen * shape.hidden * tokens  # linears + causal attention (half of QK^T, AV)
    inputs = {}
    for _, o, i, g in lin:
        inputs[g] = i
    groups: dict[str, list[tuple[int, int]]] = {}
    for _, o, i, g in lin:
        groups.setdefault(g, []).append((o, i))
    h2d = rates.get("h2d_bytes_per_s")
    weight_bytes = 2 * params * 2 if device.type == "cuda" else 0  # the block to the GPU and back, fp16
    out: dict[str, dict] = {}

    def add(phase: str, flops: float, rate: str, nbytes: float = 0) -> None:
        s = flops / rates[f"{rate}_flops"] + (nbytes / h2d if h2d and nbytes else 0)
        out[phase] = {"flops": flops, "rate": rate, "bytes": nbytes, "floor_s": s}

    calibrated = config.needs_calibration
    if calibrated:
        add("hessian", forward, "bf16", weight_bytes)
        out["hessian"]["flops"] += 2 * tokens * sum(i * i for i in inputs.values())
        # the Gram sums take the fp16 inputs as they are, float32 output (hessian.accumulate_gram): the bf16 rate
        out["hessian"]["floor_s"] += 2 * tokens * sum(i * i for i in inputs.values()) / rates["bf16_flops"]
        add("propagate", forward, "bf16")
    if config.method == "gptq":
        # per group: Cholesky, inverse and Cholesky again (~in^3), then the error feedback (out_total x in^2)
        add("solve", sum(i**3 + sum(o for o, _ in g) * i * i for g in groups.values() for i in [g[0][1]]), "fp32")
    elif config.method == "zq-local":
        # forward and backward of the objective's [out, in] x [in, in] product, on TF32 (zeroquant.tf32_matmuls)
        add("solve", sum(zq_steps * 4 * o * i * i for _, o, i, _ in lin), "tf32")
    elif config.method == "zq-global":
        add("targets", forward, "bf16")
        add("solve", zq_steps * 3 * 2 * params * zq_batch_tokens, "tf32")  # the distillation runs on TF32
    else:
        add("solve", 0, "fp32")
    if config.lorc_rank:
        flops = sum(2 * o * i * min(o, i) for _, o, i, _ in lin)
        add("lorc", flops, "fp64")
        if config.lorc_aware:
            out["lorc"]["flops"] += sum(2 * o * i * i for _, o, i, _ in lin)
            out["lorc"]["floor_s"] += sum(2 * o * i * i for _, o, i, _ in lin) / rates["fp32_flops"]
    return out


# ---------------------------------------------------------------- one method on one shape


class HostPeak:
    """Peak RSS of this process while the ``with`` block runs (sampled every 20 ms)."""

    def __enter__(self) -> HostPeak:
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


# phases that run once per model, not once per block (the extrapolation counts them once)
ONCE_PHASES = ("capture", "pin", "finish")


def run_one(model: torch.nn.Module, shape_name: str, method: str, calib: torch.Tensor, device: torch.device,
            layers: int, rates: dict, batch_size: int) -> dict:
    shape = SHAPES[shape_name]
    config = METHODS[method]
    row = {"shape": shape_name, "method": method, "config": config.name(), "layers_built": layers,
           "layers_full": shape.layers, "nsamples": calib.shape[0], "seqlen": calib.shape[1],
           "calib_batch": batch_size, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__}
    m = copy.deepcopy(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with HostPeak() as host:
            start = time.perf_counter()
            report = quantize_model(m, config, calib if config.needs_calibration else None, device, progress=False,
                                    batch_size=batch_size)
            elapsed = time.perf_counter() - start  # the call alone: freeing the model below is the bench's
    except (torch.OutOfMemoryError, ValueError, RuntimeError) as err:  # recorded, and the bench goes on
        row.update(error=f"{type(err).__name__}: {str(err)[:400]}")
        return row
    finally:
        t0 = time.perf_counter()
        del m
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        cleanup = time.perf_counter() - t0
    phases = {k: round(v, 4) for k, v in report.timings.items()}
    floor = floors(shape, config, calib.numel() if config.needs_calibration else 0, calib.shape[1], rates, device)
    once = sum(report.timings.get(k, 0.0) for k in ONCE_PHASES)
    row.update({
        "quantize_s": round(elapsed, 3), "phases_s": phases,
        # the phases cover the call: "other" is the part no phase names, "unaccounted_s" what even that misses
        "unaccounted_s": round(elapsed - sum(report.timings.values()), 4), "cleanup_s": round(cleanup, 4),
        "per_layer_s": {k: round(v / layers, 4) for k, v in phases.items() if k not in ONCE_PHASES},
        "floor_per_layer_s": {k: round(v["floor_s"], 5) for k, v in floor.items()},
        "floor_per_layer": floor,
        "extrapolated_full_model_s": round(once + (elapsed - once) * shape.layers / layers, 2),
        "extrapolation": f"once + (quantize_s - once) * layers_full / layers_built, once = {' + '.join(ONCE_PHASES)}",
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        # what the caching allocator held at most (blocks' freed memory stays cached between blocks, ptqlab.moves)
        "peak_gpu_reserved_gib": (round(torch.cuda.max_memory_reserved(device) / 2**30, 3) if device.type == "cuda"
                                  else None),
        "peak_host_rss_gib": round(host.peak / 2**30, 3),
    })
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=DEFAULT_SHAPES, help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--layers", type=int, default=2, help="decoder blocks built (the full model is extrapolated)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="folder: scale.jsonl (one row per shape and method) and rates.json")
    p.add_argument("--moves", default=moves_module.DEFAULT,
                   help=f"comma-separated block moves to compare, of {', '.join(moves_module.MOVES)}")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new (shape, method) after this many seconds; those left get a 'skipped' row")
    a = p.parse_args(argv)
    shapes, methods = a.shape.split(","), a.methods.split(",")
    moves = a.moves.split(",")
    bad = ([s for s in shapes if s not in SHAPES] + [m for m in methods if m not in METHODS]
           + [m for m in moves if m not in moves_module.MOVES])
    if bad or a.layers < 1:
        p.error(f"unknown shape or method {bad}" if bad else "--layers must be at least 1")
    device = torch.device(a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rates = measure_rates(device)
    (out / "rates.json").write_text(json.dumps(rates, indent=1))
    print(f"# rates: {json.dumps({k: (f'{v:.3g}' if v else v) for k, v in rates.items()})}", file=sys.stderr)
    gen = torch.Generator().manual_seed(0)
    with open(out / "scale.jsonl", "a", encoding="utf-8") as sink:
        for shape_name in shapes:
            shape = SHAPES[shape_name]
            if a.budget_s and time.perf_counter() - t_start > a.budget_s:
                for method in methods:
                    sink.write(json.dumps({"shape": shape_name, "method": method, "skipped": "--budget-s"}) + "\n")
                continue
            t0 = time.perf_counter()
            model = build(shape, min(a.layers, shape.layers), device)
            calib = torch.randint(0, shape.vocab, (a.nsamples, a.seqlen), generator=gen)
            print(f"# {shape_name}: {min(a.layers, shape.layers)} of {shape.layers} blocks built in "
                  f"{time.perf_counter() - t0:.1f}s ({json.dumps(asdict(shape))})", file=sys.stderr)
            if device.type == "cuda":  # warm-up (cuBLAS, cuSOLVER, the GPTQ Triton kernel's JIT) so the rows are steady
                # state: with LoRC when a row has it (its first eigh sets up cuSOLVER's workspace, its threads' handles)
                warm = "gptq+lorc" if any(METHODS[m].lorc_rank for m in methods) else "gptq"
                run_one(model, shape_name, warm, calib[: a.calib_batch], device, a.layers, rates, a.calib_batch)
            for method, how in ((m, mv) for m in methods for mv in moves):
                if a.budget_s and time.perf_counter() - t_start > a.budget_s:
                    sink.write(json.dumps({"shape": shape_name, "method": method, "moves": how,
                                           "skipped": "--budget-s"}) + "\n")
                    continue
                default, moves_module.DEFAULT = moves_module.DEFAULT, how
                try:
                    row = run_one(model, shape_name, method, calib, device, min(a.layers, shape.layers), rates,
                                  a.calib_batch)
                finally:
                    moves_module.DEFAULT = default
                row["moves"], row["rates"] = how, rates
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                print(f"# {shape_name} {method} ({how} moves): {row.get('quantize_s', row.get('error'))}",
                      file=sys.stderr)
            del model
            gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
