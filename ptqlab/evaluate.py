"""Perplexity with the GPTQ reference protocol.

The split is tokenized once and cut into non-overlapping windows of
``seqlen`` tokens (the tail that does not fill a window is dropped);
perplexity is ``exp`` of the mean token negative log-likelihood over all
windows, each window predicting its tokens 2..seqlen.
"""

from __future__ import annotations

import math

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


def _window_nll(logits: torch.Tensor, ids: torch.Tensor, desc: str) -> float:
    """Mean NLL of tokens 2..seqlen of one window given its logits ``[1, seqlen, vocab]``."""
    nll = nn.functional.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="mean")
    if not torch.isfinite(nll):
        raise EvaluationError(f"{desc}: the model produced a non-finite loss ({nll.item()})")
    return nll.item()


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    device: str | torch.device = "cpu",
    max_windows: int | None = None,
    desc: str = "eval",
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on the 1-D token stream ``tokens`` (GPTQ protocol).

    ``max_windows`` limits evaluation to a prefix of the split (for quick
    checks and CI); the full protocol uses every window.
    """
    windows = eval_windows(tokens, seqlen, max_windows, desc)
    total_nll = 0.0
    for window in tqdm(windows, desc=desc, disable=not progress, leave=False):
        ids = window.unsqueeze(0).to(device)
        total_nll += _window_nll(model(input_ids=ids, use_cache=False).logits, ids[0], desc)
    return math.exp(total_nll / windows.shape[0])


@torch.no_grad()
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
    """The same perplexity, for a model that does not fit on the device: one block at a time.

    The hidden states of every window go through block 0, then block 1, ...
    (as the GPTQ reference evaluates large models); only one block, and at the
    end the final norm and LM head, are on the device at once.
    """
    from .models import get_adapter
    from .blockio import capture_block_inputs, run_block

    device = torch.device(device)
    adapter = get_adapter(model)
    windows = eval_windows(tokens, seqlen, max_windows, desc)
    inputs = capture_block_inputs(model, adapter, windows, device, batch_size)
    hidden = inputs.hidden
    for block in tqdm(adapter.blocks, desc=f"{desc} (offloaded)", disable=not progress, leave=False):
        block.to(device)
        hidden = run_block(block, hidden, inputs, out=hidden)
        block.to("cpu")
    tail = [*adapter.final_modules, adapter.lm_head]
    for m in tail:
        m.to(device)
    total_nll = 0.0
    try:
        for h, window in zip(hidden, windows):
            h = h.unsqueeze(0)
            for m in adapter.final_modules:
                h = m(h)
            total_nll += _window_nll(adapter.lm_head(h), window.to(device), desc)
    finally:
        for m in tail:
            m.to("cpu")
    return math.exp(total_nll / windows.shape[0])
