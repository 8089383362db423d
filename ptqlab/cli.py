"""The ``ptqlab`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import METHODS, GPTQOptions, QuantConfig, ZQOptions
from .quantizers import QuantSpec


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--method", choices=METHODS, default="rtn")
    g.add_argument("--wbits", type=int, default=16, help="weight bits, 2..8 (16: not quantized)")
    g.add_argument("--wgroup", type=int, default=0, help="weight group size along the input dim (0: per row, -1: per tensor)")
    g.add_argument("--wsym", dest="wsym", action="store_true", default=True, help="symmetric weights (default)")
    g.add_argument("--wasym", dest="wsym", action="store_false", help="asymmetric weights")
    g.add_argument("--abits", type=int, default=16, help="activation bits, 2..8 (16: not quantized)")
    g.add_argument("--agroup", type=int, default=0, help="activation group size (0: per token, -1: per tensor)")
    g.add_argument("--asym", dest="asym", action="store_true", default=True, help="symmetric activations (default)")
    g.add_argument("--aasym", dest="asym", action="store_false", help="asymmetric activations")
    g.add_argument("--lorc-rank", type=int, default=0, help="LoRC rank (0: off)")
    g.add_argument("--lorc-bits", type=int, default=8, help="bits of the LoRC factors (16: full precision)")
    g.add_argument("--lorc-aware", action="store_true", help="activation-aware LoRC (SVD of E scaled by the Hessian)")
    g.add_argument("--quantize-head", action="store_true", help="also quantize the LM head (RTN)")
    g.add_argument("--blocksize", type=int, default=128, help="GPTQ lazy-update block size")
    g.add_argument("--percdamp", type=float, default=0.01, help="GPTQ dampening, fraction of the mean Hessian diagonal")
    g.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal")
    g.add_argument("--zq-steps", type=int, default=None, help="ZQ-Local/Global optimisation steps")
    g.add_argument("--zq-lr", type=float, default=None, help="ZQ learning rate, relative to the weight RMS")
    g.add_argument("--zq-batch", type=int, default=8, help="ZQ-Global batch size (windows)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--eval", default="wikitext2,ptb",
                   help="comma-separated: wikitext2, ptb, c4, heldout (the testbed's in-domain text) or text file paths")
    g.add_argument("--seqlen", type=int, default=None, help="evaluation window (default: the model's maximum)")
    g.add_argument("--calib", default="c4", help="calibration: wikitext2|ptb|c4 (train split) or a text file")
    g.add_argument("--nsamples", type=int, default=128)
    g.add_argument("--calib-seqlen", type=int, default=None, help="calibration window (default: --seqlen)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data-dir", default=None, help="local copies of the datasets (default: $PTQLAB_DATA, else the hub)")
    g.add_argument("--max-eval-windows", type=int, default=None, help="evaluate only this many windows (a prefix)")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float16, bfloat16, float32")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--offload", action="store_true", default=None,
                   help="evaluate one block at a time on the device (default: only if the model does not fit)")
    p.add_argument("--calib-batch", type=int, default=8,
                   help="windows per block forward while calibrating (lower it if the GPU runs out of memory)")
    p.add_argument("--calib-offload", action="store_true",
                   help="keep the calibration hidden states in CPU memory, one batch at a time on the GPU")


def config_from_args(a: argparse.Namespace) -> QuantConfig:
    zq = ZQOptions()
    if a.zq_steps is not None:
        zq = ZQOptions(**{**zq.__dict__, "local_steps": a.zq_steps, "global_steps": a.zq_steps})
    if a.zq_lr is not None:
        zq = ZQOptions(**{**zq.__dict__, "local_lr": a.zq_lr, "global_lr": a.zq_lr})
    zq = ZQOptions(**{**zq.__dict__, "global_batch_size": a.zq_batch})
    return QuantConfig(
        method=a.method,
        weight=QuantSpec(a.wbits, a.wsym, a.wgroup),
        act=QuantSpec(a.abits, a.asym, a.agroup),
        lorc_rank=a.lorc_rank,
        lorc_bits=a.lorc_bits,
        lorc_aware=a.lorc_aware,
        quantize_head=a.quantize_head,
        gptq=GPTQOptions(a.blocksize, a.percdamp, a.act_order),
        zq=zq,
    )


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
    from .experiment import ModelSession, RunSpec, run
    from .export import is_quantized_folder

    device = _default_device(a.device)
    if a.model and is_quantized_folder(a.model):
        return _run_saved(a, device)
    config = config_from_args(a)
    spec = RunSpec(
        model=a.model or "testbed-opt", config=config, eval=tuple(x for x in a.eval.split(",") if x),
        seqlen=a.seqlen, calib=a.calib, nsamples=a.nsamples, calib_seqlen=a.calib_seqlen, seed=a.seed,
        max_eval_windows=a.max_eval_windows, dtype=a.dtype,
    )
    session = ModelSession(spec.model, device, a.dtype, a.data_dir, not a.no_progress, a.offload,
                           a.calib_batch, a.calib_offload)
    record = run(spec, session, progress=not a.no_progress, save=a.save)
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

    if a.save or a.method != "rtn" or a.wbits != 16 or a.abits != 16 or a.lorc_rank:
        raise ValueError(f"{a.model} is already quantized: it is evaluated as saved, without --method, --wbits, "
                         f"--abits, --lorc-rank or --save")
    record = evaluate_saved(a.model, tuple(x for x in a.eval.split(",") if x), a.seqlen, device, a.dtype,
                            a.max_eval_windows, a.data_dir, not a.no_progress, a.offload)
    _append_jsonl(a.output, record)
    print_table([record])
    for name, value in record["ppl_at_save"].items():
        if name in record["ppl"]:
            print(f"{name}: {record['ppl'][name]:.3f} now, {value:.3f} when saved")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .experiment import ModelSession, RunSpec, run
    from .testbed import CALIBRATION_TEXT

    device = _default_device(a.device)
    max_windows = None if a.full or device != "cpu" else a.max_eval_windows
    session = ModelSession(a.model, device, a.dtype, a.data_dir, not a.no_progress, a.offload,
                           a.calib_batch, a.calib_offload)
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
        spec = RunSpec(model=a.model, config=config, eval=tuple(a.eval.split(",")), seqlen=a.seqlen,
                       calib=str(CALIBRATION_TEXT), nsamples=a.nsamples, max_eval_windows=max_windows,
                       dtype=a.dtype)
        record = run(spec, session, progress=not a.no_progress)
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
    _add_quant_args(p)
    _add_data_args(p)
    _add_device_args(p)
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
    a = parser.parse_args(argv)
    from .data import DataError
    from .models import UnsupportedModelError
    from .quantizers import QuantizationError

    try:
        return a.func(a)
    except (QuantizationError, DataError, UnsupportedModelError, FileNotFoundError, ValueError) as err:
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
