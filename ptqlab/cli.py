"""The ``ptqlab`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_args import DeprecatedFlag, Parser, _cli_value, add_option, at_least, checked_int, device_arg  # noqa: F401
from .config import OPTIONS, QuantConfig, RunSpec, from_flat, help_with_default, parse_text_value
from .preflight import check_writable_file
from .quantizers import QuantSpec
from .tiny import TINY_ARCHS


def add_run_options(p: argparse.ArgumentParser) -> None:
    """One ``--key`` per :data:`ptqlab.config.OPTIONS` entry, with the config's defaults and help."""
    groups = {name: p.add_argument_group(name) for name in dict.fromkeys(o.group for o in OPTIONS.values())}
    for option in OPTIONS.values():
        g = groups[option.group]
        default = option.default
        if option.is_bool:
            g.add_argument(option.flag, dest=option.key, action="store_true", default=default,
                           help=option.help_text)
            if option.negative:
                g.add_argument(option.negative, dest=option.key, action="store_false", help=f"not {option.flag}")
            if option.deprecated:
                on, off = option.deprecated
                g.add_argument(on, dest=option.key, action=DeprecatedFlag, const=True, new_flag=option.flag,
                               help=argparse.SUPPRESS)
                g.add_argument(off, dest=option.key, action=DeprecatedFlag, const=False, new_flag=option.negative,
                               help=argparse.SUPPRESS)
            continue
        g.add_argument(option.flag, dest=option.key, type=_cli_value(option), default=default,
                       help=option.help_text)
    groups["data"].add_argument("--data-dir", default=None,
                                help="local copies of the datasets (default: $PTQLAB_DATA, else the hub)")


def spec_from_args(a: argparse.Namespace, model: str) -> RunSpec:
    """The :class:`RunSpec` of parsed ``ptqlab run`` options."""
    return from_flat({"model": model, **{key: getattr(a, key) for key in OPTIONS}})


def _add_device_args(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    from .experiment import KERNEL_MODES, check_batch

    p.add_argument("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    if dtype:  # ``ptqlab run`` has it among the run options
        add_option(p, "dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--offload", action="store_true", default=None,
                   help="evaluate one block at a time on the device (default: only if the model does not fit)")
    p.add_argument("--calib-batch", type=checked_int(lambda v: check_batch(v, "--calib-batch"), "calib_batch"),
                   default=8, help=help_with_default("windows per block forward while calibrating (lower it if the "
                                                     "GPU runs out of memory)", 8))
    p.add_argument("--calib-offload", action="store_true",
                   help="keep the calibration hidden states in CPU memory, one batch at a time on the GPU")
    p.add_argument("--eval-batch", type=checked_int(lambda v: check_batch(v, "--eval-batch"), "eval_batch"),
                   default=None, help="windows per evaluation forward (default: sized from free GPU memory; 1 on CPU)")
    p.add_argument("--kernel", choices=KERNEL_MODES, default="fake",
                   help=help_with_default("fake: dequantized weights; real: packed low-bit GPU kernels (error where "
                                          "none exists); auto: real where a kernel exists, else fake", "fake"))


def _default_device(requested: str | None) -> str:
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {requested} was asked for but no CUDA device is available")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


# the ``--speed`` figures the run table shows: record key -> column
SPEED_COLUMNS = {"decode_tok_s_b1": ("decode tok/s b1", ".0f"), "decode_tok_s_b16": ("decode tok/s b16", ".0f"),
                 "prefill_tok_s": ("prefill tok/s", ".0f"), "decode_peak_gpu_gib": ("decode peak GiB", ".3f"),
                 "weight_bytes": ("weight MiB", "mib")}


def print_table(records: list[dict], file=None) -> None:
    """Runs x (bits/w, PPL per dataset, KL divergence per dataset where measured, task accuracies, speed where
    measured, time)."""
    file = file or sys.stdout
    datasets = sorted({d for r in records for d in r["ppl"]})
    kld = sorted({d for r in records for d in r.get("kld", {})})
    tasks = sorted({t for r in records for t in r.get("tasks", {})})

    def task_value(r: dict, t: str) -> str:
        values = r.get("tasks", {}).get(t, {})
        metric = next((m for m in ("acc", "acc_norm", "exact_match") if values.get(m) is not None), None)
        return "n/a" if metric is None else f"{values[metric]:.3f}"

    speed = [k for k in SPEED_COLUMNS if any(k in r.get("speed", {}) for r in records)]

    def speed_value(r: dict, k: str) -> str:
        v, fmt = r.get("speed", {}).get(k), SPEED_COLUMNS[k][1]
        return "" if v is None else f"{v / 2**20:.1f}" if fmt == "mib" else f"{v:{fmt}}"

    header = ["run", "bits/w", *datasets, *[f"KLD {d}" for d in kld], *tasks, *[SPEED_COLUMNS[k][0] for k in speed],
              "time s"]
    rows = [[r["name"], f"{r['bits_per_weight']:.2f}", *[f"{r['ppl'].get(d, float('nan')):.3f}" for d in datasets],
             *[f"{r['kld'][d]['mean']:.4f}" if d in r.get("kld", {}) else "" for d in kld],
             *[task_value(r, t) for t in tasks], *[speed_value(r, k) for k in speed], f"{r['time_s']:.1f}"]
            for r in records]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)), file=file)


class RecordSink:
    """The ``--output`` file records are appended to. A write that fails after the runs loses nothing: the
    records it could not take are printed as JSON and :meth:`close` ends with one error line."""

    def __init__(self, path: str | None) -> None:
        check_writable_file(path, "--output")  # before any run: most mistakes are caught here
        self.path = path
        self.unwritten: list[dict] = []
        self.written = 0
        self.error: OSError | None = None

    def add(self, record: dict) -> None:
        if not self.path:
            return
        if self.error is None:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                self.written += 1
                return
            except OSError as err:
                self.error = err
        self.unwritten.append(record)

    def close(self) -> None:
        """Say where the records went; raise ValueError (exit code 2) once the table is out if some did not."""
        if not self.path:
            return
        if self.error is None:
            print(f"{'record' if self.written == 1 else f'{self.written} records'} appended to {self.path}")
            return
        print(f"the records that could not be appended to {self.path}, as JSON lines:")
        for record in self.unwritten:
            print(json.dumps(record))
        raise ValueError(f"--output {self.path}: {self.error.strerror or self.error}; {len(self.unwritten)} "
                         f"record(s) printed above as JSON instead")


def cmd_run(a: argparse.Namespace) -> int:
    from . import distributed
    from .export import format_of

    device = _default_device(a.device)
    if a.model and format_of(a.model) is not None:
        if distributed.launched():
            raise ValueError(f"{a.model} is a saved quantized model: evaluating it does not distribute; run it "
                             f"without torchrun")
        return _run_saved(a, device, RecordSink(a.output))
    dist, device = distributed.from_environment(device, a.dist_timeout)
    try:
        return _run_spec(a, device, dist)
    finally:
        dist.close()


def _run_spec(a: argparse.Namespace, device: str, dist) -> int:
    from .distributed import model_files_digest, run_description_digest
    from .experiment import ModelSession, check_run, run

    sink = RecordSink(a.output if dist.is_main else None)
    spec = spec_from_args(a, a.model or "testbed-opt")
    # every check that needs no model, before the model is loaded
    if a.stream:
        from .streaming import check_stream

        check_stream(spec, a.save, a.kernel, a.save_format)
    dist.check_supported(spec.config)
    check_run(spec, device, a.data_dir, a.eval_batch, a.kernel, a.save, a.overwrite, a.offload, a.calib_batch,
              a.calib_offload)
    dist.check_agree("run description", run_description_digest(spec.to_flat(), {
        "calib_batch": a.calib_batch, "device": device.split(":")[0], "model_files": model_files_digest(spec.model)}))
    progress = not a.no_progress and dist.is_main
    if a.stream:
        from .streaming import StreamSession

        session = StreamSession(spec.model, device, a.dtype, a.data_dir, progress, a.calib_batch, a.calib_offload)
    else:
        session = ModelSession(spec.model, device, a.dtype, a.data_dir, progress, a.offload, a.calib_batch,
                               a.calib_offload)
    record = run(spec, session, progress=progress, eval_batch=a.eval_batch, kernel=a.kernel, save=a.save,
                 overwrite=a.overwrite, save_format=a.save_format, dist=dist)
    if record is None:  # a rank other than 0: its share is done, rank 0 evaluates and writes
        return 0
    sink.add(record)
    print_table([record])
    if a.save:
        print(f"quantized model saved to {a.save} (stored bits/weight {record['stored_bits_per_weight']:.3f})")
    sink.close()
    return 0


def _run_saved(a: argparse.Namespace, device: str, sink: RecordSink) -> int:
    """``run --model DIR`` on a saved quantized folder: evaluate it as saved (quantization options do not apply)."""
    from .export.evaluate_saved import evaluate_saved

    given = [OPTIONS[k].flag for k in OPTIONS
             if OPTIONS[k].path.startswith("config.") and getattr(a, k) != OPTIONS[k].default]
    given += [flag for flag, value in (("--save", a.save), ("--overwrite", a.overwrite)) if value]
    if given:
        raise ValueError(f"{a.model} is already quantized and is evaluated as saved: drop {', '.join(given)}")
    if a.speed:
        raise ValueError(f"--speed times a run's model in memory; a saved folder ({a.model}) is not timed yet: "
                         f"drop --speed, or time the run that saves it (ptqlab run ... --kernel real --speed)")
    if a.tasks:
        from .tasks import check_tasks

        check_tasks(a.tasks, a.tasks_dir)  # before the model loads
    record = evaluate_saved(a.model, tuple(a.eval), a.seqlen, device, a.dtype, a.max_eval_windows, a.data_dir,
                            not a.no_progress, a.offload, verify=not a.no_verify, eval_batch=a.eval_batch,
                            metrics=tuple(a.metrics), tasks=tuple(a.tasks), num_fewshot=a.num_fewshot,
                            limit=a.limit, tasks_dir=a.tasks_dir)
    sink.add(record)
    print_table([record])
    for name, value in record["ppl_at_save"].items():
        if name in record["ppl"]:
            print(f"{name}: {record['ppl'][name]:.3f} now, {value:.3f} when saved")
    sink.close()
    return 0


def demo_configs() -> list[QuantConfig]:
    """FP16, then RTN, GPTQ and GPTQ+LoRC at W4A16 g128 and W4A8."""
    w4 = QuantSpec(4, True, 128)
    a8 = QuantSpec(8, True, 0)
    return [
        QuantConfig(method="fp16"),
        QuantConfig(method="rtn", weight=w4),
        QuantConfig(method="gptq", weight=w4),
        QuantConfig(method="gptq", weight=w4, lorc_rank=8),
        QuantConfig(method="rtn", weight=w4, act=a8),
        QuantConfig(method="gptq", weight=w4, act=a8),
        QuantConfig(method="gptq", weight=w4, act=a8, lorc_rank=8),
    ]


def cmd_demo(a: argparse.Namespace) -> int:  # noqa: C901 - a script: datasets, runs, table
    from .data import DataError, check_available
    from .experiment import ModelSession, check_run, run

    device = _default_device(a.device)
    sink = RecordSink(a.output)
    max_windows = None if a.full or device != "cpu" else a.max_eval_windows
    datasets, skipped = [], []
    for name in a.eval:  # the demo runs on what is there: sets that cannot be read are skipped, not an error
        try:
            check_available(name, "eval", a.data_dir)
            datasets.append(name)
        except DataError:
            skipped.append(name)
    if not datasets:
        raise DataError(f"none of the evaluation sets ({','.join(a.eval)}) is available")

    def spec_of(config: QuantConfig) -> RunSpec:
        return RunSpec(model=a.model, config=config, eval=tuple(datasets), seqlen=a.seqlen, calib="testbed",
                       nsamples=a.nsamples, max_eval_windows=max_windows, dtype=a.dtype)

    # before the model is loaded; a calibrating run needs everything any demo run does
    calibrating = next(c for c in demo_configs() if c.needs_calibration)
    check_run(spec_of(calibrating), device, a.data_dir, a.eval_batch, a.kernel, offload=a.offload,
              calib_batch=a.calib_batch, calib_offload=a.calib_offload)
    session = ModelSession(a.model, device, a.dtype, a.data_dir, not a.no_progress, a.offload,
                           a.calib_batch, a.calib_offload)
    for name in list(datasets):
        try:
            session.eval_tokens(name, session.seqlen(a.seqlen))
        except DataError:
            datasets.remove(name)
            skipped.append(name)
    if skipped:
        print(f"skipped {', '.join(skipped)}: not found here; add them with --data-dir DIR or PTQLAB_DATA=DIR "
              f"(layout of shared/data/README.md), or pip install -e \".[hub]\" with Hugging Face hub access")
    if not datasets:
        raise DataError(f"none of the evaluation sets ({','.join(a.eval)}) is available")
    records = []
    for config in demo_configs():
        record = run(spec_of(config), session, progress=not a.no_progress, eval_batch=a.eval_batch, kernel=a.kernel)
        sink.add(record)
        records.append(record)
    scope = "full splits" if max_windows is None else f"first {max_windows} windows of each split (--full for all)"
    print(f"\nmodel {a.model} on {device}; evaluation: {scope}, seqlen {records[0]['config']['seqlen']}")
    print(f"data: {', '.join(f'{k}={v}' for k, v in records[0]['data_sources'].items())}")
    print("heldout = the testbed corpus's held-out text (in-domain); WikiText-2 and PTB are out of its domain\n")
    print_table(records)
    sink.close()
    return 0


def cmd_make_tiny(a: argparse.Namespace) -> int:
    from .tiny import make_tiny

    out = make_tiny(a.arch, a.out, a.text, a.seed, hidden=a.hidden, layers=a.layers, heads=a.heads)
    print(f"tiny {a.arch} model written to {out}")
    return 0


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--dist-timeout must be a positive number of seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # every flag's help shows its default the same way: help_with_default's " (default: X)"; a flag that sets
    # what is already the default says "(default)"; an off-by-default switch says nothing (tests/test_cli.py)
    parser = Parser(prog="ptqlab", description="Post-training quantization of LLMs (ZeroQuant-V2 study)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="quantize a model and measure its perplexity")
    p.add_argument("--model", default=None, help="local folder, hub id, or testbed-opt / testbed-bloom (default "
                   "testbed-opt); a folder saved with --save is evaluated as saved")
    add_run_options(p)
    _add_device_args(p, dtype=False)
    p.add_argument("--output", default=None, help="append the JSON record to this .jsonl file")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write the quantized model to DIR (compressed-tensors folder, LoRC as a PEFT adapter); "
                        "refused if DIR is not empty, unless --overwrite")
    p.add_argument("--stream", action="store_true",
                   help="with --save: quantize block by block from the checkpoint's memory-mapped safetensors, "
                        "writing each block as it finishes (for models larger than host memory; evaluated block "
                        "by block, as --offload)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --save: replace DIR if it holds a saved model (written beside it, then swapped in)")
    from .export import EXPORT_FORMATS

    p.add_argument("--save-format", default="compressed-tensors", choices=list(EXPORT_FORMATS),
                   help="with --save: the format (" + "; ".join(f"{k}: {f.summary}" for k, f in EXPORT_FORMATS.items())
                   + ") (default: compressed-tensors)")
    from .distributed import DEFAULT_TIMEOUT_S

    p.add_argument("--dist-timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=help_with_default("under torchrun: seconds a rank waits for the others before it stops with "
                                          "an error (a rank that died or hangs)", DEFAULT_TIMEOUT_S))
    p.add_argument("--no-verify", action="store_true",
                   help="with --model DIR (a saved folder): skip checking its files against the sha256 digests "
                        "recorded at save time (one read of the folder)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="FP16 vs RTN, GPTQ and GPTQ+LoRC at W4A16 g128 and W4A8 on a testbed model")
    p.add_argument("--model", default="testbed-opt", help=help_with_default("the model", "testbed-opt"))
    add_option(p, "eval", "wikitext2,ptb,heldout",
               help="comma-separated evaluation sets; those not found here are skipped")
    add_option(p, "seqlen", help="evaluation and calibration window in tokens (the testbed models allow 512)")
    add_option(p, "nsamples", help="calibration windows (from the testbed's calibration text)")
    p.add_argument("--data-dir", default=None,
                   help="local copies of the datasets (default: $PTQLAB_DATA, else the hub)")
    add_option(p, "max_eval_windows", 64, help="on CPU, evaluate this prefix of each split")
    p.add_argument("--full", action="store_true", help="evaluate the full splits on CPU too (slow)")
    p.add_argument("--output", default=None, help="append the JSON record of each run to this .jsonl file")
    _add_device_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("make-tiny", help="write a tiny random model + tokenizer (offline)")
    p.add_argument("--arch", required=True, choices=TINY_ARCHS, help="architecture (required)")
    p.add_argument("--out", required=True, help="the folder to write (required)")
    p.add_argument("--text", default=None, help="train the BPE tokenizer on this text file (default: bytes only)")
    p.add_argument("--hidden", type=at_least(1, "--hidden"), default=64, help=help_with_default("hidden size", 64))
    p.add_argument("--layers", type=at_least(1, "--layers"), default=2, help=help_with_default("decoder blocks", 2))
    p.add_argument("--heads", type=at_least(1, "--heads"), default=4, help=help_with_default("attention heads", 4))
    p.add_argument("--seed", type=at_least(0, "--seed"), default=0,
                   help=help_with_default("seed of the random weights", 0))
    p.set_defaults(func=cmd_make_tiny)

    from .study.cli import add_study_commands  # noqa: PLC0415

    add_study_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error argparse already explained
        return int(done.code or 0)
    from .data import DataError
    from .distributed import DistributedError
    from .models import UnsupportedModelError
    from .quantizers import QuantizationError
    from .study.store import StoreError

    try:
        return a.func(a)
    except (QuantizationError, DataError, UnsupportedModelError, FileNotFoundError, ValueError, StoreError,
            DistributedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        import torch

        if not isinstance(err, torch.OutOfMemoryError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
