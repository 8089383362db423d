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
    n_windows = tokens.numel() // seqlen
    if n_windows == 0:
        raise EvaluationError(f"{desc}: {tokens.numel()} tokens do not fill one window of {seqlen}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = tokens[: n_windows * seqlen].reshape(n_windows, seqlen)
    total_nll = 0.0
    for window in tqdm(windows, desc=desc, disable=not progress, leave=False):
        ids = window.unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="mean")
        if not torch.isfinite(nll):
            raise EvaluationError(f"{desc}: the model produced a non-finite loss ({nll.item()})")
        total_nll += nll.item()
    return math.exp(total_nll / n_windows)
