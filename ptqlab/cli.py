"""The ``ptqlab`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .config import OPTIONS, QuantConfig, RunSpec, from_flat, parse_text_value
from .quantizers import QuantSpec


class DeprecatedFlag(argparse.Action):
    """An old spelling of a boolean flag: sets the value and warns once."""

    def __init__(self, option_strings, dest, const=None, new_flag="", **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, const=const, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warnings.warn(f"{option_string} is deprecated and will be removed in the next release: use {self.new_flag}",
                      FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, self.const)


def _cli_value(option):
    """argparse ``type=``: a command-line string checked as the option checks recipe values."""

    def convert(text: str):
        value = parse_text_value(option.key, text)
        try:
            return option.check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None

    convert.__name__ = option.key  # argparse names it in "invalid ... value"
    return convert


def add_run_options(p: argparse.ArgumentParser) -> None:
    """One ``--key`` per :data:`ptqlab.config.OPTIONS` entry, with the config's defaults and help."""
    groups = {name: p.add_argument_group(name) for name in ("quantization", "data")}
    for option in OPTIONS.values():
        g = groups[option.group]
        default = option.default
        if option.is_bool:
            g.add_argument(option.flag, dest=option.key, action="store_true", default=default,
                           help=option.help + (" (default)" if default else ""))
            if option.negative:
                g.add_argument(option.negative, dest=option.key, action="store_false", help=f"not {option.flag}")
            if option.deprecated:
                on, off = option.deprecated
                g.add_argument(on, dest=option.key, action=DeprecatedFlag, const=True, new_flag=option.flag,
                               help=argparse.SUPPRESS)
                g.add_argument(off, dest=option.key, action=DeprecatedFlag, const=False, new_flag=option.negative,
                               help=argparse.SUPPRESS)
            continue
        shown = ",".join(default) if isinstance(default, list) else default
        g.add_argument(option.flag, dest=option.key, type=_cli_value(option), default=default,
                       help=option.help + ("" if default is None else f" (default: {shown})"))
    groups["data"].add_argument("--data-dir", default=None,
                                help="local copies of the datasets (default: $PTQLAB_DATA, else the hub)")


def spec_from_args(a: argparse.Namespace, model: str) -> RunSpec:
    """The :class:`RunSpec` of parsed ``ptqlab run`` options."""
    return from_flat({"model": model, **{key: getattr(a, key) for key in OPTIONS}})


def _add_device_args(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    if dtype:  # ``ptqlab run`` has it among the run options
        p.add_argument("--dtype", default="auto", help=OPTIONS["dtype"].help)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--offload", action="store_true", default=None,
                   help="evaluate one block at a time on the device (default: only if the model does not fit)")
    p.add_argument("--calib-batch", type=int, default=8,
                   help="windows per block forward while calibrating (lower it if the GPU runs out of memory)")
    p.add_argument("--calib-offload", action="store_true",
                   help="keep the calibration hidden states in CPU memory, one batch at a time on the GPU")
    p.add_argument("--eval-batch", type=int, default=None,
                   help="windows per evaluation forward (default: sized from free GPU memory; 1 on CPU)")
    p.add_argument("--kernel", choices=["auto", "fake", "real"], default="fake",
                   help="fake: dequantized weights; real: packed low-bit GPU kernels (error where none exists); "
                        "auto: real where a kernel exists, else fake")


def _default_device(requested: str | None) -> str:
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda was asked for but no CUDA device is available")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def print_table(records: list[dict], file=None) -> None:
    file = file or sys.stdout
    datasets = sorted({d for r in records for d in r["ppl"]})
    header = ["run", "bits/w", *datasets, "time s"]
    rows = [[r["name"], f"{r['bits_per_weight']:.2f}", *[f"{r['ppl'].get(d, float('nan')):.3f}" for d in datasets],
             f"{r['time_s']:.1f}"] for r in records]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)), file=file)


def _append_jsonl(path: str | None, record: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def cmd_run(a: argparse.Namespace) -> int:
    from .experiment import ModelSession, run
    from .export import is_quantized_folder

    device = _default_device(a.device)
    if a.model and is_quantized_folder(a.model):
        return _run_saved(a, device)
    spec = spec_from_args(a, a.model or "testbed-opt")
    if a.save:  # fail before the run, not after it
        from .export import ExportError

        if not spec.config.weight.enabled:
            raise ExportError(f"--save: {spec.config.name()} leaves the weights unquantized; there is no quantized "
                              f"model to save")
        if Path(a.save).exists() and (not Path(a.save).is_dir() or any(Path(a.save).iterdir())):
            raise ValueError(f"--save: {a.save} already exists and is not empty")
    session = ModelSession(spec.model, device, a.dtype, a.data_dir, not a.no_progress, a.offload,
                           a.calib_batch, a.calib_offload)
    record = run(spec, session, progress=not a.no_progress, eval_batch=a.eval_batch, kernel=a.kernel, save=a.save)
    _append_jsonl(a.output, record)
    print_table([record])
    if a.output:
        print(f"record appended to {a.output}")
    if a.save:
        print(f"quantized model saved to {a.save} (stored bits/weight {record['stored_bits_per_weight']:.3f})")
    return 0


def _run_saved(a: argparse.Namespace, device: str) -> int:
    """``run --model DIR`` on a saved quantized folder: evaluate it as saved (quantization options do not apply)."""
    from .export.evaluate_saved import evaluate_saved

    given = [OPTIONS[k].flag for k in OPTIONS
             if OPTIONS[k].path.startswith("config.") and getattr(a, k) != OPTIONS[k].default]
    if a.save or given:
        raise ValueError(f"{a.model} is already quantized and is evaluated as saved: drop "
                         f"{', '.join(given + (['--save'] if a.save else []))}")
    record = evaluate_saved(a.model, tuple(a.eval), a.seqlen, device, a.dtype, a.max_eval_windows, a.data_dir,
                            not a.no_progress, a.offload)
    _append_jsonl(a.output, record)
    print_table([record])
    for name, value in record["ppl_at_save"].items():
        if name in record["ppl"]:
            print(f"{name}: {record['ppl'][name]:.3f} now, {value:.3f} when saved")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:  # noqa: C901 - a script: datasets, runs, table
    from .data import DataError
    from .experiment import ModelSession, run

    device = _default_device(a.device)
    max_windows = None if a.full or device != "cpu" else a.max_eval_windows
    session = ModelSession(a.model, device, a.dtype, a.data_dir, not a.no_progress, a.offload,
                           a.calib_batch, a.calib_offload)
    datasets, skipped = [], []
    for name in (x.strip() for x in a.eval.split(",") if x.strip()):
        try:
            session.eval_tokens(name, session.seqlen(a.seqlen))
            datasets.append(name)
        except DataError:
            skipped.append(name)
    if skipped:
        print(f"skipped {', '.join(skipped)}: not found here; add them with --data-dir DIR or PTQLAB_DATA=DIR "
              f"(layout of shared/data/README.md), or pip install -e \".[hub]\" with Hugging Face hub access")
    if not datasets:
        raise DataError(f"none of the evaluation sets ({a.eval}) is available")
    w4 = QuantSpec(4, True, 128)
    a8 = QuantSpec(8, True, 0)
    configs = [
        QuantConfig(method="fp16"),
        QuantConfig(method="rtn", weight=w4),
        QuantConfig(method="gptq", weight=w4),
        QuantConfig(method="gptq", weight=w4, lorc_rank=8),
        QuantConfig(method="rtn", weight=w4, act=a8),
        QuantConfig(method="gptq", weight=w4, act=a8),
        QuantConfig(method="gptq", weight=w4, act=a8, lorc_rank=8),
    ]
    records = []
    for config in configs:
        spec = RunSpec(model=a.model, config=config, eval=tuple(datasets), seqlen=a.seqlen, calib="testbed",
                       nsamples=a.nsamples, max_eval_windows=max_windows, dtype=a.dtype)
        record = run(spec, session, progress=not a.no_progress, eval_batch=a.eval_batch, kernel=a.kernel)
        _append_jsonl(a.output, record)
        records.append(record)
    scope = "full splits" if max_windows is None else f"first {max_windows} windows of each split (--full for all)"
    print(f"\nmodel {a.model} on {device}; evaluation: {scope}, seqlen {records[0]['config']['seqlen']}")
    print(f"data: {', '.join(f'{k}={v}' for k, v in records[0]['data_sources'].items())}")
    print("heldout = the testbed corpus's held-out text (in-domain); WikiText-2 and PTB are out of its domain\n")
    print_table(records)
    return 0


def cmd_make_tiny(a: argparse.Namespace) -> int:
    from .tiny import make_tiny

    out = make_tiny(a.arch, a.out, a.text, a.seed, hidden=a.hidden, layers=a.layers, heads=a.heads)
    print(f"tiny {a.arch} model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptqlab", description="Post-training quantization of LLMs (ZeroQuant-V2 study)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="quantize a model and measure its perplexity")
    p.add_argument("--model", default=None, help="local folder, hub id, or testbed-opt / testbed-bloom (default "
                   "testbed-opt); a folder saved with --save is evaluated as saved")
    add_run_options(p)
    _add_device_args(p, dtype=False)
    p.add_argument("--output", default=None, help="append the JSON record to this .jsonl file")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write the quantized model to DIR (compressed-tensors folder, LoRC as a PEFT adapter)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="FP16 vs RTN, GPTQ and GPTQ+LoRC at W4A16 g128 and W4A8 on a testbed model")
    p.add_argument("--model", default="testbed-opt")
    p.add_argument("--eval", default="wikitext2,ptb,heldout")
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-eval-windows", type=int, default=64, help="on CPU, evaluate this prefix of each split")
    p.add_argument("--full", action="store_true", help="evaluate the full splits on CPU too (slow)")
    p.add_argument("--output", default=None)
    _add_device_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("make-tiny", help="write a tiny random model + tokenizer (offline)")
    p.add_argument("--arch", required=True, choices=["opt", "bloom", "llama", "gpt2"])
    p.add_argument("--out", required=True)
    p.add_argument("--text", default=None, help="train the BPE tokenizer on this text file (default: bytes only)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
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
    from .models import UnsupportedModelError
    from .quantizers import QuantizationError
    from .study.store import StoreError

    try:
        return a.func(a)
    except (QuantizationError, DataError, UnsupportedModelError, FileNotFoundError, ValueError, StoreError) as err:
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
