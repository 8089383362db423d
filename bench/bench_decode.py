"""Greedy-decoding speed of FP16 and each real low-bit scheme on OPT shapes (random fp16 weights: speed only).

    python bench/bench_decode.py --shapes opt-1.3b,opt-6.7b --batches 1,16 --new 128 --out decode.jsonl

Per (shape, scheme, batch): a prompt of ``--prompt`` random tokens is prefilled into a static KV cache
(``ptqlab.speed.StaticOPTDecoder``: the model's own modules over our own cache), then ``--new`` tokens are decoded
greedily.
Each decode step (forward of one token per sequence, argmax, position + 1) is captured once in a CUDA graph and
replayed, so neither Python nor kernel-launch overhead hides the kernels; the same steps run eagerly too (what a
plain Python loop gets).
Reported: decode tokens/s (batch x new tokens / time), the memory floor (weight + KV bytes one step must read /
measured copy bandwidth), peak GPU memory, and whether the graph's tokens equal the eager loop's.
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch
from kernel_common import SHAPES, build_opt, copy_bandwidth, emit, open_output, rtn_with_grid, swap_real, wrap_model
from ptqlab.kernels.real import DEFAULT_PREFERENCE
from ptqlab.quantizers import QuantSpec
# the decoder lives in the package (ptqlab run --speed measures with it); re-exported for tests/test_bench_decode.py
from ptqlab.speed import StaticOPTDecoder, make_decoder, prefill, run_eager, run_graph, step  # noqa: F401
from ptqlab.speed import decode_read_bytes as step_bytes

FP = QuantSpec()
SCHEMES = {
    # name: (weight spec, activation spec, LoRC rank)
    "fp16": (FP, FP, 0),
    "w4a16": (QuantSpec(4, True, 128), FP, 0),
    "w4a16-lorc8": (QuantSpec(4, True, 128), FP, 8),
    "w8a8": (QuantSpec(8, True, 0), QuantSpec(8, True, 0), 0),
    "w4a8": (QuantSpec(4, True, 0), QuantSpec(8, True, 0), 0),
    "w4a8-lorc8": (QuantSpec(4, True, 0), QuantSpec(8, True, 0), 8),
    "w8a8-fp8": (QuantSpec(fmt="fp8"), QuantSpec(fmt="fp8"), 0),
}


def bench_scheme(model, layers, originals, shape: str, scheme: str, batches: list[int], prompt: int, new: int,
                 bw: float, backend: str = DEFAULT_PREFERENCE, decoders: tuple[str, ...] = ("fused",)) -> None:
    """``backend``: the kernel preference (ptqlab.kernels.real.PREFERENCES) the real layers are chosen with;
    ``decoders``: "fused" (StaticOPTDecoder's fusions: add + LayerNorm, q/k/v) and/or "plain" (HF's modules one by
    one), each timed in turn."""
    wspec, aspec, rank = SCHEMES[scheme]
    rtn_with_grid(layers, wspec, aspec, rank, originals=originals, svd=False)
    undo = None
    kernels = {}
    if scheme != "fp16":
        summary, undo = swap_real(model, "real", torch.device("cuda"), backend=backend)
        kernels = summary["real"]
    wbytes = step_bytes(model)
    hidden, n_layers, _, _ = SHAPES[shape]
    for decoder, batch in ((d, b) for d in decoders for b in batches):
        torch.cuda.reset_peak_memory_stats()
        fused = decoder == "fused"
        row = {"part": "decode", "shape": shape, "scheme": scheme, "kernels": kernels, "batch": batch,
               "prompt": prompt, "new_tokens": new, "decoder": decoder}
        try:
            t_eager, toks_eager = run_eager(model, batch, prompt, new, fused)
            row["eager_tok_s"] = round(batch * new / t_eager, 1)
            t_graph, toks_graph = run_graph(model, batch, prompt, new, fused)
            row["graph_tok_s"] = round(batch * new / t_graph, 1)
            row["graph_ms_per_step"] = round(1e3 * t_graph / new, 3)
            row["graph_tokens_equal_eager"] = round((toks_graph == toks_eager).float().mean().item(), 4)
        except Exception as err:  # report what broke (e.g. an op that cannot be captured), keep going
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        # one step reads every weight once and the KV cache up to the mean position
        kv = 2 * n_layers * batch * (prompt + new / 2) * hidden * 2
        row["weight_bytes"] = wbytes
        row["floor_tok_s"] = round(batch / ((wbytes + kv) / bw), 1)  # bw counts bytes read + written
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        emit(row)
        gc.collect()
        torch.cuda.empty_cache()
    if undo:
        undo()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="opt-1.3b,opt-6.7b")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--backend", default=DEFAULT_PREFERENCE,
                    help=f"kernel preference: triton, tinygemm or gemlite (default: the library's, {DEFAULT_PREFERENCE})")
    ap.add_argument("--decoders", default="fused,plain", help="fused and/or plain (StaticOPTDecoder's fusions)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    open_output(args.out)
    bw = copy_bandwidth()
    emit({"part": "decode_env", "copy_bandwidth_gb_s": round(bw / 1e9, 1), "torch": torch.__version__})
    batches = [int(b) for b in args.batches.split(",")]
    for shape in args.shapes.split(","):
        model = build_opt(shape, torch.device("cuda"))
        layers = wrap_model(model)
        originals = [layer.weight.data.clone() for layer in layers]
        for scheme in args.schemes.split(","):
            bench_scheme(model, layers, originals, shape, scheme, batches, args.prompt, args.new, bw, args.backend,
                         tuple(args.decoders.split(",")))
        del model, layers, originals
        gc.collect()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
