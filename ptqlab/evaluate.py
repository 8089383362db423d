"""Perplexity with the GPTQ reference protocol.

The split is tokenized once and cut into non-overlapping windows of
``seqlen`` tokens (the tail that does not fill a window is dropped);
perplexity is ``exp`` of the mean token negative log-likelihood over all
windows, each window predicting its tokens 2..seqlen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm


class EvaluationError(ValueError):
    pass


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None, desc: str) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` of the stream; the tail that fills no window is dropped."""
    n_windows = tokens.numel() // seqlen
    if n_windows == 0:
        raise EvaluationError(f"{desc}: {tokens.numel()} tokens do not fill one window of {seqlen}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    return tokens[: n_windows * seqlen].reshape(n_windows, seqlen)


def _window_nlls(logits: torch.Tensor, ids: torch.Tensor, first: int, desc: str) -> torch.Tensor:
    """The mean NLL of tokens 2..seqlen of each window of a batch, ``[b]`` float64 on the device (no sync here).

    One window's logits are cast to float32 at a time, so the batch costs one float32 window, not ``b``.
    Then the one finiteness check of the batch (a single sync): the fused activation quantizer does not
    check its inputs, it turns a non-finite row into NaN, which ends up here.
    """
    nll = torch.stack([nn.functional.cross_entropy(logits[i, :-1].float(), ids[i, 1:], reduction="mean").double()
                       for i in range(ids.shape[0])])
    if not bool(torch.isfinite(nll.sum())):
        raise EvaluationError(
            f"{desc}: the model produced a non-finite loss in windows {first}..{first + ids.shape[0] - 1} "
            f"(NaN/Inf logits: a quantized layer's input held NaN or Inf, or the model overflowed its dtype)"
        )
    return nll


class WindowMetric(Protocol):
    """Something measured from the logits of every evaluation window (perplexity, KL divergence, ...)."""

    def add(self, first: int, logits: torch.Tensor, ids: torch.Tensor) -> None:
        """Take the logits ``[b, seqlen, vocab]`` of windows ``first..first+b-1`` (their ids ``[b, seqlen]``)."""

    def result(self) -> object: ...


class Perplexity:
    """The GPTQ protocol's perplexity: ``exp`` of the mean over windows of each window's mean token NLL;
    :attr:`window_nll` keeps the per-window NLLs (a paired comparison of two runs needs them)."""

    def __init__(self, desc: str = "eval") -> None:
        self.desc = desc
        self._nll: list[torch.Tensor] = []

    def add(self, first: int, logits: torch.Tensor, ids: torch.Tensor) -> None:
        self._nll.append(_window_nlls(logits, ids, first, self.desc))

    @property
    def window_nll(self) -> list[float]:
        return torch.cat(self._nll).cpu().tolist()

    def result(self) -> float:
        nll = torch.cat(self._nll)
        return math.exp(float(nll.sum()) / nll.numel())


def default_eval_batch(model: nn.Module, seqlen: int, device: str | torch.device) -> int:
    """Windows per forward: 1 on CPU; on CUDA as many as half the free memory holds (at most 64).

    Per window: the logits in the model dtype plus one float32 copy for the loss, and the largest
    transient activations (attention scores of all heads, twice; the FFN intermediate, a few times).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", 50272)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 32)
    hidden = getattr(cfg, "hidden_size", 4096)
    ffn = getattr(cfg, "ffn_dim", None) or getattr(cfg, "intermediate_size", None) or 4 * hidden
    per_window = seqlen * vocab * 2 + seqlen * seqlen * heads * 4 * 2 + seqlen * (ffn + 4 * hidden) * 2 * 4
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(64, (free // 2) // per_window)))


def batched_logits(model: nn.Module, windows: torch.Tensor, device: str | torch.device = "cpu",
                   eval_batch: int | None = None, desc: str = "eval",
                   progress: bool = True) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(first window, logits [b, seqlen, vocab], ids [b, seqlen])`` of the model on the device, ``eval_batch``
    windows per forward (default: :func:`default_eval_batch`)."""
    if eval_batch is None:
        eval_batch = default_eval_batch(model, windows.shape[1], device)
    if not isinstance(eval_batch, int) or eval_batch < 1:
        raise EvaluationError(f"{desc}: eval_batch must be a positive number of windows, got {eval_batch!r}")
    for first in tqdm(range(0, windows.shape[0], eval_batch), desc=desc, disable=not progress, leave=False,
                      unit="batch"):
        ids = windows[first : first + eval_batch].to(device)
        yield first, model(input_ids=ids, use_cache=False).logits, ids


def offloaded_logits(model: nn.Module, windows: torch.Tensor, device: str | torch.device = "cpu",
                     desc: str = "eval", progress: bool = True,
                     batch_size: int = 8) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The same stream, one window at a time, for a model that does not fit on the device: the hidden states
    of every window go through block 0, then block 1, ... (as the GPTQ reference evaluates large models);
    only one block, and at the end the final norm and LM head, are on the device at once."""
    from .blockio import capture_block_inputs, run_block
    from .models import get_adapter

    device = torch.device(device)
    adapter = get_adapter(model)
    inputs = capture_block_inputs(model, adapter, windows, device, batch_size)
    hidden = inputs.hidden
    for block in tqdm(adapter.blocks, desc=f"{desc} (offloaded)", disable=not progress, leave=False):
        block.to(device)
        hidden = run_block(block, hidden, inputs, out=hidden)
        block.to("cpu")
    yield from head_logits(adapter, hidden, windows, device)


def head_logits(adapter, hidden: torch.Tensor, windows: torch.Tensor,
                device: str | torch.device) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The logits of the last block's outputs ``hidden`` ``[n, seqlen, h]``, one window at a time: the final
    modules and the LM head on the device (the end of a block-by-block evaluation)."""
    tail = [*adapter.final_modules, adapter.lm_head]
    for m in tail:
        m.to(device)
    try:
        for i, (h, window) in enumerate(zip(hidden, windows)):
            h = h.unsqueeze(0)
            for m in adapter.final_modules:
                h = m(h)
            yield i, adapter.lm_head(h), window.unsqueeze(0).to(device)
    finally:
        for m in tail:
            m.to("cpu")


@torch.no_grad()
def evaluate_windows(model: nn.Module, windows: torch.Tensor, metrics: list[WindowMetric],
                     device: str | torch.device = "cpu", offload: bool = False, eval_batch: int | None = None,
                     desc: str = "eval", progress: bool = True, batch_size: int = 8) -> None:
    """One pass of the model over the windows, every metric fed from the same logits (so KL divergence costs
    no second forward). ``offload``: block by block (:func:`offloaded_logits`, ``batch_size`` windows per
    capture), else ``eval_batch`` windows per forward."""
    stream = offloaded_logits(model, windows, device, desc, progress, batch_size) if offload else \
        batched_logits(model, windows, device, eval_batch, desc, progress)
    for first, logits, ids in stream:
        for metric in metrics:
            metric.add(first, logits, ids)


def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    device: str | torch.device = "cpu",
    max_windows: int | None = None,
    desc: str = "eval",
    progress: bool = True,
    eval_batch: int | None = None,
) -> float:
    """Perplexity of ``model`` on the 1-D token stream ``tokens`` (GPTQ protocol).

    ``max_windows`` limits evaluation to a prefix of the split (for quick
    checks and CI); the full protocol uses every window.  ``eval_batch``
    windows go through the model in one forward (default: :func:`default_eval_batch`);
    the result is the same up to float rounding for any batch size.
    """
    ppl = Perplexity(desc)
    evaluate_windows(model, eval_windows(tokens, seqlen, max_windows, desc), [ppl], device, False, eval_batch, desc,
                     progress)
    return ppl.result()


def perplexity_offloaded(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    device: str | torch.device = "cpu",
    max_windows: int | None = None,
    desc: str = "eval",
    progress: bool = True,
    batch_size: int = 8,
) -> float:
    """The same perplexity, for a model that does not fit on the device: one block at a time
    (:func:`offloaded_logits`)."""
    ppl = Perplexity(desc)
    evaluate_windows(model, eval_windows(tokens, seqlen, max_windows, desc), [ppl], device, True, desc=desc,
                     progress=progress, batch_size=batch_size)
    return ppl.result()
