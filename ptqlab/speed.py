"""Speed of a (quantized) model on a GPU: greedy decode tokens/s in a CUDA graph, prefill tokens/s, memory.

``ptqlab run --speed`` (with ``--kernel real``, or on an FP16 run) calls :func:`measure_speed` after the
evaluation; ``bench/bench_decode.py`` uses the same decoder on random weights of paper shapes.

Decode: a prompt of random tokens is prefilled into a static KV cache (:class:`StaticOPTDecoder`: the model's
own modules over our own cache), then tokens are decoded greedily.  One decode step (forward of one token per
sequence, argmax, position + 1) is captured once in a CUDA graph and replayed, so neither Python nor
kernel-launch overhead hides the kernels.  Prefill: one forward of a whole window into the cache.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


class SpeedError(ValueError):
    """A speed measurement that cannot run (no CUDA, a model family without a static decoder)."""


class StaticOPTDecoder(nn.Module):
    """Greedy OPT decoding over a static KV cache, capturable in a CUDA graph.

    Why: transformers 5.x ``OPTDecoder`` asks its cache for ``get_seq_length()`` and derives positions on the
    host, a sync that a CUDA graph cannot capture.  This re-runs HF OPT's own modules (embeddings, layer norms,
    q/k/v/out_proj, fc1/fc2, lm_head: whatever ``nn.Module`` was swapped in is called as ``layer(x)``)
    with the same pre/post layer-norm logic, but the positions are a device tensor, k/v are written with
    ``index_copy_`` and attention runs over the whole cache with the unwritten slots masked: static shapes for
    a given (batch, tokens), no host sync, no branching on tensor values.  Inference only (no dropout).

    ``fused`` (the default): what a serving engine fuses, so that the step's time is the kernels' and not their
    count: each residual add with the LayerNorm after it in one kernel (:func:`ptqlab.kernels.layer_norm.
    add_layer_norm`), q/k/v as one linear where the layers fuse (:func:`ptqlab.kernels.fuse.fuse_linears`;
    their weights become views of the fused one's, so memory does not grow), its output split into the scaled
    q and the KV cache's k and v by one kernel (:func:`ptqlab.kernels.kv_write.qkv_to_cache`), and the attention
    mask made additive once a step.  ``fused=False``: the model's modules one by one, as HF runs them.
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int, fused: bool = True) -> None:
        super().__init__()
        from .kernels.fuse import fuse_linears

        dec = model.model.decoder
        self.dec, self.lm_head = dec, model.lm_head
        self.pre_ln = model.config.do_layer_norm_before
        self.fused = fused
        self.pos_offset: int = getattr(dec.embed_positions, "offset", 2)  # row of position p is p + 2
        attn = dec.layers[0].self_attn
        self.heads, self.head_dim, self.scaling = attn.num_heads, attn.head_dim, attn.scaling
        # one q/k/v linear per layer where they fuse (None: that layer runs the three)
        self.qkv = [fuse_linears([a.q_proj, a.k_proj, a.v_proj]) if fused else None
                    for a in (layer.self_attn for layer in dec.layers)]
        w = dec.embed_tokens.weight
        shape = (len(dec.layers), batch, self.heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v = torch.zeros_like(self.k)
        self.slots = torch.arange(max_len, device=w.device)

    def _attn(self, i: int, attn: nn.Module, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from .kernels.kv_write import qkv_to_cache, write_cache

        b, t, _ = x.shape
        width = self.heads * self.head_dim
        if self.qkv[i] is not None and (attn.q_proj.out_features == attn.k_proj.out_features
                                        == attn.v_proj.out_features == width):
            # the q/k/v split, q's scaling and the two cache writes: one kernel (kernels.kv_write)
            q = qkv_to_cache(self.qkv[i](x), pos, self.k[i], self.v[i], self.heads, self.scaling)
        else:
            if self.qkv[i] is not None:
                q, k, v = self.qkv[i](x).split([attn.q_proj.out_features, attn.k_proj.out_features,
                                                attn.v_proj.out_features], dim=-1)
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = write_cache(q, k, v, pos, self.k[i], self.v[i], self.heads, self.scaling)
        o = nn.functional.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask, scale=1.0)
        return attn.out_proj(o.transpose(1, 2).reshape(b, t, -1))

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None,
                  ln: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, ln(x + delta)): one kernel when fused; ``ln`` None: no norm (OPT-350m has no final one)."""
        if self.fused and ln is not None:
            from .kernels.layer_norm import add_layer_norm

            return add_layer_norm(x, delta, ln)
        s = x if delta is None else x + delta
        return s, s if ln is None else ln(s)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids [B, T] at positions pos [T] (device tensor) -> next-token logits of the last position [B, vocab]."""
        dec = self.dec
        x = dec.embed_tokens(ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        x = x + nn.functional.embedding(pos + self.pos_offset, dec.embed_positions.weight)
        mask = self.slots[None, :] <= pos[:, None]  # [T, max_len]: causal, and slots not yet written are masked
        if self.fused:  # additive, once a step (a boolean mask is converted again by every layer's attention)
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        layers = dec.layers
        if self.pre_ln:
            # x: the residual stream; h: the normed input of the next sub-block (the add before it, fused)
            _, h = self._add_norm(x, None, layers[0].self_attn_layer_norm)
            for i, layer in enumerate(layers):
                x, h = self._add_norm(x, self._attn(i, layer.self_attn, h, pos, mask), layer.final_layer_norm)
                following = layers[i + 1].self_attn_layer_norm if i + 1 < len(layers) else dec.final_layer_norm
                x, h = self._add_norm(x, layer.fc2(layer.activation_fn(layer.fc1(h))), following)
        else:  # post-LN (OPT-350m): each add and the norm after it; the normed sum is the residual
            for i, layer in enumerate(layers):
                _, x = self._add_norm(x, self._attn(i, layer.self_attn, x, pos, mask), layer.self_attn_layer_norm)
                _, x = self._add_norm(x, layer.fc2(layer.activation_fn(layer.fc1(x))), layer.final_layer_norm)
            _, h = self._add_norm(x, None, dec.final_layer_norm)
        h = h[:, -1]
        if dec.project_out is not None:
            h = dec.project_out(h)
        return self.lm_head(h)


# model_type -> static decoder class (the families whose decode can be captured in a CUDA graph)
STATIC_DECODERS: dict[str, type[nn.Module]] = {"opt": StaticOPTDecoder}


def check_speed_model(model_type: str, model: str) -> None:
    """Refuse a model whose family has no static (graph-capturable) decoder yet."""
    if model_type not in STATIC_DECODERS:
        raise SpeedError(f"--speed: {model} is a {model_type} model; decode speed is measured for "
                         f"{', '.join(STATIC_DECODERS)} models only (a static-cache decoder per family, "
                         f"ptqlab.speed.STATIC_DECODERS)")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_decoder(model: nn.Module, batch: int, prompt: int, new: int,
                 fused: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """A decoder whose cache has room for the prompt, the new tokens and the graph's warm-up/capture steps,
    and a prompt of random tokens (seeded by the batch size).  ``fused``: see :class:`StaticOPTDecoder`."""
    dev = _device_of(model)
    g = torch.Generator(device=dev).manual_seed(batch)
    ids = torch.randint(4, model.config.vocab_size, (batch, prompt), device=dev, generator=g)
    return STATIC_DECODERS[model.config.model_type](model, batch, prompt + new + 3, fused), ids


@torch.no_grad()
def prefill(dec: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the cache with the prompt: (first new token [B, 1], its position [1])."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    tok = dec(ids, pos).argmax(-1, keepdim=True)
    return tok, pos[-1:] + 1


@torch.no_grad()
def step(dec: nn.Module, tok: torch.Tensor, pos: torch.Tensor) -> None:
    """One greedy step in place: tok <- argmax of the next-token logits, pos <- pos + 1."""
    tok.copy_(dec(tok, pos).argmax(-1, keepdim=True))
    pos.add_(1)


@torch.no_grad()
def run_eager(model: nn.Module, batch: int, prompt: int, new: int,
              fused: bool = True) -> tuple[float, torch.Tensor]:
    """Seconds of ``new`` greedy steps in a plain Python loop, and their tokens [batch, new]."""
    dec, ids = make_decoder(model, batch, prompt, new, fused)
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
def run_graph_repeats(model: nn.Module, batch: int, prompt: int, new: int,
                      repeats: int = 1, fused: bool = True) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of ``repeats`` greedy decodes of ``new`` tokens (one captured step replayed), each from
    the prefill's state, and the tokens of the last [batch, new]."""
    dec, ids = make_decoder(model, batch, prompt, new, fused)
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
    # mask unmasks it.  Every repeat starts again from the prefill's state.
    out = torch.empty(batch, new, dtype=tok.dtype, device=tok.device)
    times = []
    for _ in range(repeats):
        tok.copy_(tok0)
        pos.copy_(pos0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(new):
            graph.replay()
            out[:, i:i + 1].copy_(tok)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del graph
    return times, out


def run_graph(model: nn.Module, batch: int, prompt: int, new: int,
              fused: bool = True) -> tuple[float, torch.Tensor]:
    """Seconds of one graph-replayed greedy decode of ``new`` tokens, and its tokens."""
    times, out = run_graph_repeats(model, batch, prompt, new, 1, fused)
    return times[0], out


@torch.no_grad()
def prefill_seconds(model: nn.Module, tokens: int, repeats: int, fused: bool = True) -> list[float]:
    """Seconds of each of ``repeats`` prefills of one window of ``tokens`` into the static cache (after one
    warm-up prefill)."""
    dec, ids = make_decoder(model, 1, tokens, -3, fused)  # the cache holds exactly the window
    pos = torch.arange(tokens, device=ids.device)
    dec(ids, pos)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dec(ids, pos)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def decode_read_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step must read: the real kernels' read set (tinygemm's layout at small M, not
    the large-M one it also keeps), LoRC factors, biases, and every other parameter (tied LM head counted once)."""
    from .kernels.real import RealLinear

    read_set = {"w4a16-tinygemm": ("w_packed", "scales_and_zeros"), "w8a8-int8": ("w_int8", "w_scale"),
                "w4a8-int8": ("w_int8", "w_scale"), "w4a16-triton": ("w_packed", "w_scale", "w_zero"),
                "w4a8-triton": ("w_packed", "w_scale"), "w8a8-triton": ("w_int8", "w_scale"),
                "w8a8-fp8": ("w_fp8", "w_scale")}
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or t.data_ptr() in seen:
            return
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()

    for m in model.modules():
        if isinstance(m, RealLinear) and m.scheme in read_set:
            for name in read_set[m.scheme]:
                add(getattr(m, name))
            for t in (m.bias, m.lorc_u, m.lorc_v):
                add(t)
        elif isinstance(m, RealLinear):  # a backend without a known read set (gemlite): all it holds
            for t in _own_tensors(m):
                add(t)
        else:
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                add(t)
            for t in (getattr(m, "lorc_u", None), getattr(m, "lorc_v", None)):
                add(t)
    return total


def _own_tensors(m: nn.Module) -> list[torch.Tensor]:
    """A module's own tensors: parameters, buffers, plain tensor attributes (packed weights), and the tensor
    attributes of a plain object it holds (a kernel library's packed layer)."""
    out = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
    for v in vars(m).values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif not isinstance(v, nn.Module) and hasattr(v, "__dict__") and not isinstance(v, type):
            out += [t for t in vars(v).values() if isinstance(t, torch.Tensor)]
    return out


def resident_bytes(model: nn.Module, device: torch.device) -> int:
    """Bytes of every tensor the model holds on ``device`` (parameters, buffers and plain tensor attributes such
    as the real kernels' packed weights, :func:`_own_tensors`), each storage counted once: its memory there.
    The layers a real kernel replaced, kept for the session's restore, are not in the module tree: not counted."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        for t in _own_tensors(m):
            if t.device != device:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


@dataclass(frozen=True)
class SpeedSettings:
    """What :func:`measure_speed` times (the defaults are what ``--speed`` records)."""

    batches: tuple[int, ...] = (1, 16)
    prompt: int = 128  # tokens prefilled before decoding (capped to fit the model's positions)
    new: int = 64  # tokens decoded per timed repeat
    prefill: int = 2048  # tokens of the prefill window (capped to the model's positions)
    repeats: int = 5  # timed repeats after warm-up; the median is recorded
    fused: bool = True  # the decoder's fusions (add + LayerNorm, q/k/v): StaticOPTDecoder


def measure_speed(model: nn.Module, max_positions: int | None, settings: SpeedSettings = SpeedSettings()) -> dict:
    """Decode tokens/s per batch, prefill tokens/s, peak GPU memory while decoding and the model's bytes, of a
    model on a CUDA device (as it is: real kernels swapped in, or not).  Keys carry their units."""
    dev = _device_of(model)
    if dev.type != "cuda":
        raise SpeedError(f"--speed needs the model on a CUDA device (it is on {dev})")
    check_speed_model(model.config.model_type, type(model).__name__)
    limit = max_positions or 2048
    new = min(settings.new, limit // 2)
    prompt = max(1, min(settings.prompt, limit - new - 3))
    window = min(settings.prefill, limit)
    out: dict = {"prompt_tokens": prompt, "new_tokens": new, "prefill_tokens": window, "repeats": settings.repeats,
                 "decoder": "fused" if settings.fused else "plain"}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    for batch in settings.batches:
        times, _ = run_graph_repeats(model, batch, prompt, new, settings.repeats, settings.fused)
        out[f"decode_tok_s_b{batch}"] = batch * new / statistics.median(times)
        out[f"decode_ms_per_step_b{batch}"] = 1e3 * statistics.median(times) / new
    out["decode_peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    out["prefill_tok_s"] = window / statistics.median(prefill_seconds(model, window, settings.repeats,
                                                                      settings.fused))
    out["weight_bytes"] = resident_bytes(model, dev)
    out["decode_read_bytes"] = decode_read_bytes(model)
    return out
