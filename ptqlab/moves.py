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

:class:`StagedMoves` (the default since session 31) does the same through one pinned staging buffer, so that the
transfers run at the PCIe rate instead of the driver's pageable rate: 0.03-0.05 s per OPT-6.7B block instead of
0.10 s on the H200 machine, for 403 MB of pinned host memory (pinned once per run, 0.23 s).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn


class BlockMoves(Protocol):
    """How a block goes to the device and back; one instance serves one :func:`~ptqlab.pipeline.quantize_model`
    call: ``prepare`` once, then block after block ``to_device``, the work, ``to_host``, ``after_block``; ``finish``
    at the end."""

    def prepare(self, blocks: Sequence[nn.Module], device: torch.device) -> None: ...

    def to_device(self, block: nn.Module, device: torch.device) -> None: ...

    def to_host(self, block: nn.Module) -> None: ...

    def after_block(self, device: torch.device) -> None: ...

    def finish(self, device: torch.device) -> None: ...


class PlainMoves:
    """``block.to(device)``, ``block.to("cpu")`` and an emptied CUDA cache after every block: the moves as
    they were before issue 22 (kept as the reference the faster moves are checked against)."""

    def prepare(self, blocks: Sequence[nn.Module], device: torch.device) -> None:
        pass

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

    def prepare(self, blocks: Sequence[nn.Module], device: torch.device) -> None:
        pass

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
        back = []
        for p in _unique_parameters(block):
            kept = self._host.get(id(p))
            if kept is None or kept[0] is not p:
                continue
            host, data = kept[1], p.data
            if data.device == host.device and data.data_ptr() == host.data_ptr():
                continue  # never left
            if (data.shape, data.dtype, data.stride()) == (host.shape, host.dtype, host.stride()):
                back.append((p, host))
        self._copy_back(back)
        self._host = {}
        block.to("cpu")  # what is left (new tensors, buffers) as the plain moves take it; the rest is there

    def _copy_back(self, back: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        """Each Parameter's device data into its host tensor, which it then holds."""
        for p, host in back:
            host.copy_(p.data)  # from the device into pageable memory: synchronous, so the device data may go after
            p.data = host

    def after_block(self, device: torch.device) -> None:
        pass  # the next block has the same shapes: the cached blocks serve it (see the module docstring)

    def finish(self, device: torch.device) -> None:
        if device.type == "cuda":  # the run's Hessians and workspaces back to the driver, as before
            torch.cuda.empty_cache()


class StagedMoves(HostReuseMoves):
    """The host-reuse moves through one pinned staging buffer: a kept Parameter is copied into the buffer by the
    CPU (torch's copy, on all its threads) and from there to the device by DMA, and back the same way.

    Why: a copy from pageable memory goes through the driver's own small pinned buffer, one chunk at a time, at
    ~9 GB/s on the H200 machine (0.09 s per OPT-6.7B block both ways), where a pinned transfer runs at the PCIe
    rate and the CPU copy on many threads at the host's memory bandwidth; the copies of one Parameter overlap the
    DMA of the previous one. The buffer (the size of a block's kept Parameters, pinned once for the whole run:
    403 MB for OPT-6.7B) is the only extra host memory."""

    _ALIGN = 512  # bytes: every region starts aligned for any dtype and for the DMA engine

    def __init__(self) -> None:
        super().__init__()
        self._buffer: torch.Tensor | None = None

    @classmethod
    def _sizes(cls, tensors: Sequence[torch.Tensor]) -> list[int]:
        return [-(-t.numel() * t.element_size() // cls._ALIGN) * cls._ALIGN for t in tensors]

    def _reserve(self, nbytes: int) -> None:
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = None  # free the old pinning first
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def prepare(self, blocks: Sequence[nn.Module], device: torch.device) -> None:
        """Pin the buffer once, for the largest block, before the first (pinning 403 MB: 0.23 s on the H200 machine)."""
        if device.type == "cuda" and len(blocks):
            self._reserve(max(sum(self._sizes([p.data for p in _unique_parameters(b)])) for b in blocks))

    def _regions(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """A view of the staging buffer for each tensor (same dtype and shape), no two overlapping; the buffer
        grows (is pinned again) when a block needs more than it holds."""
        sizes = self._sizes(tensors)
        self._reserve(sum(sizes))
        out, offset = [], 0
        for t, size in zip(tensors, sizes):
            nbytes = t.numel() * t.element_size()
            out.append(self._buffer[offset : offset + nbytes].view(t.dtype).view(t.shape))
            offset += size
        return out

    def to_device(self, block: nn.Module, device: torch.device) -> None:
        # The buffer is written here without waiting on the device: the previous block's copies out of it must be
        # done, which ``to_host`` ensures (it waits on every copy back, and those follow the copies in on the one
        # stream). A way back that copies nothing (an evaluation visit) would first have to wait for the copies
        # in, e.g. on an event recorded after them.
        self._host = {}
        if device.type != "cuda":
            super().to_device(block, device)
            return
        self.keep(block)
        params = [p for p, _ in self._host.values()]
        for p, region in zip(params, self._regions([p.data for p in params])):
            region.copy_(p.data)
            # non_blocking from pinned memory: the DMA runs while the CPU stages the next Parameter; the
            # buffer is not written again before to_host, which comes after the work that reads these copies
            p.data = region.to(device, non_blocking=True)
        block.to(device)

    def finish(self, device: torch.device) -> None:
        # the pinned pages go back to torch's pinned-memory cache (a later run in this process reuses them)
        self._buffer = None
        super().finish(device)

    def _copy_back(self, back: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        if not back or back[0][0].device.type != "cuda":
            super()._copy_back(back)
            return
        regions = self._regions([host for _, host in back])
        done = []
        for (p, _), region in zip(back, regions):
            region.copy_(p.data, non_blocking=True)
            done.append(torch.cuda.Event())
            done[-1].record()
        for (p, host), region, event in zip(back, regions, done):
            event.synchronize()  # this Parameter's DMA is done; the next ones run while the CPU copies
            host.copy_(region)
            p.data = host


# name -> the moves of that name; DEFAULT is what quantize_model and the streamed evaluation use
MOVES: dict[str, type] = {"host-reuse": HostReuseMoves, "plain": PlainMoves, "staged": StagedMoves}
DEFAULT = "staged"


def block_moves(name: str | None = None) -> BlockMoves:
    """A fresh instance of the moves named ``name`` (default :data:`DEFAULT`)."""
    name = DEFAULT if name is None else name
    if name not in MOVES:
        raise ValueError(f"unknown block moves '{name}'; known: {', '.join(MOVES)}")
    return MOVES[name]()
