"""What a run needs from its machine, shared by a run (``experiment.py``) and the evaluation of a saved folder
(``export/evaluate_saved.py``): dtypes, the versions and device a record names, whether a model fits the GPU,
and the evaluation of every split in one pass. Kept apart so ``export/`` does not import the run."""

from __future__ import annotations

import platform

import torch
from torch import nn

from . import __version__
from .evaluate import Perplexity, eval_windows, evaluate_windows


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype '{dtype}'; choose auto, float16, bfloat16 or float32") from None


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()})"


def versions(device: str, with_lm_eval: bool = False) -> dict:
    import transformers

    out = {"ptqlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": device_name(device)}
    if with_lm_eval:
        from .tasks import lm_eval_version

        out["lm_eval"] = lm_eval_version()
    return out


def evaluate_splits(model: nn.Module, eval_data: dict[str, tuple[torch.Tensor, str]], seqlen: int,
                    max_windows: int | None, device: str, offload: bool, eval_batch: int | None, progress: bool,
                    references: dict | None = None) -> tuple[dict, dict, dict]:
    """``(ppl, window_nll, kld)`` per dataset, one pass of the model over each split's windows; KL divergence
    for the datasets that have a reference (:mod:`ptqlab.kld`)."""
    from .kld import KLDivergence

    ppl, window_nll, kld = {}, {}, {}
    for name, (tokens, _) in eval_data.items():
        desc = f"eval {name}"
        windows = eval_windows(tokens, seqlen, max_windows, desc)
        metrics = [Perplexity(desc)]
        if references and name in references:
            metrics.append(KLDivergence(references[name], device, desc))
        evaluate_windows(model, windows, metrics, device, offload, eval_batch, desc, progress)
        ppl[name], window_nll[name] = metrics[0].result(), metrics[0].window_nll
        if len(metrics) > 1:
            kld[name] = metrics[1].result()
    return ppl, window_nll, kld


def check_batch(windows: int | None, flag: str) -> None:
    """A batch size in windows (None: sized automatically) is at least one window."""
    if windows is not None and windows < 1:
        raise ValueError(f"{flag} must be at least 1 window, got {windows}")


def fits_on_device(model: torch.nn.Module, device: str, headroom: float = 0.7) -> bool:
    """Whether the whole model fits in ``headroom`` of the device's free memory (always true on the CPU)."""
    if not device.startswith("cuda"):
        return True
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size < headroom * free
