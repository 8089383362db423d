"""``ptqlab run --model DIR`` for a saved quantized folder: load it, evaluate it, no re-quantization."""

from __future__ import annotations

import time

import torch

from ..data import eval_tokens, load_text
from ..evaluate import perplexity, perplexity_offloaded
from .load import load_quantized


def evaluate_saved(directory: str, eval_names: tuple[str, ...], seqlen: int | None = None, device: str = "cpu",
                   dtype: str = "auto", max_eval_windows: int | None = None, data_dir: str | None = None,
                   progress: bool = True, offload: bool | None = None, verify: bool = True,
                   eval_batch: int | None = None) -> dict:
    """The record of a saved model evaluated as loaded; ``ppl_at_save`` repeats the PPLs recorded when it was saved.

    ``seqlen`` defaults to the one the saved run used (else the model's maximum); ``verify`` checks the files
    against the sha256 digests recorded at save time. ``bits_per_weight`` is the saved record's, or computed
    from the loaded layers for folders saved without one (the Python API without a record, other tools).
    """
    from ..experiment import fits_on_device, resolve_dtype, versions
    from ..models import get_adapter
    from ..pipeline import model_bits_per_weight

    start = time.perf_counter()
    torch_dtype = resolve_dtype(dtype, device)
    model, tokenizer, entry = load_quantized(directory, torch_dtype, verify=verify)
    load_time = time.perf_counter() - start
    saved = entry.get("record", {})
    saved_config = saved.get("config", {})
    if seqlen is None:
        seqlen = saved_config.get("seqlen") or get_adapter(model).max_seqlen or 2048
    if tokenizer is None:
        raise FileNotFoundError(f"{directory}: no tokenizer files; cannot tokenize the evaluation text")
    offload = offload if offload is not None else not fits_on_device(model, device)
    evaluate = perplexity_offloaded if offload else perplexity
    if not offload:
        model.to(device)
    eval_kwargs = {} if offload else {"eval_batch": eval_batch}
    ppl, sources = {}, {}
    t0 = time.perf_counter()
    for name in eval_names:
        text = load_text(name, "eval", data_dir)
        sources[name] = text.source
        ppl[name] = evaluate(model, eval_tokens(tokenizer, text, seqlen), seqlen, device, max_eval_windows,
                             f"eval {name}", progress, **eval_kwargs)
    config = {"model": str(directory), "loaded": True, "eval": list(eval_names), "seqlen": seqlen,
              "max_eval_windows": max_eval_windows, "dtype": str(torch_dtype).replace("torch.", "")}
    return {
        "config": config,
        "name": f"{saved.get('name', 'saved model')} (loaded)",
        "ppl": ppl,
        "ppl_at_save": saved.get("ppl", {}),
        "saved_config": saved_config,
        "bits_per_weight": saved.get("bits_per_weight", model_bits_per_weight(model)),
        "stored_bits_per_weight": entry.get("storage", {}).get("stored_bits_per_weight"),
        "time_s": time.perf_counter() - start,
        "timings": {"load": load_time, "eval": time.perf_counter() - t0},
        "data_sources": sources,
        "versions": versions(device),
    }
