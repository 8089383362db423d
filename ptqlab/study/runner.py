"""Workers: pull runs from the study store, execute them, write the results back.

A run that raises is recorded as ``failed`` (with its traceback) and the
study goes on; failed runs are not retried on resume unless asked
(``--retry-failed``).  A missing model, dataset or package is not the run's
fault: the run goes back to the queue and the worker stops with the error.

A worker loops ``claim -> run -> finish`` until no pending run is left.  It
keeps one :class:`~ptqlab.experiment.ModelSession` per model (the weights,
tokenized evaluation splits and calibration windows are loaded once and
reused across that model's runs) and prefers runs of the model it holds.
While a run computes, a heartbeat thread refreshes the claim so that other
workers know it is alive; a worker that dies leaves a claim that becomes
stale and is taken over.  Ctrl-C (SIGINT) or SIGTERM gives the run in
progress back to the queue before exiting.

``--workers N`` spawns N local processes (``multiprocessing`` spawn);
worker ``i`` uses ``cuda:i`` when CUDA is available, else the CPU.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import config_hash, from_flat
from .store import Claim, Store, format_duration, hostname

# Seconds to sleep inside each claimed run before computing it: a test aid
# (it makes "kill the study in the middle of a run" deterministic).
DELAY_ENV = "PTQLAB_STUDY_DELAY"


def _environment_errors() -> tuple[type[BaseException], ...]:
    from ..data import DataError
    from ..models import UnsupportedModelError

    return (FileNotFoundError, DataError, UnsupportedModelError, ImportError)


ENVIRONMENT_ERRORS = _environment_errors()


@dataclass(frozen=True)
class WorkerOptions:
    db: str
    device: str = "cpu"
    data_dir: str | None = None
    slot: int = 0
    stale_after: float = 300.0
    heartbeat_every: float = 20.0
    progress: bool = False
    threads: int | None = None  # torch CPU threads (spawned workers, CPU or GPU, share the cores)
    parent_pid: int | None = None  # spawned workers stop after their run when this process is gone
    calib_batch: int = 8  # windows per block forward while calibrating (memory, not results)
    calib_offload: bool = False  # calibration hidden states in CPU memory
    kernel: str = "fake"  # fake, real or auto (ptqlab.kernels.real): what the runs evaluate (and --speed times) with


def run_spec(spec: dict):
    """The :class:`~ptqlab.config.RunSpec` of a planned run dict (``kind`` and ``save`` are the study's labels)."""
    return from_flat({k: v for k, v in spec.items() if k not in ("kind", "save")})


def saved_models_dir(db: str | Path) -> Path:
    """Where a study writes the models of its ``save: true`` runs: ``STUDY-models/`` beside ``STUDY.db``."""
    db = Path(db)
    return db.parent / f"{db.stem}-models"


def saved_model_path(models_dir: Path, spec: dict) -> Path:
    """One folder per run dict, named for people and made unique by the dict's hash."""
    from .recipe import method_label, precision_label

    label = f"{Path(spec['model']).name}-{method_label(spec)}-{precision_label(spec)}"
    return models_dir / f"{re.sub(r'[^A-Za-z0-9._+-]+', '_', label)}-{config_hash(spec)[:8]}"


def execute(spec: dict, session, progress: bool = False, models_dir: Path | None = None,
            kernel: str = "fake") -> dict:
    """Run one planned run dict on ``session``; returns the record (sensitivity runs are ordinary runs
    with a layer filter). A ``save: true`` run also writes its quantized model under ``models_dir``;
    ``kernel``: the kernel mode it is evaluated (and timed, with ``speed``) with."""
    from ..experiment import run

    save = None
    if spec.get("save") and models_dir is not None:
        save = saved_model_path(models_dir, spec)
        if save.exists():  # a finished save of this very run (--force recomputes it): replaced, not mixed
            shutil.rmtree(save)
        save.parent.mkdir(parents=True, exist_ok=True)
    return run(run_spec(spec), session, progress=progress, save=str(save) if save else None, kernel=kernel)


class SessionCache:
    """A worker's one :class:`~ptqlab.experiment.ModelSession`, kept across the runs of its model."""

    def __init__(self, opts: WorkerOptions) -> None:
        self.opts = opts
        self._session = None
        self._key: tuple | None = None

    @property
    def model(self) -> str | None:
        return self._key[0] if self._key else None

    def get(self, spec: dict):
        """The session for a run dict: the held one when its model and dtype match, else a new one (the old one
        is freed first, so two models never share the device; callers keep no reference of their own)."""
        import torch

        from ..experiment import ModelSession

        key = (spec["model"], spec.get("dtype", "auto"))
        if self._key != key:
            self._session = self._key = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            o = self.opts
            self._session = ModelSession(key[0], o.device, key[1], o.data_dir, o.progress,
                                         calib_batch=o.calib_batch, calib_offload=o.calib_offload)
            self._key = key
        return self._session


class _Heartbeat(threading.Thread):
    def __init__(self, db: str, every: float, parent_pid: int | None) -> None:
        super().__init__(daemon=True, name="ptqlab-study-heartbeat")
        self.store = Store(db)
        self.every = every
        self.claim: Claim | None = None
        self.stopped = threading.Event()
        self.parent_pid = parent_pid
        self.orphaned = False

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            claim = self.claim
            if claim is not None:
                try:
                    self.store.heartbeat(claim)
                except Exception:  # noqa: BLE001 - a missed heartbeat is harmless
                    pass
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self.orphaned = True

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
        self.store.close()


def _say(worker: str, message: str) -> None:
    print(f"[{worker}] {message}", flush=True)


def _ppl_text(record: dict) -> str:
    ppl = record["ppl"]
    mean = sum(ppl.values()) / len(ppl)
    kld = " ".join(f"kld:{k}={v['mean']:.4f}" for k, v in record.get("kld", {}).items())
    return " ".join(f"{k}={v:.3f}" for k, v in ppl.items()) + f" mean={mean:.3f}" + (f" {kld}" if kld else "") \
        + f" bits/w={record['bits_per_weight']:.2f}"


def _raise_interrupt(signum, frame):  # noqa: ANN001
    raise KeyboardInterrupt(f"signal {signum}")


def work(opts: WorkerOptions) -> dict[str, int]:
    """Run claimed runs until none is left; returns what this worker did."""
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    host, pid = hostname(), os.getpid()
    worker = f"{host}:{pid}/w{opts.slot}"
    store = Store(opts.db)
    store.reclaim_dead(host)
    beat = _Heartbeat(opts.db, opts.heartbeat_every, opts.parent_pid)
    beat.start()
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    old_int = signal.getsignal(signal.SIGINT) if main_thread else None
    done = {"done": 0, "failed": 0, "lost": 0}
    sessions = SessionCache(opts)
    try:
        while not (beat.orphaned or (opts.parent_pid is not None and os.getppid() != opts.parent_pid)):
            claim = store.claim(worker, prefer_model=sessions.model,
                                stale_after=opts.stale_after, host=host, pid=pid)
            if claim is None:
                break
            try:
                beat.claim = claim
                counts = store.counts()
                position = counts["done"] + counts["failed"] + counts["running"]
                _say(worker, f"start {position}/{sum(counts.values())} {claim.name} on {opts.device}"
                             + (f" (attempt {claim.attempts})" if claim.attempts > 1 else ""))
                t0 = time.perf_counter()
                if delay:
                    time.sleep(delay)
                record = execute(claim.spec, sessions.get(claim.spec), opts.progress, saved_models_dir(opts.db),
                                 opts.kernel)
                finished = store.finish(claim, record)
            except ENVIRONMENT_ERRORS as err:
                # the model or the data is not there: not the run's fault; give it back and stop
                store.release(claim)
                _say(worker, f"stopping: {type(err).__name__}: {err} ({claim.name} goes back to the queue)")
                raise
            except KeyboardInterrupt:
                if main_thread:  # a second Ctrl-C must not interrupt the hand-back
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                if store.release(claim):  # a no-op once the run is finished
                    _say(worker, f"interrupted: {claim.name} goes back to the queue")
                raise
            except Exception as err:  # noqa: BLE001 - a failed run is recorded, the study goes on
                tb = traceback.format_exc()
                store.fail(claim, f"{type(err).__name__}: {err}\n{tb[-4000:]}")
                done["failed"] += 1
                _say(worker, f"FAILED {claim.name}: {type(err).__name__}: {err}")
                continue
            finally:
                beat.claim = None
            if finished:
                done["done"] += 1
                counts = store.counts()
                _say(worker, f"done  {counts['done'] + counts['failed']}/{sum(counts.values())} {claim.name}: "
                             f"{_ppl_text(record)} ({format_duration(time.perf_counter() - t0)}) | "
                             f"ETA {format_duration(store.eta_seconds())}")
            else:
                done["lost"] += 1
                _say(worker, f"{claim.name}: the claim was taken over by another worker; result discarded")
    finally:
        if main_thread:
            for signum, handler in ((signal.SIGTERM, old_term), (signal.SIGINT, old_int)):
                if handler is not None:
                    signal.signal(signum, handler)
        beat.stop()
        store.close()
    return done


def _worker_entry(opts: WorkerOptions) -> None:
    try:
        work(opts)
    except KeyboardInterrupt:
        sys.exit(130)
    except ENVIRONMENT_ERRORS as err:
        print(f"error: worker {opts.slot}: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def assign_devices(n: int, requested: str | None) -> list[str]:
    """Device of each of ``n`` workers: ``cuda:i`` (round robin over the visible GPUs) or the CPU."""
    import torch

    if requested and not requested.startswith("cuda"):
        return [requested] * n
    if requested and requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {requested} was asked for but no CUDA device is available")
    if not torch.cuda.is_available():
        return ["cpu"] * n
    if requested and ":" in requested:
        if n > 1:
            raise ValueError(f"--device {requested} names one GPU; with --workers {n} give --device cuda "
                             f"(worker i uses cuda:i)")
        return [requested]
    count = torch.cuda.device_count()
    if n > count:
        print(f"note: {n} workers share {count} GPU(s) round robin", file=sys.stderr)
    return [f"cuda:{i % count}" for i in range(n)] if n > 1 else ["cuda"]


def spawned_worker_options(base: WorkerOptions, devices: list[str]) -> list[WorkerOptions]:
    """Options of each spawned worker: its device and slot, and a share of the host's cores for torch.

    GPU workers get a share too, not torch's default of every core: their runs do host-side work (Python,
    launches, CPU threads of torch ops), and N processes each using all cores slowed every run when two GPU
    workers shared a host (bench/README.md, "Two GPUs against one"). ``base.threads`` overrides.
    """
    threads = base.threads or max(1, (os.cpu_count() or 1) // len(devices))
    return [replace(base, device=device, slot=i, parent_pid=os.getpid(), threads=threads)
            for i, device in enumerate(devices)]


def run_workers(base: WorkerOptions, n: int, requested_device: str | None) -> int:
    """Run ``n`` workers (in this process when ``n == 1``); 0 when all ended normally, 130 when interrupted."""
    devices = assign_devices(n, requested_device)
    if n == 1:
        work(replace(base, device=devices[0]))
        return 0
    ctx = mp.get_context("spawn")
    procs = []
    for opts in spawned_worker_options(base, devices):
        p = ctx.Process(target=_worker_entry, args=(opts,), name=f"ptqlab-study-w{opts.slot}")
        p.start()
        procs.append(p)
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:  # the terminal's Ctrl-C reaches them too; a kill of the parent alone does not
            if p.is_alive() and p.pid is not None:
                try:
                    os.kill(p.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
                p.join()
        raise
    codes = [p.exitcode for p in procs]
    if any(c not in (0, None) for c in codes):
        print(f"warning: worker exit codes {codes}", file=sys.stderr)
        return 1
    return 0
