"""Greedy-decoding speed of FP16 and each real low-bit scheme on OPT shapes (random fp16 weights: speed only).

    python bench/bench_decode.py --shapes opt-1.3b,opt-6.7b --batches 1,16 --new 128 --out decode.jsonl

Per (shape, scheme, batch): a prompt of ``--prompt`` random tokens is prefilled into a static KV cache
(``StaticOPTDecoder``: the model's own modules over our own cache), then ``--new`` tokens are decoded greedily.
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
import time

import torch
from torch import nn

from kernel_common import SHAPES, build_opt, copy_bandwidth, emit, open_output, rtn_with_grid, swap_real, wrap_model
from ptqlab.kernels.real import RealLinear
from ptqlab.quantizers import QuantSpec

FP = QuantSpec()
SCHEMES = {
    # name: (weight spec, activation spec, LoRC rank)
    "fp16": (FP, FP, 0),
    "w4a16": (QuantSpec(4, True, 128), FP, 0),
    "w4a16-lorc8": (QuantSpec(4, True, 128), FP, 8),
    "w8a8": (QuantSpec(8, True, 0), QuantSpec(8, True, 0), 0),
    "w4a8": (QuantSpec(4, True, 0), QuantSpec(8, True, 0), 0),
    "w8a8-fp8": (QuantSpec(fmt="fp8"), QuantSpec(fmt="fp8"), 0),
}
def step_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step must read: the real kernels' read set (tinygemm's layout at small M, not
    the large-M one it also keeps), LoRC factors, biases, and every other parameter (tied LM head counted once)."""
    read_set = {"w4a16-tinygemm": ("w_packed", "scales_and_zeros"), "w8a8-int8": ("w_int8", "w_scale"),
                "w4a8-int8": ("w_int8", "w_scale"), "w4a16-triton": ("w_packed", "w_scale", "w_zero"),
                "w4a8-triton": ("w_packed", "w_scale"), "w8a8-triton": ("w_int8", "w_scale"),
                "w8a8-fp8": ("w_fp8", "w_scale")}
    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if t is None or t.data_ptr() in seen:
            return
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()

    for m in model.modules():
        if isinstance(m, RealLinear):
            for name in read_set[m.scheme]:
                add(getattr(m, name))
            for t in (m.bias, m.lorc_u, m.lorc_v):
                add(t)
        else:
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                add(t)
            for t in (getattr(m, "lorc_u", None), getattr(m, "lorc_v", None)):
                add(t)
    return total


class StaticOPTDecoder(nn.Module):
    """Greedy OPT decoding over a static KV cache, capturable in a CUDA graph.

    Why: transformers 5.x ``OPTDecoder`` asks its cache for ``get_seq_length()`` and derives positions on the
    host, a sync that a CUDA graph cannot capture.  This re-runs HF OPT's own modules (embeddings, layer norms,
    q/k/v/out_proj, fc1/fc2, lm_head: whatever ``nn.Module`` the bench swapped in is called as ``layer(x)``)
    with the same pre/post layer-norm logic, but the positions are a device tensor, k/v are written with
    ``index_copy_`` and attention runs over the whole cache with the unwritten slots masked: static shapes for
    a given (batch, tokens), no host sync, no branching on tensor values.  Inference only (no dropout).
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int) -> None:
        super().__init__()
        dec = model.model.decoder
        self.dec, self.lm_head = dec, model.lm_head
        self.pre_ln = model.config.do_layer_norm_before
        self.pos_offset: int = getattr(dec.embed_positions, "offset", 2)  # row of position p is p + 2
        attn = dec.layers[0].self_attn
        self.heads, self.head_dim, self.scaling = attn.num_heads, attn.head_dim, attn.scaling
        w = dec.embed_tokens.weight
        shape = (len(dec.layers), batch, self.heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v = torch.zeros_like(self.k)
        self.slots = torch.arange(max_len, device=w.device)

    def _attn(self, i: int, attn: nn.Module, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q = heads(attn.q_proj(x) * self.scaling)  # HF scales q before the product, then attends with scale 1
        self.k[i].index_copy_(2, pos, heads(attn.k_proj(x)))
        self.v[i].index_copy_(2, pos, heads(attn.v_proj(x)))
        o = nn.functional.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask, scale=1.0)
        return attn.out_proj(o.transpose(1, 2).reshape(b, t, -1))

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids [B, T] at positions pos [T] (device tensor) -> next-token logits of the last position [B, vocab]."""
        dec = self.dec
        x = dec.embed_tokens(ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        x = x + nn.functional.embedding(pos + self.pos_offset, dec.embed_positions.weight)
        mask = self.slots[None, :] <= pos[:, None]  # [T, max_len]: causal, and slots not yet written are masked
        for i, layer in enumerate(dec.layers):
            h = layer.self_attn_layer_norm(x) if self.pre_ln else x
            x = x + self._attn(i, layer.self_attn, h, pos, mask)
            if not self.pre_ln:
                x = layer.self_attn_layer_norm(x)
            shape = x.shape
            x = x.reshape(-1, shape[-1])  # HF runs the MLP on [B*T, hidden]
            h = layer.final_layer_norm(x) if self.pre_ln else x
            x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
            if not self.pre_ln:
                x = layer.final_layer_norm(x)
            x = x.view(shape)
        x = x[:, -1]
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        if dec.project_out is not None:
            x = dec.project_out(x)
        return self.lm_head(x)


def make_decoder(model: nn.Module, batch: int, prompt: int, new: int) -> tuple[StaticOPTDecoder, torch.Tensor]:
    """A decoder whose cache has room for the prompt, the new tokens and run_graph's warm-up/capture steps."""
    dev = model.model.decoder.embed_tokens.weight.device
    g = torch.Generator(device=dev).manual_seed(batch)
    ids = torch.randint(4, model.config.vocab_size, (batch, prompt), device=dev, generator=g)
    return StaticOPTDecoder(model, batch, prompt + new + 3), ids


@torch.no_grad()
def prefill(dec: StaticOPTDecoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the cache with the prompt: (first new token [B, 1], its position [1])."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    tok = dec(ids, pos).argmax(-1, keepdim=True)
    return tok, pos[-1:] + 1


@torch.no_grad()
def step(dec: StaticOPTDecoder, tok: torch.Tensor, pos: torch.Tensor) -> None:
    """One greedy step in place: tok <- argmax of the next-token logits, pos <- pos + 1."""
    tok.copy_(dec(tok, pos).argmax(-1, keepdim=True))
    pos.add_(1)


@torch.no_grad()
def run_eager(model, batch: int, prompt: int, new: int) -> tuple[float, torch.Tensor]:
    dec, ids = make_decoder(model, batch, prompt, new)
    tok, pos = prefill(dec, ids)
    out = []
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(new):
        step(dec, tok, pos)
        out.append(tok.clone())
    torch.cuda.synchronize()
    return time.perf_counter() - t, torch.cat(out, 1)


@torch.no_grad()
def run_graph(model, batch: int, prompt: int, new: int) -> tuple[float, torch.Tensor]:
    dec, ids = make_decoder(model, batch, prompt, new)
    tok, pos = prefill(dec, ids)
    tok0, pos0 = tok.clone(), pos.clone()
    # warm up on a side stream (allocator, autotuning), then capture one step
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step(dec, tok, pos)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(dec, tok, pos)
    # the warm-up wrote cache slots past the prompt: harmless, each replayed step overwrites its slot before the
    # mask unmasks it.  Start again from the prefill's state.
    tok.copy_(tok0)
    pos.copy_(pos0)
    out = torch.empty(batch, new, dtype=tok.dtype, device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(new):
        graph.replay()
        out[:, i:i + 1].copy_(tok)
    torch.cuda.synchronize()
    el = time.perf_counter() - t
    del graph
    return el, out


def bench_scheme(model, layers, originals, shape: str, scheme: str, batches: list[int], prompt: int, new: int,
                 bw: float, backend: str = "tinygemm") -> None:
    """``backend``: the kernel preference (ptqlab.kernels.real.PREFERENCES) the real layers are chosen with."""
    wspec, aspec, rank = SCHEMES[scheme]
    rtn_with_grid(layers, wspec, aspec, rank, originals=originals, svd=False)
    undo = None
    kernels = {}
    if scheme != "fp16":
        summary, undo = swap_real(model, "real", torch.device("cuda"), backend=backend)
        kernels = summary["real"]
    wbytes = step_bytes(model)
    hidden, n_layers, _, _ = SHAPES[shape]
    for batch in batches:
        torch.cuda.reset_peak_memory_stats()
        row = {"part": "decode", "shape": shape, "scheme": scheme, "kernels": kernels, "batch": batch,
               "prompt": prompt, "new_tokens": new}
        try:
            t_eager, toks_eager = run_eager(model, batch, prompt, new)
            row["eager_tok_s"] = round(batch * new / t_eager, 1)
            t_graph, toks_graph = run_graph(model, batch, prompt, new)
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
    ap.add_argument("--backend", default="tinygemm", help="kernel preference: triton, tinygemm or gemlite")
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
            bench_scheme(model, layers, originals, shape, scheme, batches, args.prompt, args.new, bw, args.backend)
        del model, layers, originals
        gc.collect()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
