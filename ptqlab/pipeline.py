"""The sequential calibration pipeline: walk the model block by block (the GPTQ way).

1. Run the embeddings once and capture the inputs of block 0 for every
   calibration window, together with the keyword arguments the architecture
   passes to its blocks (attention mask, position ids, ALiBi, rotary tables).
2. For each block in order: move it to the accelerator, wrap its linear layers,
   accumulate the Hessian ``H = 2 X^T X / n`` of each distinct linear input
   (q/k/v read the same input and share one), quantize the weights with the
   chosen method, add LoRC, then recompute the block's outputs *with the
   quantized block* and feed them to the next block.
3. Only the current block lives on the accelerator; the others stay on the CPU.

Activation quantization is switched on before the Hessians are collected,
so the methods see the inputs they will see at inference.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .methods import gptq_quantize, lorc_factors, rtn_quantize, zq_global_block, zq_local_quantize
from .methods.zeroquant import local_objective
from .models import ModelAdapter, QuantLinear, get_adapter, wrap_linears
from .quantizers import FULL_PRECISION_BITS, QuantSpec, check_finite, storage_bits_per_weight


class _StopForward(Exception):
    pass


@dataclass
class QuantReport:
    """What a quantization run did: per-layer errors, timings per phase and storage cost."""

    layers: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    bits_per_weight: float = float(FULL_PRECISION_BITS)
    calibration: str | None = None

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds


class _Timer:
    def __init__(self, report: QuantReport, phase: str, device: torch.device) -> None:
        self.report, self.phase, self.device = report, phase, device

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.report.add_time(self.phase, time.perf_counter() - self.start)


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a block (embeddings, norms, head)."""
    inside = {id(m) for block in blocks for m in block.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for name, p in module.named_parameters(recurse=False):
            p.data = p.data.to(device)
        for name, b in module.named_buffers(recurse=False):
            module._buffers[name] = b.to(device)


@dataclass
class BlockInputs:
    """Hidden states entering a block for every window, and the keyword arguments blocks take.

    Some of those arguments (attention masks, BLOOM's ALiBi) are shaped for the
    batch size they were made with, so they are kept per batch size. The
    hidden states may be kept in CPU memory (``offload``) while the blocks run
    on the accelerator: each batch is then moved there when it is used.
    """

    hidden: torch.Tensor  # [n, seqlen, hidden]
    kwargs: dict[int, dict]
    batch_size: int
    device: torch.device  # where the blocks run


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    adapter: ModelAdapter,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int = 8,
    offload: bool = False,
) -> BlockInputs:
    """Run the model up to block 0 for each batch of windows and keep what enters the block.

    With ``offload`` the hidden states are kept in (pinned) CPU memory rather than on ``device``.
    """
    captured: list[torch.Tensor] = []
    kwargs_by_batch: dict[int, dict] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hidden.cpu() if offload else hidden)
        kwargs["use_cache"] = False
        kwargs_by_batch.setdefault(hidden.shape[0], kwargs)
        raise _StopForward

    batch_size = max(1, min(batch_size, windows.shape[0]))
    _move_outside_blocks(model, adapter.blocks, device)
    handle = adapter.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for chunk in [windows[:1], *windows.split(batch_size)]:
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        _move_outside_blocks(model, adapter.blocks, torch.device("cpu"))
    hidden = torch.cat(captured[1:])
    if offload and device.type == "cuda":
        hidden = hidden.pin_memory()  # asynchronous, faster host-to-device copies
    return BlockInputs(hidden, kwargs_by_batch, batch_size, device)


def _cast_floats(value, dtype: torch.dtype):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


def block_inputs_as(inputs: BlockInputs, dtype: torch.dtype) -> BlockInputs:
    """The same block inputs with floating kwargs (ALiBi, rotary tables) cast, for a block run in ``dtype``."""
    kwargs = {b: {k: _cast_floats(v, dtype) for k, v in kw.items()} for b, kw in inputs.kwargs.items()}
    return BlockInputs(inputs.hidden, kwargs, inputs.batch_size, inputs.device)


def _block_outputs(block: nn.Module, hidden: torch.Tensor, inputs: BlockInputs) -> Iterator[torch.Tensor]:
    """The block's outputs for ``hidden`` ``[n, seqlen, h]``, batch by batch in the captured batch size."""
    for chunk in hidden.split(inputs.batch_size):
        pieces = [chunk] if chunk.shape[0] in inputs.kwargs else chunk.split(1)
        for piece in pieces:
            out = block(piece.to(inputs.device, non_blocking=True), **inputs.kwargs[piece.shape[0]])
            yield out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, hidden: torch.Tensor, inputs: BlockInputs, out: torch.Tensor | None = None) -> torch.Tensor:
    """Run a decoder block on ``hidden`` ``[n, seqlen, h]``; returns its outputs.

    ``out`` (which may be ``hidden`` itself: each batch's output depends on that
    batch alone) receives them in place of a new tensor. At 128 windows of
    2048 tokens one copy of the hidden states is hundreds of MiB to GiBs of
    device memory, and concatenating batch outputs would briefly need two.
    """
    if out is None:
        return torch.cat(list(_block_outputs(block, hidden, inputs)))
    start = 0
    for y in _block_outputs(block, hidden, inputs):
        out[start : start + y.shape[0]].copy_(y)
        start += y.shape[0]
    return out


def forward_only(block: nn.Module, hidden: torch.Tensor, inputs: BlockInputs) -> None:
    """Run the block for its hooks' sake (Hessians), keeping none of its outputs."""
    for _ in _block_outputs(block, hidden, inputs):
        pass


class _HessianCollector:
    """Accumulates ``X^T X`` of each distinct linear input of a block.

    Linears called one after the other on the very same tensor (q, k, v;
    gate, up) share one accumulator. "The very same" is object identity and
    an unchanged version counter, never the data address: a freed
    activation's memory is soon handed to the next tensor of its size (so
    OPT's fc1 input can sit where out_proj's input was), and an in-place op
    changes the data at the same address.
    """

    def __init__(self, linears: dict[str, QuantLinear]) -> None:
        self.linears = linears
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.owner: dict[str, str] = {}  # layer -> the layer whose accumulator it shares
        # the last linear called and its input; holding the tensor keeps its memory from being reused
        self._last: tuple[str, torch.Tensor, int] | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module: QuantLinear, args: tuple) -> None:
            x = args[0]
            last = self._last
            same_input = last is not None and last[1] is x and last[2] == x._version
            owner = self.owner[last[0]] if same_input else name
            if self.owner.setdefault(name, owner) != owner:
                raise RuntimeError(
                    f"{module.name}: reads {'the same' if same_input else 'a different'} input as the linear "
                    f"before it in one batch but not in another; its Hessian cannot be shared consistently"
                )
            self._last = (name, x, x._version)
            if self.owner[name] != name:
                return
            xq = module.quantize_input(x).reshape(-1, x.shape[-1])
            check_finite(xq, f"{module.name} input")
            # fp16/bf16 values are exact in TF32 (10-bit mantissa), so tensor cores lose nothing here
            exact_in_tf32 = xq.is_cuda and xq.dtype in (torch.float16, torch.bfloat16)
            xq = xq.float()
            if name not in self.sums:
                self.sums[name] = torch.zeros(xq.shape[1], xq.shape[1], device=xq.device)
                self.tokens[name] = 0
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = exact_in_tf32
            try:
                self.sums[name].addmm_(xq.t(), xq)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
            self.tokens[name] += xq.shape[0]

        return hook

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in self.linears:
            out.setdefault(self.owner.get(name, name), []).append(name)
        return out

    def hessian(self, owner: str) -> torch.Tensor:
        """``H = 2 X^T X / n``, made in place from the accumulator (which it replaces)."""
        return self.sums.pop(owner).mul_(2 / self.tokens[owner])

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._last = None


def _relative_output_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor) -> float:
    """``||XW^T - XQ^T||^2 / ||XW^T||^2`` from the Hessian."""
    w, wq = w.float(), wq.float()
    num = local_objective(w, wq, H)
    den = (w @ H * w).sum() / 2
    return float(num / den.clamp(min=1e-30))


def _quantize_group(
    names: list[str],
    linears: dict[str, QuantLinear],
    config: QuantConfig,
    H: torch.Tensor | None,
    report: QuantReport,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Quantize the weights of linears that share one input; returns their original weights."""
    originals = {n: linears[n].weight.data.clone() for n in names}
    if config.method in ("fp16", "zq-global") or not config.weight.enabled:
        return originals
    W = torch.cat([originals[n] for n in names])  # the methods work in float32 on their own copy
    label = "+".join(linears[n].name for n in names)
    with _Timer(report, "solve", device):
        if config.method == "rtn":
            Q = rtn_quantize(W, config.weight, label)
        elif config.method == "gptq":
            o = config.gptq
            Q = gptq_quantize(W, H, config.weight, o.blocksize, o.percdamp, o.act_order, label).weight
        else:  # zq-local
            Q, _ = zq_local_quantize(W, H, config.weight, config.zq.local_steps, config.zq.local_lr)
    for name, q in zip(names, Q.split([originals[n].shape[0] for n in names])):
        linears[name].weight.data.copy_(q)
    return originals


def _finish_layer(
    name: str,
    layer: QuantLinear,
    original: torch.Tensor,
    config: QuantConfig,
    H: torch.Tensor | None,
    report: QuantReport,
    device: torch.device,
) -> None:
    """LoRC on top of the method's result, then the per-layer error log entry."""
    layer.weight_spec = config.weight
    if config.lorc_rank:
        with _Timer(report, "lorc", device):
            err = original.float() - layer.weight.float()
            rank = min(config.lorc_rank, *err.shape)
            u, v = lorc_factors(
                err, rank, config.lorc_spec, H if config.lorc_aware else None, config.gptq.percdamp, layer.name
            )
            layer.set_lorc(u, v)
    entry = {"layer": layer.name, "out": layer.out_features, "in": layer.in_features}
    if H is not None:
        entry["rel_output_error"] = _relative_output_error(original, layer.effective_weight(), H)
    entry["rel_weight_error"] = float(
        (original.float() - layer.effective_weight().float()).norm() / original.float().norm().clamp(min=1e-30)
    )
    report.layers.append(entry)


def _bits_per_weight(layers: Iterable[QuantLinear], config: QuantConfig) -> float:
    total_bits = total_weights = 0.0
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
) -> list[QuantLinear]:
    """Quantize one block on ``device``; with calibration, ``hidden`` is replaced in place by its outputs."""
    linears = wrap_linears(block, prefix=f"blocks.{index}.")
    for layer in linears.values():
        layer.act_spec = config.act
    collector = None
    targets = None
    if hidden is not None:
        if config.method == "zq-global":
            with _Timer(report, "targets", device):
                for layer in linears.values():
                    layer.act_spec = QuantSpec()
                targets = run_block(block, hidden, inputs, out=torch.empty_like(hidden))
                for layer in linears.values():
                    layer.act_spec = config.act
        with _Timer(report, "hessian", device):
            collector = _HessianCollector(linears)
            forward_only(block, hidden, inputs)
            collector.close()
    groups = collector.groups() if collector else {n: [n] for n in linears}
    originals: dict[str, torch.Tensor] = {}
    hessians: dict[str, torch.Tensor | None] = {}
    for owner, names in groups.items():
        H = collector.hessian(owner) if collector else None
        originals.update(_quantize_group(names, linears, config, H, report, device))
        hessians.update({n: H for n in names})
    if config.method == "zq-global":
        o = config.zq
        with _Timer(report, "solve", device):
            # The latent weights start at W, so the first step's forward is exactly RTN.
            history = zq_global_block(
                block,
                linears,
                config.weight,
                lambda b, x, fp32_inputs=block_inputs_as(inputs, torch.float32): run_block(b, x, fp32_inputs),
                hidden,
                targets,
                o.global_steps,
                o.global_lr,
                o.global_batch_size,
            )
        report.layers.append({"layer": f"blocks.{index}", "zq_global_mse": [history[0], history[-1]] if history else []})
        del targets
    for name, layer in linears.items():
        _finish_layer(name, layer, originals[name], config, hessians[name], report, device)
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
    """
    device = torch.device(device)
    adapter = get_adapter(model)
    report = QuantReport()
    if config.needs_calibration and calibration is None:
        raise ValueError(f"method '{config.method}' needs calibration windows (--calib)")
    quantized: list[QuantLinear] = []

    hidden = inputs = None
    where = "capturing the inputs of block 0"
    try:
        if calibration is not None:
            with _Timer(report, "capture", device):
                inputs = capture_block_inputs(model, adapter, calibration, device, batch_size, offload_activations)
                hidden = inputs.hidden
        for index, block in enumerate(tqdm(adapter.blocks, desc=f"quantize {config.method}", disable=not progress)):
            where = f"quantizing block {index}"
            block.to(device)
            quantized.extend(_quantize_block(index, block, config, hidden, inputs, report, device))
            block.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except torch.OutOfMemoryError as e:
        n = 0 if calibration is None else calibration.numel()
        raise torch.OutOfMemoryError(
            f"out of {device} memory while {where}. Only one block and the hidden states of the calibration "
            f"windows ({n} tokens) need to fit: lower the calibration batch (--calib-batch, now {batch_size}), "
            f"keep the hidden states in CPU memory (--calib-offload{', on now' if offload_activations else ''}) "
            f"or lower --nsamples. ({e})"
        ) from e

    if config.quantize_head and config.weight.enabled:
        quantized.append(_quantize_head(model, adapter, config))
    report.bits_per_weight = _bits_per_weight(quantized, config)
    return report


def _quantize_head(model: nn.Module, adapter: ModelAdapter, config: QuantConfig) -> QuantLinear:
    """RTN on the LM head (it has no block to calibrate in); a fresh weight, so tied embeddings stay exact."""
    head = QuantLinear.from_module(adapter.lm_head, "lm_head")
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
