"""Shared set-up of bench_kernels.py, bench_decode.py and gpu_check_kernels.py: models of paper shapes, RTN with
the recorded integer grid (the QuantLinear contract: weight_scale/weight_zero), LoRC factors, real-kernel swaps,
the JSON-lines output and the measured copy bandwidth."""

from __future__ import annotations

import json
from typing import TextIO

import torch
from torch import nn

from ptqlab.kernels.real import select_kernels
from ptqlab.models import QuantLinear, get_adapter, wrap_linears
from ptqlab.quantizers import QuantSpec, quantize

OUT: TextIO | None = None  # where emit() appends its records, besides stdout (open_output)


def open_output(path: str | None) -> None:
    """Append emit()'s records to ``path`` too (None: stdout only)."""
    global OUT
    OUT = open(path, "a") if path else None


def emit(row: dict) -> None:
    """Print one record as a JSON line (with the GPU's name) and append it to the output file."""
    row["device"] = torch.cuda.get_device_name()
    line = json.dumps(row)
    print(line, flush=True)
    if OUT:
        OUT.write(line + "\n")
        OUT.flush()


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read and written (median of triton's do_bench)."""
    import triton

    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=100, return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)


SHAPES = {
    # name: (hidden, layers, heads, ffn)  OPT family, vocab 50272
    "opt-1.3b": (2048, 24, 32, 8192),
    "opt-6.7b": (4096, 32, 32, 16384),
}


def build_opt(shape: str, device: torch.device, layers: int | None = None) -> nn.Module:
    """An OPT model of the named shape with random fp16 weights (speed only, never quality)."""
    from transformers import AutoModelForCausalLM, OPTConfig

    hidden, n_layers, heads, ffn = SHAPES[shape]
    cfg = OPTConfig(hidden_size=hidden, num_hidden_layers=layers or n_layers, num_attention_heads=heads,
                    ffn_dim=ffn, vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=hidden)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    model.eval()
    model.config.use_cache = False
    return model


def wrap_model(model: nn.Module) -> list[QuantLinear]:
    adapter = get_adapter(model)
    out: list[QuantLinear] = []
    for i, block in enumerate(adapter.blocks):
        out.extend(wrap_linears(block, prefix=f"blocks.{i}.").values())
    return out


@torch.no_grad()
def rtn_with_grid(layers: list[QuantLinear], wspec: QuantSpec, aspec: QuantSpec, lorc_rank: int = 0,
                  originals: list[torch.Tensor] | None = None, svd: bool = True) -> None:
    """RTN of each layer's (original) weight, recording weight_scale/weight_zero.

    LoRC factors from the top singular pairs of the error (``svd``), or small random ones (speed runs).
    """
    for i, layer in enumerate(layers):
        w = originals[i] if originals is not None else layer.weight.data
        layer.act_spec = aspec
        layer.weight_spec = wspec
        if not wspec.enabled:
            layer.weight.data.copy_(w)
            layer.weight_scale = layer.weight_zero = None
            layer.set_lorc(None, None)
            continue
        q = quantize(w, wspec, layer.name)
        deq = q.dequantize()
        if lorc_rank and not svd:
            g = torch.Generator(device=w.device).manual_seed(i)
            layer.set_lorc(torch.randn(w.shape[0], lorc_rank, device=w.device, generator=g) * 1e-3,
                           torch.randn(lorc_rank, w.shape[1], device=w.device, generator=g) * 1e-3)
        elif lorc_rank:
            u, s, vh = torch.linalg.svd((w.float() - deq.float()), full_matrices=False)
            layer.set_lorc(u[:, :lorc_rank] * s[:lorc_rank], vh[:lorc_rank])
        else:
            layer.set_lorc(None, None)
        layer.weight.data.copy_(deq)
        layer.weight_scale, layer.weight_zero = q.scale.squeeze(-1), q.zero.squeeze(-1)


def swap_real(model: nn.Module, mode: str, device: torch.device, backend: str = "gemlite"):
    """Swap quantized layers for real kernels; returns (summary, undo) where undo() puts the QuantLinears back."""
    saved = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    summary = select_kernels(model, mode, device, w4a16_backend=backend)

    def undo() -> None:
        for name, layer in saved.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)

    return summary, undo
