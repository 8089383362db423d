"""``ptqlab run --model DIR`` for a saved quantized folder: load it, evaluate it, no re-quantization."""

from __future__ import annotations

import time

import torch

from ..data import eval_tokens, load_text
from ..evaluate import eval_windows
from .load import LoadError
from .registry import format_of


def _saved_reference(base: str, windows: torch.Tensor, dtype: torch.dtype, device: str, vocab: int, offload: bool,
                     eval_batch: int | None, progress: bool, desc: str):
    """The FP16 reference of the saved model's base model on these windows: the cached one, else the base
    model is loaded (it must be reachable: the folder or hub id the run quantized) for one pass."""
    from ..kld import get_reference, reference_key
    from ..models import load_model

    key = reference_key(base, windows, dtype, device, vocab)
    if key.path.is_file():
        return get_reference(None, windows, key, device)
    fp16, _ = load_model(base, dtype)
    if not offload:
        fp16.to(device)
    try:
        return get_reference(fp16, windows, key, device, offload, eval_batch, progress, desc)
    finally:
        del fp16


def evaluate_saved(directory: str, eval_names: tuple[str, ...], seqlen: int | None = None, device: str = "cpu",
                   dtype: str = "auto", max_eval_windows: int | None = None, data_dir: str | None = None,
                   progress: bool = True, offload: bool | None = None, verify: bool = True,
                   eval_batch: int | None = None, metrics: tuple[str, ...] = ("ppl",), tasks: tuple[str, ...] = (),
                   num_fewshot: int | None = None, limit: int | None = None, tasks_dir: str | None = None) -> dict:
    """The record of a saved model evaluated as loaded; ``ppl_at_save`` repeats the PPLs recorded when it was saved.

    ``seqlen`` defaults to the one the saved run used (else the model's maximum); ``verify`` checks the files
    against the sha256 digests recorded at save time. ``metrics`` with ``kld``: KL divergence against the base
    model the run quantized (its FP16 reference from the cache, else computed from that model); ``tasks``: lm-eval tasks
    (:mod:`ptqlab.tasks`). ``bits_per_weight`` is the saved record's, or computed
    from the loaded layers for folders saved without one (the Python API without a record, other tools).
    """
    from ..runtime import evaluate_splits, fits_on_device, resolve_dtype, versions
    from ..models import get_adapter
    from ..pipeline import model_bits_per_weight

    start = time.perf_counter()
    torch_dtype = resolve_dtype(dtype, device)
    fmt = format_of(directory)
    if fmt is None:
        raise LoadError(f"{directory}: not a saved quantized model of any known format")
    model, tokenizer, entry = fmt.load(directory, torch_dtype, verify=verify)
    load_time = time.perf_counter() - start
    saved = entry.get("record", {})
    saved_config = saved.get("config", {})
    if seqlen is None:
        seqlen = saved_config.get("seqlen") or get_adapter(model).max_seqlen or 2048
    if tokenizer is None:
        raise FileNotFoundError(f"{directory}: no tokenizer files; cannot tokenize the evaluation text")
    offload = offload if offload is not None else not fits_on_device(model, device)
    if tasks and offload:
        raise ValueError("--tasks scores the model on the device, and this one does not fit there (offloaded "
                         "evaluation); drop --tasks or --offload")
    base = saved_config.get("model")
    if "kld" in metrics and not base:
        raise ValueError(f"{directory}: --metrics kld compares with the model that was quantized, and this folder "
                         f"records none (saved without a ptqlab record)")
    texts, sources = {}, {}
    for name in eval_names:
        text = load_text(name, "eval", data_dir)
        sources[name] = text.source
        texts[name] = (eval_tokens(tokenizer, text, seqlen), text.source)
    references = {}
    if "kld" in metrics:
        from ..kld import vocab_size

        for name, (tokens, _) in texts.items():
            references[name] = _saved_reference(base, eval_windows(tokens, seqlen, max_eval_windows, name),
                                                torch_dtype, device, vocab_size(model), offload, eval_batch,
                                                progress, f"KL reference {name}")
    if not offload:
        model.to(device)
    t0 = time.perf_counter()
    ppl, window_nll, kld = evaluate_splits(model, texts, seqlen, max_eval_windows, device, offload, eval_batch,
                                           progress, references)
    task_scores = None
    if tasks:
        from ..tasks import evaluate_tasks

        task_scores = evaluate_tasks(model, tokenizer, tasks, num_fewshot, limit, tasks_dir, progress=progress)
    config = {"model": str(directory), "loaded": True, "eval": list(eval_names), "seqlen": seqlen,
              "max_eval_windows": max_eval_windows, "dtype": str(torch_dtype).replace("torch.", "")}
    if "kld" in metrics:
        config["metrics"] = list(metrics)
    if tasks:
        config.update(tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, tasks_dir=tasks_dir)
    return {
        "config": config,
        "name": f"{saved.get('name', 'saved model')} (loaded)",
        "ppl": ppl,
        **({"kld": kld} if kld else {}),
        **({"tasks": task_scores} if task_scores is not None else {}),
        "window_nll": window_nll,
        "ppl_at_save": saved.get("ppl", {}),
        "saved_config": saved_config,
        "bits_per_weight": saved.get("bits_per_weight", model_bits_per_weight(model)),
        "stored_bits_per_weight": entry.get("storage", {}).get("stored_bits_per_weight"),
        "time_s": time.perf_counter() - start,
        "timings": {"load": load_time, "eval": time.perf_counter() - t0},
        "data_sources": sources,
        "versions": versions(device, with_lm_eval=task_scores is not None),
    }
