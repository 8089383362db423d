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

import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .config import RunSpec, config_hash
from .distributed import SINGLE, Distributed, tensor_digest
from .data import TOKENIZATION, DataError, calibration_windows, check_available, eval_tokens, load_text
from .evaluate import Perplexity, eval_windows, evaluate_windows
from .kernels.real import KERNEL_MODES
from .export import save_quantized, stored_bits_per_weight
from .models import QuantLinear, get_adapter, load_model, max_positions, model_config
from .preflight import available_memory, check_writable_folder, gib
from .pipeline import quantize_model
from .restore import PristineWeights
from .testbed import is_testbed_model
from .runtime import (check_batch, device_name, evaluate_splits, fits_on_device, resolve_dtype,  # noqa: F401
                      versions)

__all__ = ["ModelSession", "RunSpec", "check_run", "run"]



class ModelSession:
    """A loaded model and the data its runs share (tokenized splits, calibration windows)."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "auto", data_dir: str | None = None,
                 progress: bool = True, offload: bool | None = None, calib_batch: int = 8,
                 calib_offload: bool = False) -> None:
        """``offload``: evaluate block by block (None: only when the model does not fit on the device).
        ``calib_batch``: windows per block forward while calibrating (bounds activation memory);
        ``calib_offload``: keep the calibration hidden states in CPU memory."""
        check_batch(calib_batch, "--calib-batch")
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
        self._transformed = False
        self.adapter = get_adapter(self.model)
        self._tokens: dict[tuple[str, int], tuple[torch.Tensor, str]] = {}
        self._calib: dict[tuple, tuple[torch.Tensor, str]] = {}
        self._fingerprint: str | None = None

    def seqlen(self, requested: int | None) -> int:
        return resolve_seqlen(requested, self.adapter.max_seqlen, self.name)

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

    def kld_reference(self, model: nn.Module, windows: torch.Tensor, offload: bool, eval_batch: int | None = None,
                      progress: bool = True, desc: str = "KL reference"):
        """The FP16 reference of these windows (:mod:`ptqlab.kld`): from the disk cache, else one pass of
        ``model``, which must be the pristine one (:meth:`fresh_model`, before it is quantized)."""
        from .kld import get_reference, reference_key, vocab_size
        from .study.recipe import model_fingerprint

        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.name)
        key = reference_key(self.name, windows, self.dtype, self.device, vocab_size(model), self._fingerprint)
        if key.path.is_file():
            return get_reference(model, windows, key, self.device)
        if not offload:
            model.to(self.device)
        try:
            return get_reference(model, windows, key, self.device, offload, eval_batch, progress, desc)
        finally:
            if not offload:
                model.to("cpu")

    def block_stream(self, spec: RunSpec, eval_data: dict, seqlen: int, save: str | None):
        """Where a run's blocks come from and go (:class:`ptqlab.pipeline.BlockStream`): None, they are in the
        model in host memory; a streamed session's (:mod:`ptqlab.streaming`) reads and writes them one by one."""
        return None

    def fresh_model(self, transformed: bool = False) -> nn.Module:
        """The model with its pristine weights, for one run to quantize in place; ``transformed``: that run
        also changes parameters outside the block linears (a transform), so the next restore reloads them all."""
        if self._dirty:
            self.model.to("cpu")  # runs expect the model in host memory (one block at a time on the device)
            if self._transformed and self.pristine.unrestorable:  # no file to restore them from: load again
                self.model, self.tokenizer = load_model(self.name, self.dtype)
                self.pristine = PristineWeights(self.model, self.name)
                self.adapter = get_adapter(self.model)
            else:
                self.pristine.restore(self.model, everything=self._transformed)
        self._dirty = True
        self._transformed = transformed
        return self.model


def resolve_seqlen(requested: int | None, limit: int | None, model: str) -> int:
    """The window a run uses: ``requested``, or the model's maximum ``limit`` (2048 where it has none)."""
    if requested is None:
        return limit or 2048
    if requested < 2:
        raise DataError(f"seqlen must be at least 2, got {requested}")
    if limit is not None and requested > limit:
        raise DataError(f"seqlen {requested} is beyond the maximum of {model} ({limit} positions)")
    return requested


# Copies of the calibration hidden states alive at the peak: the captured batches and their concatenation
# (blockio.capture_block_inputs), or the states and the full-precision targets of ZQ (pipeline._quantize_block).
_HIDDEN_COPIES = 2


def check_calibration_memory(nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype, device: str,
                             calib_offload: bool = False) -> None:
    """Refuse a calibration whose hidden states (``nsamples x seqlen x hidden`` in ``dtype``) cannot fit
    where they are kept: on the GPU, or in host memory on the CPU or with ``calib_offload``."""
    on_gpu = device.startswith("cuda") and not calib_offload
    where = device if on_gpu else "cpu"
    free = available_memory(where)
    per_window = _HIDDEN_COPIES * seqlen * hidden * torch.finfo(dtype).bits // 8
    need = nsamples * per_window
    if free is None or need <= free:
        return
    fit = free // per_window
    if on_gpu:
        host = available_memory("cpu")
        ways = (f"lower --nsamples ({fit} windows fit) or --calib-seqlen, or keep the hidden states in host "
                f"memory with --calib-offload" + (f" ({gib(host)} free there)" if host is not None else ""))
    else:
        ways = (f"lower --nsamples ({fit} windows fit) or --calib-seqlen"
                + ("" if device.startswith("cuda") else "; --calib-offload cannot help, the CPU keeps them in "
                                                         "host memory already"))
    raise ValueError(f"calibration needs about {gib(need)} of {'GPU ' + device if on_gpu else 'host'} memory for "
                     f"the hidden states of {nsamples} windows x {seqlen} tokens x {hidden} hidden units "
                     f"({str(dtype).replace('torch.', '')}, {_HIDDEN_COPIES} copies), but {gib(free)} is free: "
                     f"{ways} (--calib-batch bounds only the activations of one block forward on top of them)")


def _model_folder(model: str) -> Path | None:
    from .testbed import resolve_model_path

    try:
        folder = Path(resolve_model_path(model)).expanduser()
    except FileNotFoundError:
        return None
    return folder.resolve() if folder.is_dir() else None


def check_save(spec: RunSpec, save: str | None, overwrite: bool = False, kernel: str = "fake") -> None:
    """Whether ``save`` can receive this run's quantized model; refused now, not after the run."""
    if not save:
        if overwrite:
            raise ValueError("--overwrite replaces the folder of --save; give --save DIR")
        return
    if kernel != "fake":
        raise ValueError("--save writes the quantized layers as they are before kernel selection: save with "
                         "--kernel fake (the default), then evaluate the saved folder with --kernel real")
    if not spec.config.weight.enabled:
        raise ValueError(f"--save: {spec.config.name()} leaves the weights unquantized; there is no quantized "
                         f"model to save")
    from .export.checkpoint import ExportError, scheme_for

    try:  # a (weight, activation) pair no compressed-tensors format carries is refused before the run
        scheme_for(spec.config.weight, spec.config.act, ["Linear"])
    except ExportError as err:
        raise ValueError(f"--save: {err}") from None
    check_writable_folder(save, "--save")
    target = Path(save).expanduser()
    source = _model_folder(spec.model)
    if source is not None and (target.resolve() == source or target.resolve() in source.parents):
        raise ValueError(f"--save {save} would replace the model folder {source} that the run reads")
    if target.is_dir() and any(target.iterdir()):
        from .export import format_of

        if not overwrite:
            raise ValueError(f"--save: {save} already exists and is not empty; pass --overwrite to replace it")
        if format_of(target) is None:
            # --overwrite deletes the folder: only one that --save wrote, never any folder named by mistake
            raise ValueError(f"--save: {save} holds files that are not a saved quantized model; --overwrite "
                             f"replaces only a folder written by --save")


def check_execution(spec: RunSpec, device: str, eval_batch: int | None = None, kernel: str = "fake",
                    save: str | None = None, overwrite: bool = False, offload: bool | None = None,
                    calib_batch: int = 8) -> None:
    """The checks of a run's execution settings (no model needed): batches, kernels, the save folder."""
    check_batch(eval_batch, "--eval-batch")
    check_batch(calib_batch, "--calib-batch")
    if kernel not in KERNEL_MODES:
        raise ValueError(f"unknown kernel mode {kernel!r}; choose one of {', '.join(KERNEL_MODES)}")
    floats = [f"--{p}fmt {s.fmt}" for p, s in (("w", spec.config.weight), ("a", spec.config.act))
              if s.enabled and s.is_float]
    if kernel == "real" and floats:
        from .kernels.real import available_kernels, kernel_for

        if kernel_for(spec.config.weight, spec.config.act) is None:
            raise ValueError(f"--kernel real: no real kernel runs {' / '.join(floats)} by default (of the float "
                             f"formats only FP8 weights per channel with FP8 activations per token have one, "
                             f"w8a8-fp8: ptqlab.kernels.real; {available_kernels()}); use --kernel fake, or "
                             f"auto (float layers stay fake)")
    if kernel == "real" and (not device.startswith("cuda") or offload):
        from .kernels.real import available_kernels

        raise ValueError(f"--kernel real needs the model on a CUDA device (got {device}"
                         f"{', offloaded evaluation' if offload else ''}); use --kernel fake or auto. Real kernels "
                         f"exist for: {available_kernels()}")
    check_speed(spec, device, kernel, offload)
    check_save(spec, save, overwrite, kernel)


def check_speed(spec: RunSpec, device: str, kernel: str = "fake", offload: bool | None = None,
                hf_config=None) -> None:
    """``--speed`` times the model on a GPU as it runs: the real low-bit kernels (an FP16 run as it is), the
    whole model on the device, of a family with a static-cache decoder (``hf_config``: checked when given)."""
    if not spec.speed:
        return
    if not device.startswith("cuda"):
        raise ValueError(f"--speed times decoding on a CUDA GPU (got --device {device}); drop --speed, or run on "
                         f"a GPU")
    quantizes = spec.config.weight.enabled or spec.config.act.enabled
    if quantizes and kernel != "real":
        raise ValueError(f"--speed times the real low-bit kernels: {spec.config.name()} needs --kernel real (got "
                         f"--kernel {kernel}; fake quantization runs fp16 matmuls, its speed says nothing about the "
                         f"scheme). Only an unquantized run (--method fp16) is timed without it")
    if offload:
        raise ValueError("--speed times the whole model on the GPU: drop --offload")
    if hf_config is not None:
        from .speed import check_speed_model

        check_speed_model(hf_config.model_type, spec.model)


def window_lengths(spec: RunSpec, hf_config) -> tuple[int, int]:
    """``(seqlen, calib_seqlen)`` of a run on a model with this Hugging Face config."""
    limit = max_positions(hf_config)
    seqlen = resolve_seqlen(spec.seqlen, limit, spec.model)
    return seqlen, resolve_seqlen(spec.calib_seqlen or seqlen, limit, spec.model)


def _check_sizes(spec: RunSpec, hf_config, device: str, calib_offload: bool) -> tuple[int, int]:
    """``(seqlen, calib_seqlen)`` of a run on a model with this Hugging Face config, and the memory its
    calibration needs checked."""
    seqlen, calib_seqlen = window_lengths(spec, hf_config)
    hidden = getattr(hf_config, "hidden_size", None)
    if spec.config.needs_calibration and isinstance(hidden, int):
        check_calibration_memory(spec.nsamples, calib_seqlen, hidden, resolve_dtype(spec.dtype, device), device,
                                 calib_offload)
    return seqlen, calib_seqlen


def check_transform(spec: RunSpec, hf_config, save: str | None = None) -> None:
    """The run's transform against the model's family (and, with ``save``, against what a checkpoint holds)."""
    from .models import MAPPINGS
    from .transforms import check_transform_model

    config = spec.config
    if config.transform == "none":
        return
    check_transform_model(config, hf_config, spec.model)
    if save and config.transform == "rotate":
        if config.options.rotate.online:
            raise ValueError("--save: the rotation's online Hadamard (on the MLP down-projection input) is not "
                             "written to checkpoints yet (transformers would not apply it on load); save with "
                             "--no-rotate-online, or evaluate without --save")
        if MAPPINGS[hf_config.model_type].layer_norm:
            raise ValueError(f"--save: rotating {spec.model} ({hf_config.model_type}) folds its final LayerNorm "
                             f"into the LM head, with a bias that {hf_config.model_type} checkpoints cannot hold; "
                             f"rotated models save for the RMSNorm families (Llama, Mistral, Qwen2)")


def check_run(spec: RunSpec, device: str, data_dir: str | None = None, eval_batch: int | None = None,
              kernel: str = "fake", save: str | None = None, overwrite: bool = False, offload: bool | None = None,
              calib_batch: int = 8, calib_offload: bool = False) -> None:
    """Everything about a run that can be checked before its model is loaded: the execution settings, the
    model's name and config (window lengths, calibration memory) and that its texts can be read."""
    check_execution(spec, device, eval_batch, kernel, save, overwrite, offload, calib_batch)
    hf_config = model_config(spec.model)
    check_speed(spec, device, kernel, offload, hf_config)
    check_transform(spec, hf_config, save)
    _check_sizes(spec, hf_config, device, calib_offload)
    if spec.tasks:
        from .tasks import check_tasks

        check_tasks(spec.tasks, spec.tasks_dir)
    for name in spec.eval:
        check_available(name, "eval", data_dir)
    if spec.config.needs_calibration:
        check_available(spec.calib, "calib", data_dir)


def _warn_if_calibrating_on_eval(calib_source: str, eval_sources: dict[str, str]) -> None:
    for dataset, source in eval_sources.items():
        if source == calib_source or (source.startswith("local:") and calib_source == "file:" + source[6:]):
            warnings.warn(
                f"CALIBRATING ON THE EVALUATION SPLIT: calibration text {calib_source} is the {dataset} "
                f"evaluation text; its perplexity is optimistic",
                stacklevel=2,
            )


def run(spec: RunSpec, session: ModelSession | None = None, device: str = "cpu", data_dir: str | None = None,
        progress: bool = True, eval_batch: int | None = None, kernel: str = "fake", save: str | None = None,
        overwrite: bool = False, save_format: str = "compressed-tensors", dist: Distributed = SINGLE) -> dict | None:
    """Run one experiment and return its JSON-ready record.

    ``eval_batch``: windows per evaluation forward (default sized from free GPU memory, 1 on CPU);
    ``kernel``: fake (dequantized weights), real (packed low-bit kernels, ptqlab.kernels.real) or auto;
    ``save``: also write the quantized model there (compressed-tensors folder, :func:`ptqlab.export.save_quantized`);
    ``save_format``: an entry of :data:`ptqlab.export.EXPORT_FORMATS`;
    ``overwrite``: replace ``save`` if it holds a saved model already (atomically: written beside it, then renamed);
    ``dist``: this process's rank in a distributed run (:mod:`ptqlab.distributed`): each rank calibrates on its
    share of the windows; rank 0 alone evaluates, saves and returns the record, the others return None.
    """
    start = time.perf_counter()
    dist.check_supported(spec.config)
    check_execution(spec, session.device if session else device, eval_batch, kernel, save, overwrite,
                    session.offload if session else None, session.calib_batch if session else 8)
    session = session or ModelSession(spec.model, device, spec.dtype, data_dir, progress)
    if session.name != spec.model or resolve_dtype(spec.dtype, session.device) != session.dtype:
        raise ValueError(f"run spec is for {spec.model} ({spec.dtype}) but the session holds {session.name} "
                         f"({session.dtype})")
    seqlen, calib_seqlen = _check_sizes(spec, session.model.config, session.device, session.calib_offload)
    check_speed(spec, session.device, kernel, session.offload, session.model.config)
    if spec.speed and session.offload is None and not fits_on_device(session.model, session.device):
        raise ValueError(f"--speed times the whole model on the GPU, and {spec.model} does not fit on "
                         f"{session.device} (it would be evaluated offloaded); drop --speed")

    # calibration first: a text that cannot calibrate fails before the evaluation splits are tokenized
    calib_windows, calib_source = None, None
    if spec.config.needs_calibration:
        calib_windows, calib_source = session.calibration(spec.calib, spec.nsamples, calib_seqlen, spec.seed)
        dist.check_agree("calibration windows", tensor_digest(calib_windows))
    eval_data = {name: session.eval_tokens(name, seqlen) for name in spec.eval}
    eval_sources = {name: src for name, (_, src) in eval_data.items()}
    if calib_source:
        _warn_if_calibrating_on_eval(calib_source, eval_sources)

    model = session.fresh_model(transformed=spec.config.transform != "none")
    blocks = session.block_stream(spec, eval_data, seqlen, save)
    references, reference_time = {}, 0.0
    if "kld" in spec.metrics and dist.is_main:  # the FP16 distributions, from the pristine model before it is quantized
        t0 = time.perf_counter()
        ref_offload = session.offload if session.offload is not None else not fits_on_device(model, session.device)
        for name, (tokens, _) in eval_data.items():
            windows = eval_windows(tokens, seqlen, spec.max_eval_windows, f"eval {name}")
            references[name] = session.kld_reference(model, windows, ref_offload, eval_batch, progress,
                                                     f"KL reference {name}")
        reference_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    mine = None if calib_windows is None else dist.shard(calib_windows, session.calib_batch)
    report = quantize_model(model, spec.config, mine, session.device, progress and dist.is_main,
                            session.calib_batch, session.calib_offload, dist=dist, blocks=blocks)
    dist.barrier("finishing the quantization")  # every rank holds the whole quantized model now
    quant_time = time.perf_counter() - t0
    if not dist.is_main:
        return None
    report.calibration = calib_source

    if blocks is not None:  # streamed: evaluated block by block as they were quantized, the head now
        t0 = time.perf_counter()
        evaluation = blocks.evaluation()
        return _record(spec, session, report, evaluation, {}, None, start,
                       {"quantize": quant_time, "eval": time.perf_counter() - t0}, calib_seqlen, seqlen, calib_source, eval_sources,
                       eval_batch, kernel, dist, save, lambda record: blocks.save(model, session.tokenizer, save,
                                                                                  record, overwrite=overwrite),
                       model, memory=blocks.memory())
    offload = session.offload if session.offload is not None else not fits_on_device(model, session.device)
    if spec.tasks and offload:
        raise ValueError("--tasks scores the model on the device, and this one does not fit there (offloaded "
                         "evaluation); drop --tasks or --offload, or use a device with more memory")
    if not offload:
        model.to(session.device)
    from .kernels.real import select_kernels

    kernels = select_kernels(model, kernel, session.device, offloaded=offload)
    t0 = time.perf_counter()
    ppl, window_nll, kld = evaluate_splits(model, eval_data, seqlen, spec.max_eval_windows, session.device, offload,
                                           eval_batch, progress, references)
    eval_time = time.perf_counter() - t0
    tasks, tasks_time = None, 0.0
    if spec.tasks:
        from .tasks import evaluate_tasks

        t0 = time.perf_counter()
        tasks = evaluate_tasks(model, session.tokenizer, spec.tasks, spec.num_fewshot, spec.limit, spec.tasks_dir,
                               progress=progress)
        tasks_time = time.perf_counter() - t0
    speed, speed_time, gpu_peak = None, 0.0, 0
    if spec.speed:  # after the evaluation: the same model, kernels and device
        from .speed import measure_speed

        gpu_peak = torch.cuda.max_memory_allocated(session.device)  # measure_speed resets the peak
        t0 = time.perf_counter()
        speed = measure_speed(model, max_positions(model.config))
        speed_time = time.perf_counter() - t0
    if not offload:
        model.to("cpu")

    timings = {"quantize": quant_time, "eval": eval_time, **({"kld_reference": reference_time} if references else {}),
               **({"tasks": tasks_time} if tasks is not None else {}), **({"speed": speed_time} if speed else {})}
    from .export import get_format

    return _record(spec, session, report, (ppl, window_nll, kld), tasks or {}, kernels, start, timings,
                   calib_seqlen, seqlen, calib_source, eval_sources, eval_batch, kernel, dist, save,
                   lambda record: get_format(save_format).save(model, session.tokenizer, save, record,
                                                               overwrite=overwrite), model,
                   with_tasks=tasks is not None, speed=speed, gpu_peak=gpu_peak)


def _record(spec: RunSpec, session: ModelSession, report, evaluation: tuple, tasks: dict, kernels, start: float,
            timings: dict, calib_seqlen: int, seqlen: int, calib_source: str | None, eval_sources: dict,
            eval_batch: int | None, kernel: str, dist: Distributed, save: str | None, write, model: nn.Module,
            with_tasks: bool = False, memory: dict | None = None, speed: dict | None = None,
            gpu_peak: int = 0) -> dict:
    """The run's JSON-ready record, and its saved folder written (``write(record)``) where ``save`` asks.
    ``speed``: :func:`ptqlab.speed.measure_speed`'s figures; ``gpu_peak``: the peak GPU bytes before a reset."""
    ppl, window_nll, kld = evaluation
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
        **({"kld": kld} if kld else {}),
        **({"tasks": tasks} if with_tasks else {}),
        **({"speed": speed} if speed else {}),
        "window_nll": window_nll,
        "bits_per_weight": report.bits_per_weight,
        "stored_bits_per_weight": stored_bits_per_weight(model),
        "time_s": time.perf_counter() - start,
        "timings": {"load": session.load_time, **timings, **report.timings},
        "data_sources": {**eval_sources, **({"calibration": calib_source} if calib_source else {})},
        "layers": report.layers,
        "versions": versions(session.device, with_lm_eval=with_tasks),
        "eval_protocol": {"tokenization": TOKENIZATION},
        # memory settings: not part of the config (no effect beyond the float order of the Hessian sums)
        "execution": {"calib_batch": session.calib_batch, "calib_offload": session.calib_offload,
                      **_method_execution(spec, session.device),
                      **({"eval_batch": eval_batch} if eval_batch is not None else {}),
                      **({"kernels": kernels} if kernel != "fake" else {}),
                      **({"world_size": dist.world_size, "backend": dist.backend} if dist.active else {})},
        # peak memory so far (not saved in a checkpoint's config.json: it differs between two runs of one command)
        "memory": {"peak_host_rss_gib": round(peak_host_rss_gib(), 3), **(memory or {}),
                   **({"peak_gpu_gib": round(max(gpu_peak, torch.cuda.max_memory_allocated()) / 2**30, 3)}
                      if session.device.startswith("cuda") else {})},
    }
    if save:
        record["saved_to"] = str(save)
        write(record)
    return record


def _method_execution(spec: RunSpec, device: str) -> dict:
    """What the run's method reports of how it ran on ``device`` (e.g. ZQ's CUDA graphs), for the record."""
    from .methods import get_method

    method = get_method(spec.config.method)
    return method.execution(torch.device(device)) if method.execution is not None else {}


def peak_host_rss_gib() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``: KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
