"""Block I/O: what enters the decoder blocks, and running a block over many windows.

Calibration (the pipeline) and block-by-block evaluation both walk a model
one decoder block at a time: run the embeddings once and keep what enters
block 0 (:func:`capture_block_inputs`), then push those hidden states through
each block in turn (:func:`run_block`), with only that block on the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .models import ModelAdapter


class _StopForward(Exception):
    """Raised by the capture hook: nothing after block 0's input is needed."""


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
