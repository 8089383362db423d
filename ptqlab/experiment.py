"""One quantization run end to end: load, calibrate, quantize, evaluate, record.

A :class:`ModelSession` keeps what is shared by every run on one model (the
full-precision weights, tokenized evaluation splits and calibration windows),
so sweeps pay for them once per model.  The model is held once: a run
quantizes it in place and the session restores the pristine weights of the
layers it replaced before the next run, reading them back from the
checkpoint's safetensors files (memory-mapped), so a study of N runs needs
the model's size in host memory, not twice that.
"""

from __future__ import annotations

import platform
import time
import warnings

import torch
from torch import nn

from . import __version__
from .config import RunSpec, config_hash
from .data import TOKENIZATION, DataError, calibration_windows, eval_tokens, load_text
from .evaluate import perplexity, perplexity_offloaded
from .export import save_quantized, stored_bits_per_weight
from .models import QuantLinear, get_adapter, load_model
from .pipeline import quantize_model
from .restore import PristineWeights
from .testbed import is_testbed_model

__all__ = ["ModelSession", "RunSpec", "run"]


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


def versions(device: str) -> dict:
    import transformers

    return {"ptqlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": device_name(device)}


def fits_on_device(model: torch.nn.Module, device: str, headroom: float = 0.7) -> bool:
    """Whether the whole model fits in ``headroom`` of the device's free memory (always true on the CPU)."""
    if not device.startswith("cuda"):
        return True
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size < headroom * free


class ModelSession:
    """A loaded model and the data its runs share (tokenized splits, calibration windows)."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "auto", data_dir: str | None = None,
                 progress: bool = True, offload: bool | None = None, calib_batch: int = 8,
                 calib_offload: bool = False) -> None:
        """``offload``: evaluate block by block (None: only when the model does not fit on the device).
        ``calib_batch``: windows per block forward while calibrating (bounds activation memory);
        ``calib_offload``: keep the calibration hidden states in CPU memory."""
        if calib_batch < 1:
            raise ValueError(f"calibration batch must be at least 1 window, got {calib_batch}")
        self.name, self.device, self.data_dir, self.progress = model, device, data_dir, progress
        self.calib_batch, self.calib_offload = calib_batch, calib_offload
        self.offload = offload
        self.dtype = resolve_dtype(dtype, device)
        self.dtype_name = dtype
        if not progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        t0 = time.perf_counter()
        self.model, self.tokenizer = load_model(model, self.dtype)
        self.pristine = PristineWeights(self.model, model)
        self.load_time = time.perf_counter() - t0
        self._dirty = False
        self.adapter = get_adapter(self.model)
        self._tokens: dict[tuple[str, int], tuple[torch.Tensor, str]] = {}
        self._calib: dict[tuple, tuple[torch.Tensor, str]] = {}

    def seqlen(self, requested: int | None) -> int:
        limit = self.adapter.max_seqlen
        if requested is None:
            return limit or 2048
        if requested < 2:
            raise DataError(f"seqlen must be at least 2, got {requested}")
        if limit is not None and requested > limit:
            raise DataError(f"seqlen {requested} is beyond the maximum of {self.name} ({limit} positions)")
        return requested

    def eval_tokens(self, dataset: str, seqlen: int) -> tuple[torch.Tensor, str]:
        key = (dataset, seqlen)
        if key not in self._tokens:
            text = load_text(dataset, "eval", self.data_dir)
            if text.name in ("heldout", "calibration") and not is_testbed_model(self.name):
                warnings.warn(f"'{dataset}' is the testbed models' own held-out text; {self.name} was not trained on its corpus")
            self._tokens[key] = (eval_tokens(self.tokenizer, text, seqlen), text.source)
        return self._tokens[key]

    def calibration(self, source: str, nsamples: int, seqlen: int, seed: int) -> tuple[torch.Tensor, str]:
        key = (source, nsamples, seqlen, seed)
        if key not in self._calib:
            self._calib[key] = calibration_windows(self.tokenizer, source, nsamples, seqlen, seed, self.data_dir)
        return self._calib[key]

    def fresh_model(self) -> nn.Module:
        """The model with its pristine weights, for one run to quantize in place."""
        if self._dirty:
            self.model.to("cpu")  # runs expect the model in host memory (one block at a time on the device)
            self.pristine.restore(self.model)
        self._dirty = True
        return self.model


def _warn_if_calibrating_on_eval(calib_source: str, eval_sources: dict[str, str]) -> None:
    for dataset, source in eval_sources.items():
        if source == calib_source or (source.startswith("local:") and calib_source == "file:" + source[6:]):
            warnings.warn(
                f"CALIBRATING ON THE EVALUATION SPLIT: calibration text {calib_source} is the {dataset} "
                f"evaluation text; its perplexity is optimistic",
                stacklevel=2,
            )


def run(spec: RunSpec, session: ModelSession | None = None, device: str = "cpu", data_dir: str | None = None,
        progress: bool = True, eval_batch: int | None = None, kernel: str = "fake", save: str | None = None) -> dict:
    """Run one experiment and return its JSON-ready record.

    ``eval_batch``: windows per evaluation forward (default sized from free GPU memory, 1 on CPU);
    ``kernel``: fake (dequantized weights), real (packed low-bit kernels, ptqlab.kernels.real) or auto;
    ``save``: also write the quantized model there (compressed-tensors folder, :func:`ptqlab.export.save_quantized`).
    """
    start = time.perf_counter()
    if save and kernel != "fake":
        raise ValueError("--save writes the quantized layers as they are before kernel selection: save with "
                         "--kernel fake (the default), then evaluate the saved folder with --kernel real")
    session = session or ModelSession(spec.model, device, spec.dtype, data_dir, progress)
    if session.name != spec.model or resolve_dtype(spec.dtype, session.device) != session.dtype:
        raise ValueError(f"run spec is for {spec.model} ({spec.dtype}) but the session holds {session.name} "
                         f"({session.dtype})")
    seqlen = session.seqlen(spec.seqlen)
    calib_seqlen = session.seqlen(spec.calib_seqlen or seqlen)
    eval_data = {name: session.eval_tokens(name, seqlen) for name in spec.eval}
    eval_sources = {name: src for name, (_, src) in eval_data.items()}

    calib_windows, calib_source = None, None
    if spec.config.needs_calibration:
        calib_windows, calib_source = session.calibration(spec.calib, spec.nsamples, calib_seqlen, spec.seed)
        _warn_if_calibrating_on_eval(calib_source, eval_sources)

    model = session.fresh_model()
    t0 = time.perf_counter()
    report = quantize_model(model, spec.config, calib_windows, session.device, progress, session.calib_batch,
                            session.calib_offload)
    quant_time = time.perf_counter() - t0
    report.calibration = calib_source

    offload = session.offload if session.offload is not None else not fits_on_device(model, session.device)
    evaluate = perplexity_offloaded if offload else perplexity
    if not offload:
        model.to(session.device)
    from .kernels.real import select_kernels

    kernels = select_kernels(model, kernel, session.device, offloaded=offload)
    eval_kwargs = {} if offload else {"eval_batch": eval_batch}
    t0 = time.perf_counter()
    ppl = {}
    for name, (tokens, _) in eval_data.items():
        ppl[name] = evaluate(model, tokens, seqlen, session.device, spec.max_eval_windows, f"eval {name}", progress,
                             **eval_kwargs)
    eval_time = time.perf_counter() - t0
    if not offload:
        model.to("cpu")

    config = spec.to_flat()
    config["seqlen"] = seqlen
    if spec.config.needs_calibration:
        config["calib_seqlen"] = calib_seqlen
    config["dtype"] = str(session.dtype).replace("torch.", "")
    record = {
        "config": config,
        "config_hash": config_hash(config),
        "name": spec.config.name(),
        "ppl": ppl,
        "bits_per_weight": report.bits_per_weight,
        "stored_bits_per_weight": stored_bits_per_weight(model),
        "time_s": time.perf_counter() - start,
        "timings": {"load": session.load_time, "quantize": quant_time, "eval": eval_time, **report.timings},
        "data_sources": {**eval_sources, **({"calibration": calib_source} if calib_source else {})},
        "layers": report.layers,
        "versions": versions(session.device),
        "eval_protocol": {"tokenization": TOKENIZATION},
        # memory settings: not part of the config (no effect beyond the float order of the Hessian sums)
        "execution": {"calib_batch": session.calib_batch, "calib_offload": session.calib_offload,
                      **({"eval_batch": eval_batch} if eval_batch is not None else {}),
                      **({"kernels": kernels} if kernel != "fake" else {})},
    }
    if save:
        record["saved_to"] = str(save)
        save_quantized(model, session.tokenizer, save, record)
    return record
