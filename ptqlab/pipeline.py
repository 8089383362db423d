"""The sequential calibration pipeline: walk the model block by block (the GPTQ way).

1. Run the embeddings once and capture the inputs of block 0 for every
   calibration window, together with the keyword arguments the architecture
   passes to its blocks (attention mask, position ids, ALiBi, rotary tables).
2. For each block in order: move it to the accelerator, wrap its linear layers,
   accumulate the Hessian ``H = 2 X^T X / n`` of each distinct linear input
   (q/k/v read the same input and share one), quantize the weights with the
   chosen method (looked up in :mod:`ptqlab.methods.registry`), add LoRC, then recompute the block's outputs *with the
   quantized block* and feed them to the next block.
3. Only the current block lives on the accelerator; the others stay on the CPU. A block comes back into the
   host tensors it left (:mod:`ptqlab.moves`): no new host memory per block.

Block I/O (capturing and running blocks) is in :mod:`ptqlab.blockio`, the
Hessian accumulation in :mod:`ptqlab.hessian`; the config's layer filter
decides which linears are wrapped and quantized at all.

Activation quantization is switched on before the Hessians are collected,
so the methods see the inputs they will see at inference.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .blockio import BlockInputs, block_inputs_as, capture_block_inputs, forward_only, run_block
from .config import QuantConfig
from .distributed import SINGLE, Distributed
from .hessian import HessianCollector
from .methods import BlockProblem, get_method, lorc_factors_many, rtn_quantize
from .methods.zeroquant import tf32_matmuls
from .models import FamilyMapping, ModelAdapter, QuantLinear, family_mapping, get_adapter, wrap_linears
from .moves import block_moves
from .transforms import BlockContext, ModelContext, check_transform_model, get_transform
from .quantizers import FULL_PRECISION_BITS, QuantizationError, QuantSpec, storage_bits_per_weight, weight_qparams


@dataclass
class QuantReport:
    """What a quantization run did: per-layer errors, timings per phase and storage cost.

    ``timings`` covers the whole :func:`quantize_model` call: its phases sum to the call's wall time. Besides
    the work phases (capture, hessian, solve, lorc, propagate, ...) there are ``move`` (blocks to the device
    and back), ``pin`` (the moves' host staging memory, once per call), ``stream`` (a streamed block read and
    written), ``setup`` (wrapping linears, keeping the original weights, finishing the Hessians), ``log`` (the
    per-layer error log), ``finish`` (LM head, bits per weight) and ``other``: whatever no phase names (Python
    between phases), so an unexplained gap shows.
    """

    layers: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    bits_per_weight: float = float(FULL_PRECISION_BITS)
    calibration: str | None = None

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds


class BlockStream(Protocol):
    """Blocks kept out of memory until their turn (:mod:`ptqlab.streaming`): ``load`` fills a block's
    tensors before it is quantized, ``done`` takes the finished block (writes it out and frees it)."""

    def load(self, index: int, block: nn.Module) -> None: ...

    def done(self, index: int, block: nn.Module) -> None: ...


OTHER_PHASE = "other"


class _Timer:
    """Adds a ``with`` block's wall time to a phase; on CUDA it waits for the block's kernels, so asynchronous
    work is charged to the phase that launched it (every stretch of the pipeline is in some phase, so the queue
    is empty when the next one starts)."""

    def __init__(self, report: QuantReport, phase: str, device: torch.device) -> None:
        self.report, self.phase, self.device = report, phase, device

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.report.add_time(self.phase, time.perf_counter() - self.start)


def _output_error_ratio(w: torch.Tensor, diff: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``||XW^T - XQ^T||^2 / ||XW^T||^2`` from the Hessian, float32 ``w`` and ``diff = w - wq`` (as a 0-d
    tensor; the numerator is :func:`~ptqlab.methods.zeroquant.local_objective`, which forms ``w - wq`` itself)."""
    num = (diff @ H * diff).sum() / 2
    den = (w @ H * w).sum() / 2
    return num / den.clamp(min=1e-30)


def _solve_group(names: list[str], originals: dict[str, torch.Tensor], config: QuantConfig, H: torch.Tensor | None,
                 label: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weight, scale, zero)`` of linears that share one input, from the method's layer solve (on their
    stacked rows, float32 on the method's own copy)."""
    W = torch.cat([originals[n] for n in names])
    result = get_method(config.method).solve_layer(W, H, config, label)
    return result.weight, result.scale, result.zero


def _apply_group(names: list[str], linears: dict[str, QuantLinear],
                 result: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    rows = [linears[n].weight.shape[0] for n in names]
    for name, q, scale, zero in zip(names, *(t.split(rows) for t in result)):
        linears[name].weight.data.copy_(q)
        linears[name].set_weight_qparams(scale, zero)


def _lorc(layers: list[QuantLinear], originals: list[torch.Tensor], config: QuantConfig,
          hessians: list[torch.Tensor | None]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """LoRC factors ``(U, V)`` of the errors the method left in ``layers`` (one batched solve)."""
    errors = [original.float() - layer.weight.float() for layer, original in zip(layers, originals)]
    ranks = [min(config.lorc_rank, *err.shape) for err in errors]
    return lorc_factors_many(errors, ranks, config.lorc_spec, hessians if config.lorc_aware else None,
                             config.gptq.percdamp, [layer.name for layer in layers])


def _log_layer(layer: QuantLinear, original: torch.Tensor, H: torch.Tensor | None, report: QuantReport) -> None:
    """The per-layer error log entry of a finished layer.

    The float32 weights and their difference are made once and both errors read them, with one device
    sync for the pair. The output error's ``[out, in] x [in, in]`` products run on TF32 on CUDA: they are a
    report, not an input of the method (a relative error of ~1e-3 in a ratio printed to 3 digits), and in float32
    they took 0.13 s of every OPT-6.7B block on an H200, where TF32's measured rate is 8x float32's."""
    entry = {"layer": layer.name, "out": layer.out_features, "in": layer.in_features}
    w = original.float()
    diff = w - layer.effective_weight().float()
    errors = [diff.norm() / w.norm().clamp(min=1e-30)]
    if H is not None:
        with tf32_matmuls():
            errors.append(_output_error_ratio(w, diff, H))
    values = torch.stack(errors).tolist()
    if H is not None:
        entry["rel_output_error"] = values[1]
    entry["rel_weight_error"] = values[0]
    report.layers.append(entry)


def _check_lorc_rank(adapter: ModelAdapter, config: QuantConfig) -> None:
    """Refuse a LoRC rank whose factors would store more numbers than the weight they compensate.

    ``U [out, r]`` and ``V [r, in]`` hold ``r (out + in)`` numbers: from
    ``r >= out in / (out + in)`` on they outweigh ``W`` itself, so "compensation"
    would cost more than keeping the layer in full precision (and its SVD runs for minutes).
    """
    for index, block in enumerate(adapter.blocks):
        for name, m in ModelAdapter.linear_layers(block).items():
            if not config.layers.selects(index, name):
                continue
            out, inp = (m.out_features, m.in_features) if isinstance(m, (nn.Linear, QuantLinear)) else m.weight.shape[::-1]
            limit = out * inp / (out + inp)
            if config.lorc_rank >= limit:
                extra = config.lorc_rank * (out + inp) * config.lorc_bits / (out * inp)
                raise QuantizationError(
                    f"--lorc-rank {config.lorc_rank} is too large for blocks.{index}.{name} [{out}x{inp}]: its factors "
                    f"would hold {config.lorc_rank * (out + inp)} numbers, more than the {out * inp} of the weight "
                    f"itself ({extra:.1f} extra bits per weight at --lorc-bits {config.lorc_bits}); use a rank below "
                    f"{int(limit)} (the paper uses 4 to 8)")


def _bits_per_weight(layers: Iterable[QuantLinear], config: QuantConfig, full_precision: int = 0) -> float:
    """Storage bits per weight of the quantized linears and ``full_precision`` 16-bit weights beside them."""
    total_bits, total_weights = float(FULL_PRECISION_BITS * full_precision), float(full_precision)
    for layer in layers:
        n = layer.out_features * layer.in_features
        total_weights += n
        total_bits += storage_bits_per_weight(layer.weight_spec, layer.in_features, layer.out_features) * n
        if layer.lorc_u is not None:
            r = layer.lorc_u.shape[1]
            spec = config.lorc_spec
            total_bits += storage_bits_per_weight(spec, r, layer.out_features) * r * layer.out_features
            total_bits += storage_bits_per_weight(spec, layer.in_features, r) * r * layer.in_features
    return total_bits / max(total_weights, 1.0)


def _quantize_block(
    index: int,
    block: nn.Module,
    config: QuantConfig,
    hidden: torch.Tensor | None,
    inputs: BlockInputs | None,
    report: QuantReport,
    device: torch.device,
    mapping: FamilyMapping | None = None,
    dist: Distributed = SINGLE,
) -> list[QuantLinear]:
    """Quantize one block on ``device``; with calibration, ``hidden`` is replaced in place by its outputs."""
    method = get_method(config.method)
    transform = get_transform(config.transform)
    if transform.prepare_block is not None and hidden is not None:
        # before the linears are wrapped: the transform sees full-precision inputs and plain modules
        ctx = BlockContext(index, block, mapping, config, hidden, lambda: forward_only(block, hidden, inputs),
                           lambda: run_block(block, hidden, inputs, out=torch.empty_like(hidden)), device)
        with _Timer(report, "transform", device):
            report.layers.append(transform.prepare_block(ctx))
    with _Timer(report, "setup", device):
        linears = wrap_linears(block, prefix=f"blocks.{index}.", select=lambda name: config.layers.selects(index, name))
        for layer in linears.values():
            layer.act_spec = config.act
    collector = None
    targets = None
    if hidden is not None and linears:
        if method.needs_targets:
            with _Timer(report, "targets", device):
                for layer in linears.values():
                    layer.act_spec = QuantSpec()
                targets = run_block(block, hidden, inputs, out=torch.empty_like(hidden))
                for layer in linears.values():
                    layer.act_spec = config.act
        with _Timer(report, "hessian", device):
            collector = HessianCollector(linears)
            forward_only(block, hidden, inputs)
            collector.close()
        if dist.active:  # its own phase, so one process's timings keep their keys
            with _Timer(report, "communicate", device):
                dist.reduce_hessians(collector.sums, collector.tokens)
    with _Timer(report, "setup", device):
        groups = collector.groups() if collector else {n: [n] for n in linears}
        originals = {n: layer.weight.data.clone() for n, layer in linears.items()}  # for LoRC and the error log
        hessians: dict[str, torch.Tensor | None] = {}
        for owner, names in groups.items():
            H = collector.hessian(owner) if collector else None
            hessians.update({n: H for n in names})
    if method.solve_layer is not None and config.weight.enabled:
        labels = {o: "+".join(linears[n].name for n in names) for o, names in groups.items()}
        # in one process: each group solved and applied in turn; distributed: dealt across the ranks
        with _Timer(report, "solve", device):
            dist.solve_in_turn(list(groups), lambda o: _solve_group(groups[o], originals, config, hessians[o],
                                                                    labels[o]),
                               lambda o, result: _apply_group(groups[o], linears, result))
    if method.solve_block is not None and linears:
        with _Timer(report, "solve", device):
            fp32_inputs = block_inputs_as(inputs, torch.float32)
            problem = BlockProblem(block, linears, config, lambda b, x: run_block(b, x, fp32_inputs), hidden,
                                   targets, f"blocks.{index}")
            qparams, log = method.solve_block(problem)
            for name, (scale, zero) in qparams.items():
                linears[name].set_weight_qparams(scale, zero)
            report.layers.append(log)
            del targets, problem
    with _Timer(report, "setup", device):
        for layer in linears.values():
            layer.weight_spec = config.weight
            if config.weight.enabled and layer.weight_scale is None:
                raise QuantizationError(f"{layer.name}: method '{config.method}' quantized the weight but reported "
                                        f"no scale/zero point; its integer codes cannot be recovered to save the model")
    if config.lorc_rank:
        with _Timer(report, "lorc", device):
            dist.solve_all_in_turn(
                list(linears),
                lambda names: _lorc([linears[n] for n in names], [originals[n] for n in names], config,
                                    [hessians[n] for n in names]),
                lambda n, uv: linears[n].set_lorc(*uv))
    with _Timer(report, "log", device):
        for name, layer in linears.items():
            _log_layer(layer, originals[name], hessians[name], report)
        del hessians, originals
    if hidden is not None:
        with _Timer(report, "propagate", device):
            run_block(block, hidden, inputs, out=hidden)
    return list(linears.values())


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calibration: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    batch_size: int = 8,
    offload_activations: bool = False,
    dist: Distributed = SINGLE,
    blocks: BlockStream | None = None,
) -> QuantReport:
    """Quantize ``model`` in place, block by block; returns the report.

    ``calibration`` holds token windows ``[n, seqlen]``; it is required by
    the calibrated methods (GPTQ, ZQ-Local, ZQ-Global, activation-aware LoRC)
    and optional otherwise (with it, RTN also logs per-layer output errors).
    The model may live on the CPU: only one block at a time is moved to
    ``device``, with the hidden states of all windows (``n x seqlen x hidden``).
    ``batch_size`` windows go through a block at once while calibrating; it
    bounds the block's activation memory (and the Hessian inputs in float32).
    ``offload_activations`` keeps those hidden states in CPU memory instead,
    moving one batch at a time to ``device``: slower (host-device copies each
    pass) but the device then holds little more than one block.
    ``dist``: this process's share of a distributed run (:mod:`ptqlab.distributed`; ``calibration`` is then
    this rank's windows). ``blocks``: where the blocks come from and go to when the model is streamed from
    its checkpoint (:mod:`ptqlab.streaming`); by default they are in the model, in host memory.
    """
    start = time.perf_counter()
    device = torch.device(device)
    adapter = get_adapter(model)
    report = QuantReport()
    if config.needs_calibration and calibration is None:
        raise ValueError(f"method '{config.method}' needs calibration windows (--calib)")
    if not any(config.layers.selects(i, name) for i, block in enumerate(adapter.blocks)
               for name in ModelAdapter.linear_layers(block)):
        raise QuantizationError(f"layer filter '{config.layers}' matches no linear layer of the model")
    if config.lorc_rank:
        _check_lorc_rank(adapter, config)
    transform = get_transform(config.transform)
    mapping = None
    if transform.needs_mapping:
        check_transform_model(config, model.config, type(model).__name__)
        mapping = family_mapping(adapter.model_type, f"--transform {config.transform}")
    if transform.prepare_model is not None:
        with _Timer(report, "transform", device):  # before calibration: the embeddings may change
            report.layers.append(transform.prepare_model(ModelContext(model, adapter, mapping, config, device)))

    hidden = inputs = None
    where = "capturing the inputs of block 0"
    try:
        if calibration is not None:
            with _Timer(report, "capture", device):
                inputs = capture_block_inputs(model, adapter, calibration, device, batch_size, offload_activations)
                hidden = inputs.hidden
        moves = block_moves()
        with _Timer(report, "pin", device):
            moves.prepare(adapter.blocks, device)
        for index, block in enumerate(tqdm(adapter.blocks, desc=f"quantize {config.method}", disable=not progress)):
            where = f"quantizing block {index}"
            if blocks is not None:
                with _Timer(report, "stream", device):
                    blocks.load(index, block)
            with _Timer(report, "move", device):
                moves.to_device(block, device)
            _quantize_block(index, block, config, hidden, inputs, report, device, mapping, dist)
            with _Timer(report, "move", device):
                moves.to_host(block)
            if blocks is not None:
                with _Timer(report, "stream", device):
                    blocks.done(index, block)
            with _Timer(report, "move", device):
                moves.after_block(device)
        with _Timer(report, "move", device):
            moves.finish(device)
    except torch.OutOfMemoryError as e:
        n = 0 if calibration is None else calibration.numel()
        raise torch.OutOfMemoryError(
            f"out of {device} memory while {where}. Only one block and the hidden states of the calibration "
            f"windows ({n} tokens) need to fit: lower the calibration batch (--calib-batch, now {batch_size}), "
            f"keep the hidden states in CPU memory (--calib-offload{', on now' if offload_activations else ''}) "
            f"or lower --nsamples. ({e})"
        ) from e

    with _Timer(report, "finish", device):
        if config.quantize_head and config.weight.enabled:
            _quantize_head(model, adapter, config)
        report.bits_per_weight = model_bits_per_weight(model, config.lorc_bits)
    # what no phase above names (checks, Python between phases): the phases then sum to the call's wall time
    report.add_time(OTHER_PHASE, max(0.0, time.perf_counter() - start - sum(report.timings.values())))
    return report


def model_bits_per_weight(model: nn.Module, lorc_bits: int = FULL_PRECISION_BITS) -> float:
    """The paper's storage bits per weight of a model's decoder linears (and a quantized head): codes, fp16
    scales, zero points and LoRC factors at ``lorc_bits``; linears left in full precision count at 16 bits,
    since a run that quantizes only fc1 is not W4."""
    adapter = get_adapter(model)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    untouched = sum(m.weight.numel() for block in adapter.blocks
                    for m in ModelAdapter.linear_layers(block).values() if not isinstance(m, QuantLinear))
    return _bits_per_weight(quantized, QuantConfig(lorc_bits=lorc_bits), untouched)


def _quantize_head(model: nn.Module, adapter: ModelAdapter, config: QuantConfig) -> QuantLinear:
    """RTN on the LM head (it has no block to calibrate in); a fresh weight, so tied embeddings stay exact."""
    head = QuantLinear.from_module(adapter.lm_head, "lm_head", share=False)
    # the grid comes from the original weight (re-deriving it from the rounded one gives another grid)
    head.set_weight_qparams(*weight_qparams(head.weight.data.float(), config.weight, "lm_head"))
    head.weight.data.copy_(rtn_quantize(head.weight.data, config.weight, "lm_head"))
    head.weight_spec = config.weight
    head.act_spec = config.act
    for name, module in model.named_modules():
        if module is adapter.lm_head:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, head)
            break
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False
    return head
