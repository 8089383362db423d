"""Task accuracy through lm-evaluation-harness, on the model in memory (real kernels and LoRC included).

``ptqlab run --tasks T1,T2 [--num-fewshot K] [--limit N] [--tasks-dir DIR]`` hands the run's quantized
``nn.Module`` to lm-eval's ``HFLM`` (no export) and records ``tasks: {name: {metric: value, ...}}`` with
lm-eval's metric names, the default filter's ``,none`` suffix dropped (``acc``, ``acc_stderr``, ``acc_norm``).

Offline, tasks read local data: ``--tasks-dir DIR`` is lm-eval's ``include_path``, a folder of task YAMLs whose
``dataset_path: json`` (or parquet, csv) and ``dataset_kwargs.data_files`` name local files. Relative
``data_files`` paths are read from DIR (lm-eval runs with DIR as the working folder). lm-eval's own tasks
(``piqa``, ``arc_easy``, ...) read the Hugging Face datasets cache when ``HF_DATASETS_OFFLINE=1``.
Everything that can be checked without a model (lm-eval installed, every task name known, every local data
file there) is checked by :func:`check_tasks` before the model loads.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
from pathlib import Path

from torch import nn

INSTALL = "pip install 'ptqlab[eval]' (or pip install lm-eval)"
_MANAGERS: dict[tuple[str | None, bool], object] = {}  # lm-eval's task index, built once per process


class TaskError(ValueError):
    pass


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as err:
        raise TaskError(f"--tasks needs lm-evaluation-harness, which is not installed ({err}): {INSTALL}") from None
    import lm_eval

    return lm_eval


def _manager(folder: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager

    if (folder, defaults) not in _MANAGERS:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        _MANAGERS[folder, defaults] = TaskManager(include_path=folder, include_defaults=defaults)
    return _MANAGERS[folder, defaults]


def task_manager(tasks_dir: str | None, tasks: tuple[str, ...] | list[str] = ()):
    """lm-eval's TaskManager for ``tasks``: over ``tasks_dir`` alone when it defines them all (indexing
    lm-eval's own thousands of task YAMLs takes seconds), else over lm-eval's tasks and ``tasks_dir``'s."""
    _lm_eval()
    folder = str(Path(tasks_dir).expanduser().resolve()) if tasks_dir else None
    if folder is not None and tasks:
        local = _manager(folder, False)
        if all(name in local.task_index for name in tasks):
            return local
    return _manager(folder, True)


def _local_data_files(cfg: dict) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for v in files.values() for f in ([v] if isinstance(v, str) else v)]
    return list(files or [])


def check_tasks(tasks: tuple[str, ...] | list[str], tasks_dir: str | None = None) -> None:
    """Refuse, before any model work, tasks that cannot run: no lm-eval, an unknown task name, a task of
    ``tasks_dir`` whose data file is missing."""
    if not tasks:
        return
    folder = None
    if tasks_dir is not None:
        folder = Path(tasks_dir).expanduser()
        if not folder.is_dir():
            raise TaskError(f"--tasks-dir {tasks_dir} does not exist")
        if not any(folder.rglob("*.yaml")):
            raise TaskError(f"--tasks-dir {tasks_dir} holds no task YAML files (*.yaml)")
    manager = task_manager(tasks_dir, tasks)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            hint = difflib.get_close_matches(name, sorted(known), n=3)
            raise TaskError(f"--tasks: unknown task {name!r}" + (f" (did you mean {', '.join(hint)}?)" if hint else "")
                            + ("" if tasks_dir else "; give --tasks-dir DIR for tasks defined in local YAML files"))
        entry = manager.task_index[name]
        path = entry.yaml_path
        if folder is None or path is None or folder.resolve() not in Path(path).resolve().parents:
            continue
        for file in _local_data_files(entry.cfg or {}):
            if "://" in file:
                continue
            where = Path(file).expanduser()
            where = where if where.is_absolute() else folder / where
            if not where.exists():
                raise TaskError(f"task {name!r} ({path}): its data file {file} does not exist (looked for {where})")


def _plain_metrics(values: dict) -> dict:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": v, "alias": ...}`` -> ``{"acc": v, "acc_stderr": v}``."""
    out = {}
    for key, value in values.items():
        if key == "alias" or "," not in key:
            continue
        metric, _, filt = key.partition(",")
        name = metric if filt == "none" else key
        out[name] = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    return out


def evaluate_tasks(model: nn.Module, tokenizer, tasks: tuple[str, ...] | list[str], num_fewshot: int | None = None,
                   limit: int | None = None, tasks_dir: str | None = None, batch_size: int | None = None,
                   progress: bool = False) -> dict:
    """Score ``model`` (on its device, as it is: fake or real kernels, LoRC) on lm-eval tasks; returns
    ``{task: {metric: value}}`` plus ``samples`` (documents scored) per task."""
    check_tasks(tasks, tasks_dir)
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    if batch_size is None:
        batch_size = 16 if device.type == "cuda" else 1
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    folder = Path(tasks_dir).expanduser().resolve() if tasks_dir else None
    manager = task_manager(tasks_dir, tasks)  # before the chdir: a relative tasks_dir names the same folder
    with contextlib.chdir(folder) if folder else contextlib.nullcontext():
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False)
    model.train(was_training)
    samples = results.get("n-samples", {})
    out = {}
    for name, values in results["results"].items():
        out[name] = _plain_metrics(values)
        n = samples.get(name, {}).get("effective")
        if n is not None:
            out[name]["samples"] = int(n)
    return out


def lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # noqa: BLE001 - not installed
        return None
