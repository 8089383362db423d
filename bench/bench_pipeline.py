"""Time each phase of quantization on model shapes of the paper (random weights: timing only).

    python bench/bench_pipeline.py --shape opt-125m --methods rtn,gptq,gptq+lorc,zq-local,zq-global
    python bench/bench_pipeline.py --shape opt-6.7b-block --methods gptq
    python bench/bench_pipeline.py --shape opt-1.3b --methods gptq --nsamples 32 --mem-cap-gb 1.5 --batch-size 2

Prints one JSON line per method: phase timings (capture, hessian, solve, lorc,
propagate, targets), end-to-end quantization time after model load, and peak
GPU memory.  See bench/README.md for measured numbers.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time

import torch

from ptqlab import QuantConfig, QuantSpec
from ptqlab.pipeline import quantize_model

SHAPES = {
    # name: (family, hidden, layers, heads, ffn, vocab)
    "opt-125m": ("opt", 768, 12, 12, 3072, 50272),
    "opt-1.3b": ("opt", 2048, 24, 32, 8192, 50272),
    "opt-6.7b-block": ("opt", 4096, 1, 32, 16384, 50272),
    "bloom-560m": ("bloom", 1024, 24, 16, 4096, 250880),
}


def build(shape: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BloomConfig, OPTConfig

    family, hidden, layers, heads, ffn, vocab = SHAPES[shape]
    if family == "opt":
        cfg = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                        vocab_size=vocab, max_position_embeddings=2048, word_embed_proj_dim=hidden)
    else:
        cfg = BloomConfig(hidden_size=hidden, n_layer=layers, n_head=heads, vocab_size=vocab)
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init is slow on the CPU; the model then lives on the CPU as usual
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    model = model.cpu()
    torch.cuda.empty_cache()
    model.eval()
    model.config.use_cache = False
    return model


def cap_gpu_memory(gib: float, device: torch.device) -> None:
    """Let this process allocate at most ``gib`` GiB on ``device`` (the caching allocator's limit)."""
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / torch.cuda.get_device_properties(device).total_memory, device)


def method_config(name: str, wbits: int, wgroup: int) -> QuantConfig:
    spec = QuantSpec(wbits, True, wgroup)
    lorc = 8 if name.endswith("+lorc") else 0
    return QuantConfig(method=name.removesuffix("+lorc"), weight=spec, lorc_rank=lorc)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="opt-125m")
    p.add_argument("--methods", default="rtn,gptq,gptq+lorc,zq-local,zq-global")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--wgroup", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mem-cap-gb", type=float, default=None, help="cap this process's GPU memory (set_per_process_memory_fraction)")
    p.add_argument("--calib-offload", action="store_true", help="keep calibration hidden states in CPU memory")
    p.add_argument("--compare-uncapped", action="store_true",
                   help="with --mem-cap-gb: quantize again without the cap and compare the weights")
    p.add_argument("--torch-gptq", action="store_true", help="use the per-column torch loop instead of the Triton kernel")
    a = p.parse_args()

    device = torch.device("cuda", 0)
    t0 = time.perf_counter()
    model = build(a.shape)
    n_params = sum(p.numel() for p in model.parameters())
    model_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"# built {a.shape}: {n_params / 1e6:.1f}M parameters, {model_gb:.2f} GiB fp16, {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    if a.mem_cap_gb:
        cap_gpu_memory(a.mem_cap_gb, device)
        try:  # show that the whole model does not fit under the cap
            copy.deepcopy(model).to(device)
            whole_model_fits = True
        except torch.OutOfMemoryError:
            whole_model_fits = False
        gc.collect()  # the traceback's frames keep the half-moved copy alive until collected
        torch.cuda.empty_cache()
        print(f"# GPU memory capped at {a.mem_cap_gb} GiB; whole model fits under the cap: {whole_model_fits}",
              file=sys.stderr)
    if a.torch_gptq:
        import ptqlab.methods.gptq as gptq_mod

        gptq_mod._triton_block = lambda: None
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (a.nsamples, a.seqlen), generator=gen)

    # warm-up (cuBLAS handles, Triton JIT of the GPTQ kernel) on a 1-block copy, so timings are steady state
    warm = copy.deepcopy(model)
    from ptqlab.models import get_adapter

    del get_adapter(warm).blocks[1:]
    try:
        quantize_model(warm, method_config("gptq", a.wbits, a.wgroup), calib[:8], device, progress=False,
                       batch_size=a.batch_size)
    except torch.OutOfMemoryError:
        print("# warm-up ran out of memory under the cap (the timed runs below say where)", file=sys.stderr)
    del warm
    gc.collect()
    torch.cuda.empty_cache()

    for name in a.methods.split(","):
        m = copy.deepcopy(model)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        row = {
            "shape": a.shape, "method": name, "wbits": a.wbits, "wgroup": a.wgroup, "nsamples": a.nsamples,
            "seqlen": a.seqlen, "batch_size": a.batch_size,
            "calib_offload": a.calib_offload, "gptq_kernel": "torch" if a.torch_gptq else "triton",
        }
        try:
            report = quantize_model(m, method_config(name, a.wbits, a.wgroup), calib, device, progress=False,
                                    batch_size=a.batch_size, offload_activations=a.calib_offload)
        except torch.OutOfMemoryError as err:  # report it (under --mem-cap-gb this is the point) and go on
            row.update(error=str(err), peak_gpu_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
                       mem_cap_gib=a.mem_cap_gb, device=torch.cuda.get_device_name(device))
            print(json.dumps(row), flush=True)
            del m
            gc.collect()
            torch.cuda.empty_cache()
            continue
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        row.update({
            "quantize_s": round(elapsed, 3), "phases_s": {k: round(v, 3) for k, v in report.timings.items()},
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "model_gib": round(model_gb, 3), "mem_cap_gib": a.mem_cap_gb, "device": torch.cuda.get_device_name(device),
            "torch": torch.__version__,
        })
        print(json.dumps(row), flush=True)
        if a.compare_uncapped and a.mem_cap_gb:
            compare_uncapped(model, m, name, a, calib, device)
        del m
        torch.cuda.empty_cache()
    return 0


@torch.no_grad()
def compare_uncapped(model, capped, name: str, a: argparse.Namespace, calib: torch.Tensor, device) -> None:
    """Quantize again without the cap, hidden states on the GPU, and count the weights that agree with the capped run."""
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    free = copy.deepcopy(model)
    quantize_model(free, method_config(name, a.wbits, a.wgroup), calib, device, progress=False, batch_size=a.batch_size)
    from ptqlab.models import QuantLinear

    def weights(model):  # effective weights (Q + U V: the LoRC factors' signs are a convention)
        return [m.effective_weight() for m in model.modules() if isinstance(m, QuantLinear)]

    equal = total = 0
    worst = 0.0
    for p, q in zip(weights(capped), weights(free)):
        equal += int(torch.isclose(p.float(), q.float(), rtol=1e-3, atol=1e-5).sum())
        total += p.numel()
        worst = max(worst, float((p.float() - q.float()).abs().max()))
    print(json.dumps({"shape": a.shape, "method": name, "capped_vs_uncapped_equal_fraction": round(equal / total, 6),
                      "max_abs_diff": worst}), flush=True)
    cap_gpu_memory(a.mem_cap_gb, device)


if __name__ == "__main__":
    sys.exit(main())
