"""Moving a decoder block to the accelerator and back (the pipeline's ``move`` phase).

The plain way, ``block.to(device)`` then ``block.to("cpu")``, frees the block's host tensors on the way out
and allocates fresh ones on the way back. A fresh tensor of more than glibc's mmap threshold (32 MiB at most)
is new pages of the process, each faulted in (and zeroed by the kernel) while the driver's staged copy writes
it; and ``torch.cuda.empty_cache()`` after every block hands the block's weights, Hessians and activation
workspaces back to the driver, to be ``cudaMalloc``-ed again for the next block. On an H200 that came to
0.40 s per OPT-6.7B block (403 MB of fp16 weights, issue 22), against ~15 ms of transfer at the pinned rate.

:class:`HostReuseMoves` keeps the block's host tensors while the block is on the device and copies its
results back into them (the same memory, already mapped): the Parameters end on the CPU with the same values
as with the plain moves, in the storage they had before. Host memory is unchanged (the plain moves hold a
block's host copy at the same point, the freshly allocated one), and no memory is pinned. The caching
allocator keeps the freed blocks between decoder blocks: every block of a model has the same shapes, so the
next block's tensors reuse them and the reserved memory stays that of one block; the cache is emptied once,
after the last block.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class BlockMoves(Protocol):
    """How a block goes to the device and back; one instance serves one :func:`~ptqlab.pipeline.quantize_model`
    call, block after block (``to_device``, the work, ``to_host``, ``after_block``; ``finish`` at the end)."""

    def to_device(self, block: nn.Module, device: torch.device) -> None: ...

    def to_host(self, block: nn.Module) -> None: ...

    def after_block(self, device: torch.device) -> None: ...

    def finish(self, device: torch.device) -> None: ...


class PlainMoves:
    """``block.to(device)``, ``block.to("cpu")`` and an emptied CUDA cache after every block: the moves as
    they were before issue 22 (kept as the reference the faster moves are checked against)."""

    def to_device(self, block: nn.Module, device: torch.device) -> None:
        block.to(device)

    def to_host(self, block: nn.Module) -> None:
        block.to("cpu")

    def after_block(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def finish(self, device: torch.device) -> None:
        pass


def _unique_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The block's Parameters, each once (a Parameter shared by two modules is one tensor)."""
    seen: set[int] = set()
    out = []
    for module in block.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def _alone(tensors: list[torch.Tensor]) -> list[bool]:
    """For each tensor: whether no other tensor of the list shares any of its bytes. Writing a result into a
    host tensor that aliases another (one storage viewed twice) would change the other too; the plain moves
    give each its own new tensor, so such tensors are left to them."""
    spans = [_span(t) for t in tensors]
    return [all(j == i or b_end <= a_start or a_end <= b_start for j, (b_start, b_end) in enumerate(spans))
            for i, (a_start, a_end) in enumerate(spans)]


class HostReuseMoves:
    """The plain moves, except that a Parameter comes back into the host tensor it left (see the module
    docstring), and the CUDA cache is emptied once, after the last block, not after every block.

    A Parameter is copied back into its old host tensor when that tensor is contiguous, shares no byte with
    another of the block's host tensors, and the device tensor still has its shape, dtype and strides (the
    method wrote the block's results in place); anything else (tensors the work created, such as LoRC
    factors; buffers; a Parameter whose tensor was replaced by one of another shape) goes back as the plain
    ``block.to("cpu")`` takes it. On the CPU nothing moves and nothing is kept."""

    def __init__(self) -> None:
        # id(Parameter) -> (the Parameter, its host tensor); the Parameter is held so its id cannot be reused
        self._host: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

    def to_device(self, block: nn.Module, device: torch.device) -> None:
        self._host = {}
        if device.type != "cpu":
            self.keep(block)
        block.to(device)

    def keep(self, block: nn.Module) -> None:
        """Remember the block's host tensors that its results can come back into."""
        params = [p for p in _unique_parameters(block) if p.device.type == "cpu" and p.numel()]
        for p, alone in zip(params, _alone([p.data for p in params])):
            if alone and p.data.is_contiguous():
                self._host[id(p)] = (p, p.data)

    def to_host(self, block: nn.Module) -> None:
        for p in _unique_parameters(block):
            kept = self._host.get(id(p))
            if kept is None or kept[0] is not p:
                continue
            host, data = kept[1], p.data
            if data.device == host.device and data.data_ptr() == host.data_ptr():
                continue  # never left
            if (data.shape, data.dtype, data.stride()) == (host.shape, host.dtype, host.stride()):
                host.copy_(data)  # from the device into pageable memory: synchronous, so ``data`` may go after
                p.data = host
        self._host = {}
        block.to("cpu")  # what is left (new tensors, buffers) as the plain moves take it; the rest is there

    def after_block(self, device: torch.device) -> None:
        pass  # the next block has the same shapes: the cached blocks serve it (see the module docstring)

    def finish(self, device: torch.device) -> None:
        if device.type == "cuda":  # the run's Hessians and workspaces back to the driver, as before
            torch.cuda.empty_cache()


# name -> the moves of that name; DEFAULT is what quantize_model and the streamed evaluation use
MOVES: dict[str, type] = {"host-reuse": HostReuseMoves, "plain": PlainMoves}
DEFAULT = "host-reuse"


def block_moves(name: str | None = None) -> BlockMoves:
    """A fresh instance of the moves named ``name`` (default :data:`DEFAULT`)."""
    name = DEFAULT if name is None else name
    if name not in MOVES:
        raise ValueError(f"unknown block moves '{name}'; known: {', '.join(MOVES)}")
    return MOVES[name]()
