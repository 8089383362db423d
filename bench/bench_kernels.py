"""Speed of fake-quant evaluation and of the real low-bit kernels on OPT shapes (random fp16 weights: speed only).

    python bench/bench_kernels.py --parts gemm,eval,testbed --shapes opt-1.3b,opt-6.7b --out results.jsonl

gemm:    per-linear time at M = 1, 16, 2048 tokens for each kernel, against FP16 F.linear and against the memory
         floor (bytes the kernel must move / measured copy bandwidth); medians of triton.testing.do_bench
         (L2 flushed between repeats).
eval:    perplexity-evaluation tokens/s of the whole model (seqlen 2048), fake and real, batch 1 and the default
         batch, peak GPU memory; then packed-W4 memory with the fp16 weights gone.
testbed: testbed-opt evaluation tokens/s before (batch 1, torch activation quantizer) and after.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
import triton

from kernel_common import SHAPES, build_opt, copy_bandwidth, emit, open_output, rtn_with_grid, swap_real, wrap_model
from ptqlab.evaluate import default_eval_batch, perplexity
from ptqlab.kernels import act_quant
from ptqlab.kernels.real import RealLinear
from ptqlab.models import QuantLinear
from ptqlab.quantizers import QuantSpec, fake_quantize

W4G = QuantSpec(4, True, 128)
W4R = QuantSpec(4, True, 0)
W8R = QuantSpec(8, True, 0)
A8 = QuantSpec(8, True, 0)
FP = QuantSpec()



def bench(fn, graph: bool = False) -> float:
    """Median milliseconds; ``graph``: replays of a CUDA graph of ``fn`` (no Python/launch overhead: kernel time)."""
    if graph:
        fn()  # compile / pick algorithms outside the capture
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")



def weight_bytes(kind: str, k: int, n: int) -> float:
    if kind in ("fp16", "fake-w4a8", "act-quant", "act-quant-torch"):
        return 2 * k * n
    if "w4a16" in kind:  # int4 codes + fp16 scale and zero per group of 128
        return k * n / 2 + 4 * n * k / 128
    if kind.startswith("w8a16"):
        return k * n + 4 * n
    return k * n + 4 * n  # int8 path (4-bit codes stored as int8)


def gemm_part(shapes: list[str], bw: float) -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for shape in shapes:
        h, _, _, ffn = SHAPES[shape]
        for lname, k, n in (("qkvo", h, h), ("fc1", h, ffn), ("fc2", ffn, h)):
            w = torch.randn(n, k, device=dev, generator=g, dtype=torch.float16) * 0.02
            b = torch.randn(n, device=dev, generator=g, dtype=torch.float16) * 0.1
            layers: dict[str, torch.nn.Module] = {}
            for kind, wspec, aspec, rank, backend in (
                ("fake-w4a8", W4G, A8, 0, None), ("lorc8-plain", W4G, FP, 8, None), ("lorc8-addmm", W4G, FP, 8, None),
                ("w4a16-gemlite", W4G, FP, 0, "w4a16-gemlite"), ("w4a16-tinygemm", W4G, FP, 0, "w4a16-tinygemm"),
                ("w8a8-int8", W8R, A8, 0, "w8a8-int8"),
                ("w4a8-int8", W4R, A8, 0, "w4a8-int8"), ("w4a16-tinygemm+lorc8", W4G, FP, 8, "w4a16-tinygemm"),
            ):
                q = QuantLinear(w, b, lname)
                rtn_with_grid([q], wspec, aspec, lorc_rank=rank, svd=False)
                try:
                    layers[kind] = RealLinear(q, backend) if backend else q
                except Exception as err:  # noqa: BLE001
                    emit({"part": "gemm", "shape": shape, "linear": lname, "kernel": kind, "error": repr(err)[:300]})
            for m in (1, 16, 2048):
                x = torch.randn(m, k, device=dev, generator=g, dtype=torch.float16)
                fp16_ms = bench(lambda: torch.nn.functional.linear(x, w, b), graph=True)
                fp16_eager = bench(lambda: torch.nn.functional.linear(x, w, b))
                floor = (2 * k * n + 2 * m * (k + n)) / bw * 1e3
                emit({"part": "gemm", "shape": shape, "linear": lname, "k": k, "n": n, "m": m, "kernel": "fp16",
                      "ms": fp16_ms, "eager_ms": fp16_eager, "floor_ms": floor, "tflops": 2 * m * k * n / fp16_ms * 1e-9})
                cases = {"act-quant": lambda: act_quant.fake_quantize_triton(x, A8),
                         "act-quant-torch": lambda: fake_quantize(x, A8)}
                for kind, layer in layers.items():
                    mode = kind.split("-")[-1] if kind.startswith("lorc8-") else None

                    def run(layer=layer, mode=mode):
                        act_quant.SHARED_INPUTS.clear()  # the same x every call: measure the quantizer each time
                        if mode:
                            QuantLinear.lorc_mode = mode
                        return layer(x)
                    cases[kind] = run
                with torch.no_grad():
                    for kind, fn in cases.items():
                        try:
                            # gemlite autotunes and the torch quantizer syncs: neither can be captured
                            ms = bench(fn, graph=kind not in ("w4a16-gemlite", "act-quant-torch"))
                            eager = bench(fn)
                        except Exception as err:  # noqa: BLE001
                            emit({"part": "gemm", "shape": shape, "linear": lname, "m": m, "kernel": kind,
                                  "error": repr(err)[:300]})
                            continue
                        io = 2 * m * (k + n) if not kind.startswith("act") else 4 * m * k
                        wb = 0 if kind.startswith("act") else weight_bytes(kind, k, n)
                        emit({"part": "gemm", "shape": shape, "linear": lname, "k": k, "n": n, "m": m, "kernel": kind,
                              "ms": ms, "vs_fp16": fp16_ms / ms, "eager_ms": eager, "eager_vs_fp16": fp16_eager / eager,
                              "graph": kind not in ("w4a16-gemlite", "act-quant-torch"),
                              "floor_ms": (wb + io) / bw * 1e3})
                QuantLinear.lorc_mode = "addmm"
            del layers
            torch.cuda.empty_cache()


def eval_speed(model, tokens, seqlen, dev, batch, label: dict) -> dict:
    # warm-up over the same windows: every batch shape (the last one is smaller) seen once before timing
    perplexity(model, tokens, seqlen, dev, progress=False, eval_batch=batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    ppl = perplexity(model, tokens, seqlen, dev, progress=False, eval_batch=batch)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    row = {**label, "eval_batch": batch, "tokens_per_s": tokens.numel() // seqlen * seqlen / dt, "s": dt,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "ppl": ppl}
    emit(row)
    return row


def model_gib(model) -> float:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():  # gemlite keeps its packed tensors as plain attributes
        if isinstance(m, RealLinear) and hasattr(m, "gemlite"):
            for t in m.gemlite.get_tensor_args():
                if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel() > 1:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total / 2**30


def eval_part(shapes: list[str], windows: int) -> None:
    dev = torch.device("cuda")
    seqlen = 2048
    for shape in shapes:
        model = build_opt(shape, dev)
        tokens = torch.randint(0, 50272, (windows * seqlen,), generator=torch.Generator().manual_seed(0))
        big = default_eval_batch(model, seqlen, dev)
        lab = {"part": "eval", "shape": shape}
        base = {}
        for b in (1, big):
            base[b] = eval_speed(model, tokens, seqlen, dev, b, {**lab, "config": "fp16", "model_gib": model_gib(model)})
        layers = wrap_model(model)

        def rel(row):
            row["vs_fp16"] = row["tokens_per_s"] / base[row["eval_batch"]]["tokens_per_s"]
            emit({"part": "eval_ratio", "shape": shape, "config": row["config"], "eval_batch": row["eval_batch"],
                  "vs_fp16": row["vs_fp16"]})

        for name, wspec, aspec, rank in (("fake W4A16 g128", W4G, FP, 0), ("fake W4A8 g128", W4G, A8, 0),
                                          ("fake W8A8", W8R, A8, 0), ("fake W4A16 g128 + LoRC8", W4G, FP, 8)):
            rtn_with_grid(layers, wspec, aspec, lorc_rank=rank, svd=False)
            for b in (1, big):
                rel(eval_speed(model, tokens, seqlen, dev, b, {**lab, "config": name}))
            if aspec.enabled:  # before: the torch activation quantizer (15 launches + a sync per linear)
                supported = act_quant.supported
                act_quant.supported = lambda spec: False
                try:
                    rel(eval_speed(model, tokens, seqlen, dev, 1, {**lab, "config": name + " (torch act path)"}))
                finally:
                    act_quant.supported = supported
            if rank:
                QuantLinear.lorc_mode = "plain"
                rel(eval_speed(model, tokens, seqlen, dev, big, {**lab, "config": f"{name} (plain)"}))
                QuantLinear.lorc_mode = "addmm"
        for name, wspec, aspec, rank, backend in (
            ("real W4A16 g128", W4G, FP, 0, "tinygemm"),
            ("real W8A8", W8R, A8, 0, "tinygemm"), ("real W4A8 row (int8 path)", W4R, A8, 0, "tinygemm"),
            ("real W4A16 g128 + LoRC8", W4G, FP, 8, "tinygemm"),
        ):
            rtn_with_grid(layers, wspec, aspec, lorc_rank=rank, svd=False)
            try:
                summary, undo = swap_real(model, "real", dev, backend)
            except Exception as err:  # noqa: BLE001
                emit({**lab, "config": name, "error": repr(err)[:300]})
                continue
            try:
                for b in (1, big):
                    rel(eval_speed(model, tokens, seqlen, dev, b, {**lab, "config": name, "model_gib": model_gib(model)}))
            except Exception as err:  # noqa: BLE001
                emit({**lab, "config": name, "error": repr(err)[:300]})
            undo()
            del undo  # it holds the fp16 QuantLinears
        # packed W4 memory: convert, then drop the fp16 QuantLinears for good
        rtn_with_grid(layers, W4G, FP)
        swap_real(model, "real", dev, "tinygemm")
        for m in model.modules():  # each RealLinear remembers the nn.Linear it replaced (for a session's restore)
            if isinstance(m, RealLinear):
                object.__setattr__(m, "original", None)
        del layers
        gc.collect()
        torch.cuda.empty_cache()
        row = eval_speed(model, tokens, seqlen, dev, 1, {**lab, "config": "packed W4A16 only (fp16 weights freed)",
                                                          "model_gib": model_gib(model)})
        emit({"part": "memory", "shape": shape, "packed_w4_peak_vs_fp16": row["peak_gib"] / base[1]["peak_gib"],
              "packed_w4_model_vs_fp16": row["model_gib"] / base[1]["model_gib"]})
        del model
        gc.collect()
        torch.cuda.empty_cache()


def testbed_part() -> None:
    from ptqlab.data import eval_tokens, load_text
    from ptqlab.models import load_model

    dev = torch.device("cuda")
    model, tok = load_model("testbed-opt", torch.float16)
    model.to(dev)
    seqlen = 512
    tokens = eval_tokens(tok, load_text("heldout", "eval"), seqlen)
    lab = {"part": "testbed", "windows": tokens.numel() // seqlen}
    big = default_eval_batch(model, seqlen, dev)
    before = eval_speed(model, tokens, seqlen, dev, 1, {**lab, "config": "fp16"})
    after = eval_speed(model, tokens, seqlen, dev, big, {**lab, "config": "fp16"})
    layers = wrap_model(model)
    rtn_with_grid(layers, W4G, A8)
    act_quant.supported, supported = (lambda spec: False), act_quant.supported
    before8 = eval_speed(model, tokens, seqlen, dev, 1, {**lab, "config": "W4A8 (torch act path)"})
    act_quant.supported = supported
    after8 = eval_speed(model, tokens, seqlen, dev, big, {**lab, "config": "W4A8"})
    emit({"part": "testbed_speedup", "fp16": after["tokens_per_s"] / before["tokens_per_s"],
          "w4a8": after8["tokens_per_s"] / before8["tokens_per_s"]})


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="gemm,eval,testbed")
    p.add_argument("--shapes", default="opt-1.3b,opt-6.7b")
    p.add_argument("--windows", type=int, default=32, help="evaluation windows of 2048 tokens per timed run")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    open_output(a.out)
    parts = a.parts.split(",")
    shapes = a.shapes.split(",")
    bw = copy_bandwidth()
    emit({"part": "setup", "copy_bandwidth_tb_s": bw / 1e12, "torch": torch.__version__, "triton": triton.__version__})
    if "gemm" in parts:
        gemm_part(shapes, bw)
    if "testbed" in parts:
        testbed_part()
    if "eval" in parts:
        eval_part(shapes, a.windows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
