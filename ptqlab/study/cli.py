"""Study sub-commands (``study``, ``report``, ``sensitivity``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ..cli_args import DeprecatedFlag, add_option, at_least, device_arg
from ..config import help_with_default


def _models(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [m.strip() for v in values for m in v.split(",") if m.strip()]
    return list(dict.fromkeys(out)) or None


def _worker_options(a: argparse.Namespace, db: str):
    from .runner import WorkerOptions

    return WorkerOptions(db=db, data_dir=a.data_dir, stale_after=a.stale_after, progress=a.progress,
                         calib_batch=a.calib_batch, calib_offload=a.calib_offload, kernel=a.kernel)


def _queue_runner(a: argparse.Namespace) -> Callable[[str], int]:
    """The function that works through a study's queue, with every execution option checked first and
    Ray imported: a study that cannot start fails before its runs are written into the store."""
    from .runner import assign_devices, run_workers

    if a.executor == "ray":
        from .ray_executor import RayOptions, check_ray_options, import_ray, run_ray

        ray_opts = RayOptions(address=a.ray_address, workers=a.workers,
                              gpus_per_worker=1.0 if a.gpus_per_worker is None else a.gpus_per_worker,
                              cpus_per_worker=1.0 if a.cpus_per_worker is None else a.cpus_per_worker,
                              max_attempts=3 if a.max_attempts is None else a.max_attempts)
        check_ray_options(ray_opts)
        import_ray()
        return lambda db: run_ray(_worker_options(a, db), a.device, ray_opts)
    given = [f"--{k.replace('_', '-')}" for k in ("ray_address", "gpus_per_worker", "cpus_per_worker", "max_attempts")
             if getattr(a, k) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} only apply with --executor ray")
    workers = 1 if a.workers is None else a.workers  # at least 1: checked while parsing
    assign_devices(workers, a.device)  # --device cuda without a GPU, cuda:N with several workers
    return lambda db: run_workers(_worker_options(a, db), workers, a.device)


def check_plan_data(specs: list[dict], data_dir: str | None) -> None:
    """Every text the runs read can be loaded (local copy, text file, or the hub), and every lm-eval task they
    score exists: checked before the store is touched, so that a study started without its data leaves no
    pending runs behind."""
    from ..data import check_available

    needed: list[tuple[str, str]] = []
    for spec in specs:
        needed += [(name, "eval") for name in spec.get("eval", [])]
        if "calib" in spec:  # only the runs that calibrate carry it (RunSpec.to_flat)
            needed.append((spec["calib"], "calib"))
    for name, split in dict.fromkeys(needed):
        check_available(name, split, data_dir)
    task_sets = {(tuple(spec["tasks"]), spec.get("tasks_dir")) for spec in specs if spec.get("tasks")}
    if task_sets:
        from ..tasks import check_tasks

        for tasks, tasks_dir in task_sets:  # lm-eval there, every task known, its local data present
            check_tasks(tasks, tasks_dir)
    check_plan_calibration(specs, data_dir)


def check_plan_calibration(specs: list[dict], data_dir: str | None) -> None:
    """Every calibrating run's text holds the windows it asks for (the check ``data.calibration_windows`` makes
    when the run starts), for runs on a model with a local folder (the testbed, a path) calibrating from a text
    rather than C4's documents: a study once stopped there at run 53 of 82 (recipes/methods.yaml on testbed-bloom,
    whose 2048-token windows the testbed text held 37 of, not 128). Each (model, text, windows, window length) is
    drawn once; a model that is not there yet is left to its run's own error."""
    from ..data import DataError, calibration_windows
    from ..experiment import window_lengths
    from ..models import model_config
    from ..testbed import resolve_model_path
    from .recipe import run_name
    from .runner import run_spec

    seen: set[tuple] = set()
    tokenizers: dict[str, object] = {}
    for spec in specs:
        if "calib" not in spec:
            continue
        run = run_spec(spec)  # resolves calib "auto"
        if run.calib == "c4":
            continue
        try:
            path = resolve_model_path(run.model)
        except FileNotFoundError:
            continue
        if not (Path(path) / "config.json").is_file():
            continue  # a hub model: its run loads it (and says so when it cannot)
        _, calib_seqlen = window_lengths(run, model_config(path))
        key = (str(path), run.calib, run.nsamples, calib_seqlen)
        if key in seen:
            continue
        seen.add(key)
        if path not in tokenizers:
            from transformers import AutoTokenizer

            tokenizers[path] = AutoTokenizer.from_pretrained(path)
        try:
            calibration_windows(tokenizers[path], run.calib, run.nsamples, calib_seqlen, run.seed, data_dir)
        except DataError as err:
            raise DataError(f"{run_name(spec)}: {err} (in a study: nsamples, calib_seqlen or seqlen in the "
                            f"recipe's settings or --set)") from None


def check_plan_execution(specs: list[dict], a: argparse.Namespace) -> None:
    """Every run can execute with the study's --kernel and --device (``speed`` runs time the real kernels on a
    GPU; a ``save`` run saves before kernel selection): checked before the store is touched."""
    from ..experiment import check_speed
    from .runner import run_spec

    device = "cuda" if a.executor == "ray" else a.device  # Ray actors get their GPUs from the cluster
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    for spec in specs:
        check_speed(run_spec(spec), device, a.kernel)
        if spec.get("save") and a.kernel != "fake":
            raise ValueError(f"--kernel {a.kernel}: the recipe saves models, which are written before kernel "
                             f"selection; run the saving study with --kernel fake (the default)")


def _summary(store, keys: list[str]) -> tuple[dict, list[dict]]:
    counts = store.counts(keys)
    wanted = set(keys)
    failed = [r for r in store.rows() if r["status"] == "failed" and r["run_hash"] in wanted]
    return counts, failed


def _print_summary(counts: dict, failed: list[dict], db: str) -> int:
    print(f"study: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending, "
          f"{counts['running']} running (in {db})")
    for r in failed:
        first = (r["error"] or "").splitlines()[0] if r["error"] else "?"
        print(f"  failed: {r['name']}: {first}")
    if failed:
        print("  (failed runs are not retried on resume; use --retry-failed)")
    print(f"report: ptqlab report {db}")
    return 1 if failed else 0


def cmd_study(a: argparse.Namespace) -> int:
    from .recipe import DEFAULT_MODELS, describe_plan, load_recipe, parse_assignments, parse_grid
    from .store import Store

    overrides = parse_assignments(" ".join(a.set), "--set", as_axes=False) if a.set else None
    models = _models(a.model)
    if a.recipe and a.grid:
        raise ValueError("give a recipe file or --grid, not both")
    if a.recipe:
        plan = load_recipe(a.recipe, models, overrides, a.data_dir)
        db = a.db or f"{Path(a.recipe).stem}.db"
    elif a.grid:
        plan = parse_grid(a.grid, models or [DEFAULT_MODELS[0]], overrides, a.data_dir)
        db = a.db or "study.db"
    else:
        if not a.db:
            raise ValueError("give a recipe, --grid, or --db STUDY.db to work on the runs already queued there")
        if not Path(a.db).exists():
            raise FileNotFoundError(f"study database {a.db} does not exist")
        runner = None if a.dry_run else _queue_runner(a)
        with Store(a.db, readonly=True) as store:  # nothing written before the queue can be worked on
            queued = [r["spec"] for r in store.rows() if r["status"] in ("pending", "running")]
        check_plan_data(queued, a.data_dir)
        check_plan_execution(queued, a)
        if runner is None:
            print(f"study {a.db}: {len(queued)} runs queued")
            return 0
        with Store(a.db) as store:
            store.reclaim_dead()
            counts = store.counts()
        print(f"study {a.db}: working on the queue ({counts['pending']} pending, {counts['running']} running)")
        rc = runner(a.db)
        with Store(a.db) as store:
            return _print_summary(*_summary(store, [r["run_hash"] for r in store.rows()]), a.db) or rc

    print(f"study '{plan.name}': {describe_plan(plan)}")
    for line in plan.note_lines():
        print(f"  note: {line}")
    if a.dry_run:
        for run in plan.runs:
            print(f"  {run.key}  {run.name()}")
        return 0
    runner = _queue_runner(a)  # before the store is touched: nothing is queued for a study that cannot start
    check_plan_data([r.spec for r in plan.runs], a.data_dir)
    check_plan_execution([r.spec for r in plan.runs], a)
    keys = [r.key for r in plan.runs]
    with Store(db) as store:
        changed = store.add_runs(plan.runs, force=a.force, retry_failed=a.retry_failed)
        reclaimed = store.reclaim_dead()
        counts = store.counts(keys)
    print(f"store {db}: {changed['added']} new, {changed['reset']} reset"
          + (f", {reclaimed} dead claims reclaimed" if reclaimed else "")
          + f"; {counts['done']} already done, {counts['failed']} failed, "
            f"{counts['pending'] + counts['running']} to run")
    rc = runner(db)
    with Store(db) as store:
        return _print_summary(*_summary(store, keys), db) or rc


def cmd_report(a: argparse.Namespace) -> int:
    from ..preflight import check_writable_file, check_writable_folder
    from .report import Metric, load_results, parse_thresholds, report

    if not Path(a.db).exists():
        raise FileNotFoundError(f"study database {a.db} does not exist")
    metric = Metric.parse(a.metric, a.dataset, a.relative)
    thresholds = parse_thresholds(a.thresholds) if a.thresholds else metric.default_thresholds
    check_writable_file(a.output, "--output")
    check_writable_folder(a.plots, "--plots")
    text = report(a.db, a.format, a.per_dataset, thresholds, a.top, metric)
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(text, encoding="utf-8")
        print(f"report written to {a.output}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if a.plots:
        from .plots import make_plots

        paths = make_plots(load_results(a.db), a.plots, metric)
        print(f"{len(paths)} plot files written to {a.plots}" if paths else "no plots: no finished runs to plot",
              file=sys.stderr)
    return 0


def cmd_sensitivity(a: argparse.Namespace) -> int:
    from .recipe import parse_assignments
    from .report import build_sections, load_results, parse_thresholds, render_markdown
    from .sensitivity import plan_sensitivity
    from .store import Store

    def bits_list(text: str, key: str) -> list[int]:
        return parse_assignments(f"{key}={text}", f"--{key}", as_axes=True)[key]

    precisions = [dict(wbits=w, wgroup=a.wgroup, wsym=a.wsym, abits=b, agroup=a.agroup, act_sym=a.act_sym)
                  for w in bits_list(a.wbits, "wbits") for b in bits_list(a.abits, "abits") if (w, b) != (16, 16)]
    if not precisions:
        raise ValueError("sensitivity needs --wbits or --abits below 16")
    eval_settings = {key: getattr(a, key) for key in ("seqlen", "eval", "max_eval_windows", "dtype")}
    thresholds = parse_thresholds(a.thresholds)
    runner = _queue_runner(a)
    runs = plan_sensitivity(a.model, a.granularity, precisions, eval_settings, a.data_dir)
    check_plan_data([r.spec for r in runs], a.data_dir)
    check_plan_execution([r.spec for r in runs], a)
    print(f"sensitivity of {a.model} per {a.granularity}: {len(runs) - 1} runs + the FP16 baseline")
    with Store(a.db) as store:
        changed = store.add_runs(runs, force=a.force, retry_failed=a.retry_failed)
        store.reclaim_dead()
        counts = store.counts([r.key for r in runs])
    print(f"store {a.db}: {changed['added']} new; {counts['done']} already done, "
          f"{counts['pending'] + counts['running']} to run")
    rc = runner(a.db)
    keys = {r.key for r in runs}
    results = [r for r in load_results(a.db) if r.row["run_hash"] in keys]
    sections = [s for s in build_sections(results, thresholds) if s.kind in ("model", "sensitivity")]
    print(render_markdown(sections, f"Sensitivity of {a.model} ({a.granularity})"))
    with Store(a.db) as store:
        return _print_summary(*_summary(store, list(keys)), a.db) or rc


def _add_worker_args(p: argparse.ArgumentParser, db_default: str | None = None) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--db", default=db_default, help=help_with_default(
        "the study database (SQLite); created if missing",
        db_default or "NAME.db in the current folder for recipe NAME.yaml, study.db for --grid"))
    g.add_argument("--force", action="store_true", help="recompute runs already done (default: resume, skip them)")
    g.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    g.add_argument("--device", type=device_arg, default=None,
                   help="cpu or cuda (default: cuda if available; worker i uses cuda:i)")
    g.add_argument("--data-dir", default=None, help="local copies of the datasets (default: $PTQLAB_DATA, else the hub)")
    g.add_argument("--workers", type=at_least(1, "--workers"), default=None,
                   help="local: worker processes (one per GPU; default 1); ray: actors (default: as many as the "
                        "cluster fits)")
    g.add_argument("--stale-after", type=float, default=300.0,
                   help=help_with_default("seconds without a heartbeat after which another worker takes a run over",
                                          300.0))
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help=help_with_default("local: worker processes on this host; ray: actors on a Ray cluster, the "
                                          "database stays with this process (pip install 'ptqlab[ray]')", "local"))
    g.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="ray: the cluster to join (default: $RAY_ADDRESS, else a new local cluster)")
    g.add_argument("--gpus-per-worker", type=float, default=None, metavar="F",
                   help="ray: GPUs per actor (default 1; 0.5 puts two small-model actors on a GPU)")
    g.add_argument("--cpus-per-worker", type=float, default=None, metavar="F",
                   help="ray: CPUs (torch threads) per actor (default 1); on a cluster without GPUs, "
                        "one actor per F CPUs")
    g.add_argument("--max-attempts", type=at_least(1, "--max-attempts"), default=None,
                   help="ray: tries of a run whose worker process died before it is recorded as failed (default 3)")
    g.add_argument("--progress", action="store_true", help="progress bars inside each run")
    g.add_argument("--calib-batch", type=at_least(1, "--calib-batch"), default=8,
                   help=help_with_default("windows per block forward while calibrating", 8))
    g.add_argument("--calib-offload", action="store_true", help="keep calibration hidden states in CPU memory")
    from ..kernels.real import KERNEL_MODES

    g.add_argument("--kernel", choices=KERNEL_MODES, default="fake",
                   help=help_with_default("fake: dequantized weights; real: packed low-bit GPU kernels (error where "
                                          "none exists; runs with speed: true need it); auto: real where a kernel "
                                          "exists", "fake"))


def add_study_commands(sub: argparse._SubParsersAction) -> None:
    """Register the study commands on the ``ptqlab`` parser."""
    from .report import FORMATS
    from .sensitivity import GRANULARITIES

    p = sub.add_parser(
        "study", help="run a sweep (YAML recipe or --grid) into a study database; resumable, parallel",
        description="Expand a recipe into runs, queue them in the study database and work through the queue. "
                    "Re-running resumes. Several GPUs of one host: --workers N. Several hosts: --executor ray "
                    "(the database stays on this host). Pointing processes on several hosts at one database "
                    "on a shared filesystem still works but is discouraged: SQLite's locking is unreliable "
                    "on many network filesystems and a broken lock can corrupt the file. Without a recipe "
                    "or --grid, work on the runs already queued in --db.")
    p.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/ and ptqlab/study/README.md)")
    p.add_argument("--grid", default=None, help='shorthand for one cross, e.g. "method=rtn,gptq wbits=3,4,8 wgroup=0,128"')
    p.add_argument("--model", action="append", default=None,
                   help="model(s) to sweep, replacing the recipe's (repeat or comma-separate; --grid default testbed-opt)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a run option for every run, overriding the recipe (e.g. --set seqlen=512)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and notes, run nothing")
    _add_worker_args(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="tables, recommendations and plots from a study database")
    p.add_argument("db", help="the study database (opened read-only)")
    p.add_argument("--format", choices=FORMATS, default="markdown", help=help_with_default("output format", "markdown"))
    p.add_argument("--per-dataset", action="store_true", help="also per-dataset tables (CSV: per-dataset columns)")
    p.add_argument("--plots", default=None, metavar="DIR", help="write PNG and SVG plots to DIR")
    p.add_argument("--metric", default="ppl",
                   help=help_with_default("what classes, ranks, recommendations and the Pareto plot rest on: ppl, "
                                          "kld (mean KL divergence to FP16; kld.median, kld.p99, kld.top1, kld.dp) "
                                          "or task:NAME[:METRIC] (lm-eval accuracy, default acc)", "ppl"))
    p.add_argument("--dataset", default=None,
                   help="classify on this evaluation dataset (e.g. heldout, the testbed's in-domain text) instead "
                        "of the mean over the datasets")
    p.add_argument("--relative", action="store_true",
                   help="class bounds in percent of the FP16 value (ppl, task metrics)")
    p.add_argument("--thresholds", default=None,
                   help="class bounds on the metric's degradation (default: 0.1,0.5 for ppl, the paper's; "
                        "1,5 with --relative; 0.01,0.05 for kld; 0.01,0.03 for task accuracy)")
    p.add_argument("--top", type=at_least(0, "--top"), default=5,
                   help=help_with_default("recommendations per class (0: all)", 5))
    p.add_argument("--output", default=None, help="write the report to this file (default: stdout)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sensitivity", help="quantize one module type / block / layer at a time (RTN) and "
                                           "measure the PPL change")
    p.add_argument("--model", default="testbed-opt", help=help_with_default("the model", "testbed-opt"))
    p.add_argument("--granularity", choices=GRANULARITIES, default="module",
                   help=help_with_default("module: one module type in every block; block: one block; layer: one "
                                          "linear of one block", "module"))
    p.add_argument("--wbits", default="4",
                   help=help_with_default("weight bits, comma-separated for several (16: not quantized)", "4"))
    add_option(p, "wgroup", 0)
    p.add_argument("--wsym", dest="wsym", action="store_true", default=True, help="symmetric weights (default)")
    p.add_argument("--wasym", dest="wsym", action="store_false", help="not --wsym")
    p.add_argument("--abits", default="16",
                   help=help_with_default("activation bits, comma-separated for several (16: not quantized)", "16"))
    add_option(p, "agroup", 0)
    p.add_argument("--act-sym", dest="act_sym", action="store_true", default=True,
                   help="symmetric activations (default)")
    p.add_argument("--act-asym", dest="act_sym", action="store_false", help="not --act-sym")
    p.add_argument("--asym", dest="act_sym", action=DeprecatedFlag, const=True, new_flag="--act-sym",
                   help=argparse.SUPPRESS)
    p.add_argument("--aasym", dest="act_sym", action=DeprecatedFlag, const=False, new_flag="--act-asym",
                   help=argparse.SUPPRESS)
    add_option(p, "eval", "wikitext2,ptb")
    add_option(p, "seqlen")
    add_option(p, "max_eval_windows")
    add_option(p, "dtype")
    p.add_argument("--thresholds", default="0.1,0.5", help=help_with_default("class bounds on delta PPL", "0.1,0.5"))
    _add_worker_args(p, db_default="sensitivity.db")
    p.set_defaults(func=cmd_sensitivity)
