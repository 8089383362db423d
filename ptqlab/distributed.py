"""One model over many processes (``torch.distributed``): the calibration windows split across ranks.

Launched by ``torchrun --nproc-per-node N -m ptqlab run ...`` (or ``python -m torch.distributed.run``); NCCL on
CUDA (rank ``r`` on ``cuda:LOCAL_RANK``), gloo on the CPU. Every rank holds the whole model and calibrates on
its own share of the windows, whole calibration batches in order, so each batch is the batch one process
would run. Per block:

* capture and propagation: each rank runs its own windows through the block (no communication);
* Hessians: the ``X^T X`` sums and token counts are all-reduced, so every rank holds the Hessian of all
  windows (rank 0's per-layer error log and activation-aware LoRC read it, as in one process);
* solves: a block's groups of linears (and then its LoRC factors) are dealt round robin, rank ``k`` solving
  groups ``k, k + N, ...``; each result is then broadcast from its owner, so all ranks end with the same
  quantized block before it propagates.

The result equals one process's up to float ties: the Hessian is summed in another order (each rank's
batches, then across ranks). Rank 0 alone evaluates, prints and writes the record and any saved folder.

:data:`SINGLE` is the one-process case with the same hooks (no communication): the pipeline calls
``reduce_hessians`` and ``solve_in_turn`` either way, without branching on the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from .quantizers import QuantizationError

DEFAULT_TIMEOUT_S = 600.0
# the weight methods whose calibration distributes: a per-layer solve from the (all-reduced) Hessian alone
DISTRIBUTED_METHODS = ("fp16", "rtn", "gptq", "zq-local")


class DistributedError(RuntimeError):
    """Another rank stopped or stopped answering: this rank stops too, having written nothing."""


class RankMismatchError(ValueError):
    """The ranks were launched with different run descriptions or data."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in a distributed run (``world_size`` 1: a run of one process)."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this rank evaluates, prints and writes (rank 0)."""
        return self.rank == 0

    # ------------------------------------------------------------------ checks before any work

    def check_supported(self, config) -> None:
        """Refuse a config whose calibration does not distribute (before the model is loaded)."""
        if not self.active:
            return
        from .methods import get_method

        method = get_method(config.method)
        if config.method not in DISTRIBUTED_METHODS or method.solve_block is not None:
            raise QuantizationError(
                f"--method {config.method} does not run on several processes: it optimises over the windows "
                f"themselves, which are split across the ranks; distributed runs take --method "
                f"{', '.join(DISTRIBUTED_METHODS)} (with LoRC, plain or --lorc-aware); run it in one process")
        if config.transform != "none":
            raise QuantizationError(
                f"--transform {config.transform} does not run on several processes yet (its statistics would be "
                f"each rank's own windows); run it in one process")

    def check_agree(self, what: str, digest: str) -> None:
        """Every rank has the same ``digest`` of ``what``; else the same clear error on every rank."""
        if not self.active:
            return
        import torch.distributed as dist

        digests: list[str | None] = [None] * self.world_size
        with self.collective(f"comparing the {what} of the ranks"):
            dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            ranks = ", ".join(f"rank {r}: {d}" for r, d in enumerate(digests))
            raise RankMismatchError(
                f"the ranks disagree on the {what} ({ranks}): launch every rank with the same command, model "
                f"files and data; nothing was quantized")

    def shard(self, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This rank's calibration windows: a contiguous run of whole batches of ``batch_size`` windows."""
        if not self.active:
            return windows
        n = windows.shape[0]
        batches = -(-n // batch_size)
        if batches < self.world_size:
            raise ValueError(
                f"--nsamples {n} in batches of --calib-batch {batch_size} makes {batches} batch(es), fewer than "
                f"the {self.world_size} ranks (each rank calibrates on whole batches): raise --nsamples to at least "
                f"{self.world_size * batch_size} or lower --calib-batch")
        per, extra = divmod(batches, self.world_size)
        first = self.rank * per + min(self.rank, extra)
        last = first + per + (1 if self.rank < extra else 0)
        return windows[first * batch_size : last * batch_size]

    # ------------------------------------------------------------------ the pipeline's hooks

    def reduce_hessians(self, sums: dict[str, torch.Tensor], tokens: dict[str, int]) -> None:
        """All-reduce the ``X^T X`` sums (in place) and token counts of a block's linear inputs."""
        if not self.active:
            return
        import torch.distributed as dist

        names = sorted(sums)
        with self.collective("summing the Hessians"):
            for name in names:
                dist.all_reduce(sums[name])
            counts = torch.tensor([tokens[n] for n in names], dtype=torch.float64, device=self._device(sums))
            dist.all_reduce(counts)
        tokens.update({n: int(c) for n, c in zip(names, counts.tolist())})

    def solve_in_turn(self, keys: Sequence[str], solve: Callable[[str], tuple[torch.Tensor, ...]],
                      apply: Callable[[str, tuple[torch.Tensor, ...]], None]) -> None:
        """``apply(key, solve(key))`` for every key, in order. Distributed: rank ``i % N`` solves the
        ``i``-th key (the ranks' solves run at once), then every result is broadcast from its owner and
        applied on every rank, in key order."""
        self.solve_all_in_turn(keys, lambda mine: [solve(key) for key in mine], apply)

    def solve_all_in_turn(self, keys: Sequence[str],
                          solve_all: Callable[[list[str]], list[tuple[torch.Tensor, ...]]],
                          apply: Callable[[str, tuple[torch.Tensor, ...]], None]) -> None:
        """``solve_in_turn`` where one call solves all of a rank's keys at once (``solve_all(keys)`` returns their
        results in order), for solvers that batch."""
        if not self.active:
            for key, result in zip(keys, solve_all(list(keys)), strict=True):
                apply(key, result)
            return
        owned = [key for i, key in enumerate(keys) if i % self.world_size == self.rank]
        mine = dict(zip(owned, solve_all(owned), strict=True))
        for i, key in enumerate(keys):
            owner = i % self.world_size
            with self.collective(f"receiving {key} from rank {owner}"):
                result = self._broadcast(mine.pop(key, None), owner)
            apply(key, result)

    def barrier(self, what: str) -> None:
        if not self.active:
            return
        import torch.distributed as dist

        with self.collective(what):
            if self.backend == "gloo":
                # names the ranks that did not arrive, within the timeout
                dist.monitored_barrier(timeout=timedelta(seconds=self.timeout_s))
            else:
                dist.barrier()

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn the backend's failure of a collective (a rank died, or did not answer within the timeout)
        into one clear error."""
        try:
            yield
        except (RuntimeError, OSError) as err:  # torch.distributed.DistError is a RuntimeError
            if isinstance(err, (DistributedError, torch.OutOfMemoryError)):
                raise
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: another rank stopped or did not answer within "
                f"{self.timeout_s:g} s (--dist-timeout) while {what}; stopping without writing a record or a "
                f"checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err

    def _device(self, tensors: dict[str, torch.Tensor]) -> torch.device:
        return next(iter(tensors.values())).device if tensors else torch.device("cpu")

    def _broadcast(self, tensors: tuple[torch.Tensor, ...] | None, src: int) -> tuple[torch.Tensor, ...]:
        """``tensors`` of rank ``src`` on every rank (shapes and dtypes first, then the data)."""
        import torch.distributed as dist

        meta = [None if tensors is None else [(tuple(t.shape), t.dtype, str(t.device)) for t in tensors]]
        dist.broadcast_object_list(meta, src=src)
        if tensors is None:
            device = torch.device(f"cuda:{torch.cuda.current_device()}") if self.backend == "nccl" else None
            tensors = tuple(torch.empty(shape, dtype=dtype, device=device or where) for shape, dtype, where in meta[0])
        out = tuple(t.contiguous() for t in tensors)
        for t in out:
            dist.broadcast(t, src=src)
        return out

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = Distributed()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def from_environment(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Distributed, str]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``); returns
    this rank's :class:`Distributed` and its device (``cuda`` becomes ``cuda:LOCAL_RANK``). One process:
    :data:`SINGLE` and the device as given."""
    if not launched():
        return SINGLE, device
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(f"--device {device}: under torchrun each rank takes its own GPU (cuda:LOCAL_RANK); "
                             f"give --device cuda")
        if local >= torch.cuda.device_count():
            raise ValueError(f"rank {rank} has LOCAL_RANK {local} but this host has {torch.cuda.device_count()} "
                             f"GPU(s): launch at most that many processes per node")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return Distributed(rank, world, backend, timeout_s), device


def run_description_digest(flat: dict, execution: dict) -> str:
    """A hash of what a rank was told to do: the run's flat config and the settings that fix its batches."""
    blob = json.dumps({"config": flat, "execution": execution}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_files_digest(model: str) -> str:
    """A cheap hash of a local model folder: config.json's text and each weight file's name and size (hashing
    the bytes of a 70B checkpoint would take minutes); ``name:MODEL`` for a hub id."""
    from .testbed import resolve_model_path

    try:
        folder = Path(resolve_model_path(model))
    except FileNotFoundError:
        return f"name:{model}"
    if not folder.is_dir():
        return f"name:{model}"
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.name == "config.json":
            h.update(p.read_bytes())
        elif p.suffix in (".safetensors", ".bin"):
            h.update(f"{p.name}:{p.stat().st_size};".encode())
    return h.hexdigest()[:16]


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
