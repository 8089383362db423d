"""``ptqlab study --executor ray``: the runs of a study on the actors of a Ray cluster.

The driver (the process running ``ptqlab study``) owns the SQLite store on
its local disk; Ray never sees it.  The driver claims the next run for an idle
actor exactly as a local worker claims one (``Store.claim``: one
transaction, the run is marked running with the driver's host and process
id), sends the run dict to the actor, and writes the record that comes back
with ``Store.finish`` (one transaction), or ``Store.fail`` with the run's
error.  While runs compute, the driver refreshes their heartbeats.

Actors: one per GPU (``num_gpus=1``) or per fraction of a GPU
(``--gpus-per-worker 0.5``: two actors share a GPU), or, on a cluster
without GPUs (or ``--device cpu``), one per ``--cpus-per-worker`` CPUs.
Each actor keeps a :class:`~ptqlab.study.runner.SessionCache` (the model's
weights, tokenized evaluation splits and calibration windows), and the
driver gives an idle actor a run of the model it holds first, so a model is
loaded once per actor, not once per run.

Faults:

* an actor whose process dies (killed, out of memory, its node lost) is
  replaced by a new actor; the run it held goes back to the queue and is
  tried again, at most ``--max-attempts`` times in all, then recorded as
  failed.  A result is written only under the claim's token, so nothing is
  stored twice;
* a run that raises is recorded as ``failed`` with its traceback, and the
  study goes on;
* a missing model, dataset or package (not the run's fault) puts the run back
  in the queue and stops the study with the error, as the local workers do;
* the driver killed (SIGKILL) leaves claims marked with its process id:
  ``ptqlab study`` run again on the same host takes them back
  (``Store.reclaim_dead``) and finishes only what was left; Ray ends the
  actors of a driver that is gone.  Ctrl-C or SIGTERM gives the runs in
  flight back at once.

Ray is imported only here, and only when ``--executor ray`` is asked for.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace

from .runner import DELAY_ENV, ENVIRONMENT_ERRORS, SessionCache, WorkerOptions, _ppl_text, execute, saved_models_dir
from .store import Claim, Store, format_duration, hostname


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: $RAY_ADDRESS, else a new local cluster; "auto": the running one
    workers: int | None = None  # actors; None: as many as the cluster's resources fit
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    max_attempts: int = 3  # tries of a run whose worker process died, in all


class StudyWorker:
    """The body of one Ray actor: one device, one model session, runs one run dict at a time."""

    def __init__(self, opts: WorkerOptions, delay: float = 0.0) -> None:
        import torch

        if opts.threads:
            torch.set_num_threads(opts.threads)
        self.opts = opts
        self.delay = delay  # test aid (PTQLAB_STUDY_DELAY of the driver): sleep inside each run
        self.sessions = SessionCache(opts)

    def info(self) -> dict:
        return {"host": hostname(), "pid": os.getpid(), "device": self.opts.device}

    def run(self, spec: dict) -> dict:
        """``{"record": ...}``, ``{"error": text}`` (the run raised) or ``{"environment": exception}``."""
        try:
            if self.delay:
                time.sleep(self.delay)
            # saved models go to the same path on the node that ran the run (the driver's, on one host)
            return {"record": execute(spec, self.sessions.get(spec), self.opts.progress,
                                      saved_models_dir(self.opts.db), self.opts.kernel)}
        except ENVIRONMENT_ERRORS as err:
            return {"environment": err}
        except Exception as err:  # noqa: BLE001 - a failed run is recorded by the driver, the study goes on
            return {"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()[-4000:]}"}


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'ptqlab[ray]'") from None
    return ray


def connect(ray, address: str | None) -> bool:
    """Join (or start) a Ray cluster; ``True`` when this call started the connection (and must shut it down)."""
    import logging

    if ray.is_initialized():  # a caller (a test, a notebook) is connected already
        return False
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             configure_logging=True, log_to_driver=True)
    return True


def plan_actors(resources: dict, device: str | None, ray_opts: RayOptions) -> tuple[int, dict, str]:
    """``(number of actors, Ray resources of one, device inside it)`` for a cluster's total resources."""
    gpus = float(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 0))
    use_gpu = gpus > 0 and not (device or "").startswith("cpu")
    if device and device.startswith("cuda") and gpus == 0:
        raise ValueError(f"--device {device} was asked for but the Ray cluster has no GPU")
    if device and device not in ("cpu", "cuda") and not device.startswith("cuda"):
        raise ValueError(f"--device {device}: with --executor ray give cpu or cuda")
    if device and ":" in device:
        raise ValueError(f"--device {device}: Ray assigns the GPUs; give --device cuda")
    if not 0 < ray_opts.gpus_per_worker <= max(gpus, 1):
        raise ValueError(f"--gpus-per-worker must be above 0 and at most the cluster's {gpus:g} GPUs, "
                         f"got {ray_opts.gpus_per_worker:g}")
    if ray_opts.cpus_per_worker <= 0:
        raise ValueError(f"--cpus-per-worker must be above 0, got {ray_opts.cpus_per_worker:g}")
    if use_gpu:
        # Ray pins each actor to its GPU(s) through CUDA_VISIBLE_DEVICES: "cuda" inside the actor is its GPU
        fits = int(gpus / ray_opts.gpus_per_worker + 1e-9)
        resources_of_one = {"num_gpus": ray_opts.gpus_per_worker, "num_cpus": ray_opts.cpus_per_worker}
    else:
        fits = int(cpus / ray_opts.cpus_per_worker + 1e-9)
        resources_of_one = {"num_gpus": 0, "num_cpus": ray_opts.cpus_per_worker}
    if fits < 1:
        raise ValueError(f"the Ray cluster ({gpus:g} GPUs, {cpus:g} CPUs) fits no worker of "
                         f"{resources_of_one['num_gpus']:g} GPUs / {resources_of_one['num_cpus']:g} CPUs")
    n = ray_opts.workers or fits
    if n > fits:
        print(f"note: {n} Ray workers asked for, the cluster fits {fits} at a time; the others wait",
              file=sys.stderr)
    return n, resources_of_one, "cuda" if use_gpu else "cpu"


@dataclass
class _Slot:
    """One actor of the pool and what it is doing."""

    index: int
    actor: object
    ready_ref: object | None  # the pending ``info()`` call of a starting actor
    name: str = ""
    model: str | None = None  # the model its session holds (as far as the driver knows)
    claim: Claim | None = None


class _Pool:
    """The actors: start, replace when dead, stop."""

    def __init__(self, ray, n: int, resources: dict, opts: WorkerOptions, max_restarts: int) -> None:
        self.ray = ray
        self.cls = ray.remote(StudyWorker)
        self.resources = resources
        self.opts = opts
        self.delay = float(os.environ.get(DELAY_ENV, "0") or 0)
        self.restarts_left = max_restarts
        self.slots = [self._start(i) for i in range(n)]

    def _start(self, index: int) -> _Slot:
        opts = replace(self.opts, slot=index, threads=max(1, int(self.resources["num_cpus"])))
        actor = self.cls.options(**self.resources, max_restarts=0, max_task_retries=0).remote(opts, self.delay)
        return _Slot(index, actor, actor.info.remote())

    def replace(self, slot: _Slot, why: str) -> None:
        """A dead actor's slot gets a new actor (bounded, so a worker that always dies ends the study)."""
        try:
            self.ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - it is gone already
            pass
        if self.restarts_left <= 0:
            raise RuntimeError(f"Ray workers keep dying (last: {why}); giving up")
        self.restarts_left -= 1
        self.slots[slot.index] = self._start(slot.index)

    def stop(self) -> None:
        for slot in self.slots:
            try:
                self.ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass


class _Bar:
    """One progress bar for the whole study: done / running / failed and tqdm's ETA, fed by results."""

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="run", desc="study", dynamic_ncols=True, smoothing=0.1)
        self.done = self.failed = self.running = 0
        self.show()

    def show(self) -> None:
        self.bar.set_postfix_str(f"done {self.done}, running {self.running}, failed {self.failed}", refresh=True)

    def finished(self, ok: bool, line: str) -> None:
        if ok:
            self.done += 1
        else:
            self.failed += 1
        self.bar.write(line)
        self.bar.update(1)
        self.show()

    def close(self) -> None:
        self.bar.close()


def choose_model(current: str | None, held: list[str | None], pending: dict[str, int]) -> str | None:
    """The model an idle actor should work on next: its own while runs of it are pending, else the pending
    model the fewest other actors hold (most pending runs first), so that actors spread over the models
    instead of all loading each model in turn."""
    if current is not None and pending.get(current, 0) > 0:
        return current
    candidates = [m for m, n in pending.items() if n > 0]
    if not candidates:
        return current
    return min(candidates, key=lambda m: (held.count(m), -pending[m], m))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _drive(ray, store: Store, pool: _Pool, opts: WorkerOptions, ray_opts: RayOptions) -> dict[str, int]:
    host, pid = hostname(), os.getpid()
    counts = store.counts()
    bar = _Bar(counts["pending"] + counts["running"])
    tally = {"done": 0, "failed": 0, "lost": 0, "retried": 0}
    inflight: dict = {}  # ObjectRef -> slot
    starting: dict = {}  # ready ObjectRef -> slot
    queue_empty = False
    last_beat = time.monotonic()

    def give_back_or_fail(claim: Claim, why: str) -> None:
        if claim.attempts >= ray_opts.max_attempts:
            store.fail(claim, f"the worker process died {claim.attempts} times running this run; last: {why}")
            bar.finished(False, f"FAILED {claim.name}: its worker died {claim.attempts} times ({why})")
            tally["failed"] += 1
        else:
            store.release(claim)  # back to pending: another worker takes it (attempts + 1)
            bar.bar.write(f"{claim.name}: worker died ({why}); run goes back to the queue")
            tally["retried"] += 1

    try:
        while True:
            for slot in pool.slots:
                if slot.ready_ref is not None and slot.ready_ref not in starting:
                    starting[slot.ready_ref] = slot
            # every ready idle actor gets a run, of the model it holds first
            for slot in pool.slots:
                if slot.ready_ref is None and slot.claim is None and not queue_empty:
                    held = [s.model for s in pool.slots if s is not slot]
                    prefer = choose_model(slot.model, held, store.pending_by_model())
                    claim = store.claim(slot.name, prefer_model=prefer, stale_after=opts.stale_after,
                                        host=host, pid=pid)
                    if claim is None:
                        queue_empty = True
                        break
                    slot.claim, slot.model = claim, claim.model  # the actor's session will hold this model
                    inflight[slot.actor.run.remote(claim.spec)] = slot
            bar.running = len(inflight)
            bar.show()
            if not inflight and (queue_empty or not starting):
                break
            ready, _ = ray.wait(list(inflight) + list(starting), num_returns=1,
                                timeout=min(opts.heartbeat_every, 5.0))
            if time.monotonic() - last_beat >= opts.heartbeat_every:
                for slot in inflight.values():
                    store.heartbeat(slot.claim)
                last_beat = time.monotonic()
            for ref in ready:
                if ref in starting:
                    slot = starting.pop(ref)
                    try:
                        info = ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - a worker that cannot start is replaced (bounded)
                        pool.replace(slot, _first_line(err))
                        continue
                    slot.ready_ref = None
                    slot.name = f"ray:{info['host']}:{info['pid']}/a{slot.index}"
                    continue
                slot = inflight.pop(ref)
                claim, slot.claim = slot.claim, None
                bar.running = len(inflight)
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # the call itself broke (e.g. a result Ray cannot send)
                    out = {"error": f"{type(err).__name__}: {err}"}
                except ray.exceptions.RayError as err:  # the actor's process or node is gone
                    why = _first_line(err)
                    give_back_or_fail(claim, why)
                    queue_empty = False
                    pool.replace(slot, why)
                    continue
                if "environment" in out:
                    store.release(claim)
                    bar.bar.write(f"stopping: {type(out['environment']).__name__}: {out['environment']} "
                                  f"({claim.name} goes back to the queue)")
                    raise out["environment"]
                if "error" in out:
                    store.fail(claim, out["error"])
                    first = out["error"].splitlines()[0]
                    bar.finished(False, f"FAILED {claim.name}: {first}")
                    tally["failed"] += 1
                    continue
                record = out["record"]
                if store.finish(claim, record):
                    tally["done"] += 1
                    seconds = record.get("time_s")
                    bar.finished(True, f"done  {claim.name}: {_ppl_text(record)} "
                                       f"({format_duration(seconds)}, {slot.name})")
                else:
                    tally["lost"] += 1
                    bar.bar.write(f"{claim.name}: the claim was taken over by another worker; result discarded")
    except BaseException:
        # Ctrl-C, SIGTERM, an environment error, a pool that keeps dying: hand the runs in flight back
        for slot in inflight.values():
            if slot.claim is not None:
                store.release(slot.claim)
        raise
    finally:
        bar.close()
    return tally


def _raise_interrupt(signum, frame):  # noqa: ANN001
    raise KeyboardInterrupt(f"signal {signum}")


def check_ray_options(ray_opts: RayOptions) -> None:
    """The options that can be checked without a cluster."""
    if ray_opts.max_attempts < 1:
        raise ValueError(f"--max-attempts must be at least 1, got {ray_opts.max_attempts}")
    if ray_opts.workers is not None and ray_opts.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {ray_opts.workers}")


def run_ray(base: WorkerOptions, requested_device: str | None, ray_opts: RayOptions) -> int:
    """Work through the study's queue on a Ray cluster; 0 when the queue is empty, 130 is raised as Ctrl-C."""
    check_ray_options(ray_opts)
    ray = import_ray()
    store = Store(base.db)
    try:
        counts = store.counts()
        if counts["pending"] == 0 and counts["running"] == 0:
            return 0  # nothing to do: no cluster to start
        started = connect(ray, ray_opts.address)
        main_thread = threading.current_thread() is threading.main_thread()
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
        pool = None
        try:
            n, resources, device = plan_actors(ray.cluster_resources(), requested_device, ray_opts)
            n = min(n, counts["pending"] + counts["running"])
            print(f"ray: {n} workers ({device}, {resources['num_gpus']:g} GPU / {resources['num_cpus']:g} CPU each)",
                  flush=True)
            pool = _Pool(ray, n, resources, replace(base, device=device), max_restarts=n * ray_opts.max_attempts)
            tally = _drive(ray, store, pool, base, ray_opts)
        finally:
            if pool is not None:
                pool.stop()
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            if started:
                ray.shutdown()
        if tally["retried"]:
            print(f"ray: {tally['retried']} run(s) retried after a worker died", flush=True)
        return 0
    finally:
        store.close()
