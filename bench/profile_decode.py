"""Where one greedy decode step's GPU time goes: the linear layers' kernels against everything else.

    python bench/profile_decode.py --shape opt-6.7b --schemes fp16,w4a16 --batches 1,16 --out decode_profile.jsonl

For each (scheme, batch): the model of the named OPT shape (random fp16 weights: speed only), quantized by RTN and
swapped to real kernels (the ``triton`` preference: ptqlab's kernels), ``ptqlab.speed``'s static decoder prefilled,
then ``--steps`` eager steps under the torch profiler (CUDA kernels only). Each kernel is put in a class by its
name: the linears (cuBLAS GEMMs, ptqlab's W4A16 and W4A8 kernels), attention (SDPA's kernels), norms, the int8
layers' input quantization (act_quant) and the rest (activations, adds, cache writes, argmax). Reported per step:
each class's summed kernel time and kernel count, and the step time a CUDA-graph replay measures (``run_graph``),
whose excess over the kernels' sum is the gaps between kernels. Issue 20's decode targets are bounded by the
non-linear classes: 4-bit weights shrink the linear class only.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench_decode import SCHEMES
from kernel_common import build_opt, emit, open_output, rtn_with_grid, swap_real, wrap_model
from ptqlab.speed import make_decoder, prefill, run_graph, step

# cuBLAS (sm90_xmma_*, nvjet_* on Hopper, gemv*), ptqlab's CUDA W4A16 / W4A8 kernels (w4_mma*, w4a8_mma*) and
# Triton ones (_gemv_kernel, _gemm_kernel)
LINEAR = ("gemm", "gemv", "w4_mma", "w4a8_mma", "cutlass", "xmma", "nvjet", "cublas", "splitk")
#: the int8 layers' per-token quantization of their input (ptqlab.kernels.act_quant): 4-bit weights leave it
QUANT = ("act_quant",)
ATTENTION = ("attention", "fmha", "flash", "softmax", "sdpa", "efficient")
NORM = ("layer_norm", "layernorm")  # torch's, and the fused decoder's add + LayerNorm


def kernel_class(name: str) -> str:
    low = name.lower()
    if any(a in low for a in ATTENTION):
        return "attention"
    if any(a in low for a in NORM):
        return "norm"
    if any(q in low for q in QUANT):
        return "act_quant"
    if any(k in low for k in LINEAR):
        return "linear"
    return "other"


@torch.no_grad()
def profile_steps(model, batch: int, steps: int, fused: bool = True) -> dict:
    dec, ids = make_decoder(model, batch, 128, steps + 4, fused)
    tok, pos = prefill(dec, ids)
    for _ in range(2):  # warm: tuning, allocator
        step(dec, tok, pos)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(dec, tok, pos)
        torch.cuda.synchronize()
    classes: dict[str, dict] = {}
    top: dict[str, float] = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        c = classes.setdefault(kernel_class(e.name), {"us": 0.0, "kernels": 0})
        c["us"] += e.device_time / steps
        c["kernels"] += 1 / steps
        top[e.name] = top.get(e.name, 0.0) + e.device_time / steps
    for c in classes.values():
        c["us"], c["kernels"] = round(c["us"], 1), round(c["kernels"], 1)
    worst = sorted(top.items(), key=lambda kv: -kv[1])[:12]
    return {"classes": classes, "top_kernels_us": [(n[:90], round(t, 1)) for n, t in worst]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="opt-6.7b")
    ap.add_argument("--schemes", default="fp16,w4a16")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--decoders", default="fused,plain", help="fused and/or plain: the decoder's fusions on or off")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    open_output(a.out)
    model = build_opt(a.shape, torch.device("cuda"))
    layers = wrap_model(model)
    originals = [layer.weight.data.clone() for layer in layers]
    for scheme in a.schemes.split(","):
        wspec, aspec, rank = SCHEMES[scheme]
        rtn_with_grid(layers, wspec, aspec, rank, originals=originals, svd=False)
        summary, undo = swap_real(model, "real", torch.device("cuda"), backend="triton") if scheme != "fp16" else (
            {"real": {}}, None)
        for decoder, batch in ((d, int(b)) for d in a.decoders.split(",") for b in a.batches.split(",")):
            fused = decoder == "fused"
            row = {"part": "decode_profile", "shape": a.shape, "scheme": scheme, "kernels": summary["real"],
                   "decoder": decoder, "batch": batch, **profile_steps(model, batch, a.steps, fused)}
            t_graph, _ = run_graph(model, batch, 128, 32, fused)
            row["graph_us_per_step"] = round(1e6 * t_graph / 32, 1)
            row["kernel_us_per_step"] = round(sum(c["us"] for c in row["classes"].values()), 1)
            emit(row)
        if undo:
            undo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
