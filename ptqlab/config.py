"""What to do to a model: one frozen description of a run, and its flat form.

The dataclasses here are the single source of truth for a run:
:class:`QuantConfig` (what quantization does: a method, a weight spec, an
activation spec, LoRC, which layers) and :class:`RunSpec` (the model, the
data and the evaluation around it).  Every other form is derived from them
through :data:`OPTIONS`, one entry per flat key with its path into the
dataclasses, its help text and its check:

* ``ptqlab run``'s options (``cli.py`` builds its parser from the table),
* recipe keys and ``--grid``/``--set`` assignments (``study/recipe.py``),
* the ``config`` of every record and the key of every study run
  (:meth:`RunSpec.to_flat`), read back with :func:`from_flat`.

Defaults are the dataclass field defaults; a new option is one field plus
one :class:`Option` row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .methods.gptq import GPTQOptions
from .methods.registry import METHODS, get_method
from .methods.zeroquant import ZQOptions
from .options import OPTION_SETS, OptionField, OptionSet, OptionSets, on_register, positive_float
from .quantizers import QuantizationError, QuantSpec
from .transforms import TRANSFORMS, get_transform

__all__ = ["GPTQOptions", "LayerFilter", "OPTIONS", "Option", "QuantConfig", "RunSpec", "ZQOptions", "from_flat"]

TESTBED_CALIBRATION = "testbed"  # calibration alias: the text shipped with the testbed models
AUTO_CALIBRATION = "auto"  # the testbed text for the testbed models, C4 for any other model
DTYPE_NAMES = {"auto": "auto", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float32": "float32", "fp32": "float32"}


LAYER_GRANULARITIES = ("all", "module", "block", "layer")


@dataclass(frozen=True)
class LayerFilter:
    """Which linear layers of the decoder blocks a run quantizes (the others stay in full precision).

    Text form: ``all``; ``module:NAME`` (that module in every block, e.g. ``module:fc1``,
    ``module:self_attn.q_proj``); ``block:N`` (every linear of block N); ``layer:N:NAME``.
    """

    granularity: str = "all"
    target: str = ""

    def __post_init__(self) -> None:
        if self.granularity not in LAYER_GRANULARITIES:
            raise QuantizationError(f"layer filter: unknown granularity '{self.granularity}'; "
                                    f"choose all, module:NAME, block:N or layer:N:NAME")
        if (self.granularity == "all") != (self.target == ""):
            raise QuantizationError(f"layer filter '{self}': 'all' takes no target, the others need one")
        if self.granularity in ("block", "layer"):
            index = self.target.split(":", 1)[0]
            if not index.isdigit() or (self.granularity == "layer" and ":" not in self.target):
                raise QuantizationError(f"layer filter '{self}': expected block:N or layer:N:NAME")

    @classmethod
    def parse(cls, text: str) -> LayerFilter:
        if not isinstance(text, str) or not text.strip():
            raise QuantizationError("layer filter: expected all, module:NAME, block:N or layer:N:NAME")
        granularity, _, target = text.strip().partition(":")
        return cls(granularity, target)

    def __str__(self) -> str:
        return self.granularity if self.granularity == "all" else f"{self.granularity}:{self.target}"

    @property
    def everything(self) -> bool:
        return self.granularity == "all"

    def selects(self, block_index: int, name: str) -> bool:
        """Whether the linear ``name`` (its path inside the block) of block ``block_index`` is quantized."""
        if self.granularity == "all":
            return True
        if self.granularity == "module":
            return name == self.target
        if self.granularity == "block":
            return str(block_index) == self.target
        index, _, module = self.target.partition(":")
        return str(block_index) == index and name == module


@dataclass(frozen=True)
class QuantConfig:
    """A weight method, a weight spec, an activation spec, LoRC and the layers: what one run does to a model.

    ``transform`` (:mod:`ptqlab.transforms`) runs before the method; ``options`` holds the option sets that
    methods and transforms declare (``config.options.gptq.percdamp``; a dict of sets or of their fields is
    accepted and completed with the defaults: ``options={"zq": ZQOptions(steps=3)}``).
    """

    method: str = "rtn"
    weight: QuantSpec = field(default_factory=QuantSpec)
    act: QuantSpec = field(default_factory=QuantSpec)
    lorc_rank: int = 0
    lorc_bits: int = 8
    lorc_aware: bool = False  # beyond the paper: SVD of the error scaled by the input statistics
    quantize_head: bool = False
    layers: LayerFilter = field(default_factory=LayerFilter)
    transform: str = "none"
    options: OptionSets = field(default_factory=OptionSets)

    def __post_init__(self) -> None:
        if not isinstance(self.options, OptionSets):
            try:
                object.__setattr__(self, "options", OptionSets(self.options))
            except (TypeError, ValueError) as err:
                raise QuantizationError(f"options: {err}") from None
        if self.transform not in TRANSFORMS:
            raise QuantizationError(f"unknown transform '{self.transform}'; choose from {', '.join(TRANSFORMS)}")
        if self.method not in METHODS:
            raise QuantizationError(f"unknown method '{self.method}'; choose from {', '.join(METHODS)}")
        method = get_method(self.method)
        if not method.quantizes_weights and (self.weight.enabled or self.act.enabled or self.lorc_rank):
            raise QuantizationError(
                f"method '{self.method}' leaves the model unquantized: use --method rtn for W16A8 and the like"
            )
        if method.needs_calibration and not self.weight.enabled:
            raise QuantizationError(f"method '{self.method}' quantizes weights: give --wbits between 2 and 8")
        if self.lorc_rank < 0:
            raise QuantizationError(f"lorc_rank must be >= 0, got {self.lorc_rank}")
        if self.lorc_rank and not self.weight.enabled:
            raise QuantizationError("LoRC compensates the weight quantization error: it needs --wbits below 16")
        if not (2 <= self.lorc_bits <= 8 or self.lorc_bits == 16):
            raise QuantizationError(f"lorc_bits must be in 2..8 or 16, got {self.lorc_bits}")
        if self.quantize_head and not self.layers.everything:
            raise QuantizationError("--quantize-head quantizes the LM head: it needs --layers all")
        check = get_transform(self.transform).check_config
        why = check(self) if check is not None else None
        if why:
            raise QuantizationError(f"--transform {self.transform} with {self.describe_spec()}: {why}")

    def describe_spec(self) -> str:
        return f"--method {self.method} W{self.weight.bits}A{self.act.bits}"

    @property
    def gptq(self) -> GPTQOptions:
        return self.options.gptq

    @property
    def zq(self) -> ZQOptions:
        return self.options.zq

    @property
    def needs_calibration(self) -> bool:
        return (get_method(self.method).needs_calibration or (self.lorc_rank > 0 and self.lorc_aware)
                or get_transform(self.transform).needs_calibration)

    @property
    def lorc_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.lorc_bits, symmetric=True)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("weight", "act", "layers"):
            out[key] = asdict(out[key]) if key != "layers" else str(out[key])
        out["options"] = self.options.as_dicts()
        return out

    def name(self) -> str:
        method = self.method if self.transform == "none" else f"{self.transform}+{self.method}"
        parts = [method, f"W{self.weight.bits}A{self.act.bits}"]
        if self.weight.enabled:
            parts.append(self.weight.describe())
        if self.act.enabled:
            parts.append("act-" + self.act.describe())
        if self.method == "gptq" and self.options.gptq.act_order:
            parts.append("act-order")
        if self.lorc_rank:
            parts.append(f"lorc{self.lorc_rank}" + ("-aware" if self.lorc_aware else ""))
        if not self.layers.everything:
            parts.append(f"only {self.layers}")
        return " ".join(parts)


@dataclass(frozen=True)
class RunSpec:
    """A whole run: the model, what quantization does to it, the calibration and the evaluation."""

    model: str
    config: QuantConfig = field(default_factory=QuantConfig)
    eval: tuple[str, ...] = ("wikitext2", "ptb")
    seqlen: int | None = None  # None: the model's maximum (2048 where it has none)
    calib: str = AUTO_CALIBRATION  # a dataset (train split), 'testbed', a text file, or 'auto'
    nsamples: int = 128
    calib_seqlen: int | None = None  # None: same as seqlen
    seed: int = 0
    max_eval_windows: int | None = None  # evaluate a prefix only (quick checks)
    dtype: str = "auto"
    metrics: tuple[str, ...] = ("ppl",)  # on the eval windows: ppl, kld (ptqlab.kld)
    tasks: tuple[str, ...] = ()  # lm-evaluation-harness tasks (ptqlab.tasks)
    num_fewshot: int | None = None  # None: each task's default
    limit: int | None = None  # documents per task (None: all)
    tasks_dir: str | None = None  # folder of task YAMLs (lm-eval include_path)
    speed: bool = False  # also time decode and prefill on the GPU (ptqlab.speed; --kernel real, or an FP16 run)

    def __post_init__(self) -> None:
        for name in ("eval", "metrics", "tasks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.calib == AUTO_CALIBRATION:
            from .testbed import is_testbed_model

            object.__setattr__(self, "calib", TESTBED_CALIBRATION if is_testbed_model(self.model) else "c4")

    def to_flat(self) -> dict:
        """The canonical flat dict: every option that can affect this run's numbers, none that cannot.

        Options a run does not read are left out (calibration for RTN, GPTQ's
        options for ZQ, groups of 16-bit specs, ...), so two spellings of one
        experiment give one dict, one record ``config`` and one study key.
        """
        flat = {"model": self.model}
        for option in OPTIONS.values():
            if option.relevant(self):
                flat[option.key] = option.get(self)
        return flat


# ---------------------------------------------------------------- the flat form


def help_with_default(text: str, default: object) -> str:
    """A help line with its default, shown one way by every flag of every command: ``TEXT (default: X)``.
    No default (None), an off flag (False) and an empty text show nothing."""
    if default is None or default is False or default == "":
        return text
    shown = ",".join(str(x) for x in default) if isinstance(default, (list, tuple)) else default
    return f"{text} (default: {shown})"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bits(v: object) -> int:
    if not _is_int(v) or not (2 <= v <= 8 or v == 16):
        raise ValueError("must be an integer in 2..8, or 16 for full precision")
    return v


def _group(v: object) -> int:
    if not _is_int(v) or v < -1:
        raise ValueError("must be 0 (per row/token), -1 (per tensor) or a positive group size")
    return v


def _fmt(v: object) -> str:
    from .formats import FORMATS

    if v not in FORMATS:
        raise ValueError(f"must be one of {', '.join(FORMATS)}")
    return v


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _int_min(lo: int, optional: bool = False) -> Callable[[object], int | None]:
    def check(v: object) -> int | None:
        if v is None and optional:
            return None
        if not _is_int(v) or v < lo:
            # how to get the default (null in a recipe, no flag on the command line): Option.validate says it
            raise ValueError(f"must be an integer >= {lo}")
        return v

    return check


_pos_float = positive_float  # the one check of a positive number (ptqlab.options)


def _method(v: object) -> str:
    if v not in METHODS:
        raise ValueError(f"must be one of {', '.join(METHODS)}")
    return v


def _eval(v: object) -> list[str]:
    from .data import EVAL_DATASETS

    names = [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v
    if isinstance(names, tuple):
        names = list(names)
    if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
        raise ValueError(f"must be a dataset name, a comma-separated string or a list of {', '.join(EVAL_DATASETS)} "
                         f"or text files")
    bad = [x for x in names if x not in EVAL_DATASETS and not Path(x).expanduser().is_file()]
    if bad:
        raise ValueError(f"{bad[0]!r} is neither a dataset ({', '.join(EVAL_DATASETS)}) nor an existing text file")
    if len(set(names)) != len(names):
        raise ValueError("lists a dataset twice")
    return names


def _calib(v: object) -> str:
    from .data import EVAL_DATASETS

    if not isinstance(v, str) or not v:
        raise ValueError("must be a dataset name (wikitext2, ptb, c4), 'testbed', 'auto' or a text file path")
    if v not in (*EVAL_DATASETS, TESTBED_CALIBRATION, AUTO_CALIBRATION) and not Path(v).expanduser().is_file():
        if Path(v).suffix or "/" in v:
            raise ValueError(f"calibration file {v} does not exist")
        raise ValueError(f"{v!r} is neither a dataset (wikitext2, ptb, c4), 'testbed', 'auto', nor an existing "
                         f"text file")
    return v


def _dtype(v: object) -> str:
    if v not in DTYPE_NAMES:
        raise ValueError(f"must be one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[v]


def _layers(v: object) -> str:
    try:
        return str(LayerFilter.parse(v))  # type: ignore[arg-type]
    except QuantizationError as err:
        raise ValueError(str(err).removeprefix("layer filter: ")) from None


EVAL_METRICS = ("ppl", "kld")  # what ``metrics`` may name, in record order


def _metrics(v: object) -> list[str]:
    names = [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v
    if isinstance(names, tuple):
        names = list(names)
    if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
        raise ValueError(f"must be a comma-separated list of {', '.join(EVAL_METRICS)}")
    bad = [x for x in names if x not in EVAL_METRICS]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a metric; choose from {', '.join(EVAL_METRICS)}")
    return [m for m in EVAL_METRICS if m in names or m == "ppl"]  # perplexity comes with every evaluation


def _tasks(v: object) -> list[str]:
    import re

    names = [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v
    if isinstance(names, tuple):
        names = list(names)
    if not isinstance(names, list) or not all(isinstance(x, str) and re.fullmatch(r"[\w.\-]+", x) for x in names):
        raise ValueError("must be lm-evaluation-harness task names, comma-separated (e.g. piqa,arc_easy)")
    if len(set(names)) != len(names):
        raise ValueError("lists a task twice")
    return names


def _tasks_dir(v: object) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise ValueError("must be a folder of lm-eval task YAML files")
    if not Path(v).expanduser().is_dir():
        raise ValueError(f"task folder {v} does not exist")
    return v


def _always(spec: RunSpec) -> bool:
    return True


def _weights(spec: RunSpec) -> bool:
    return spec.config.weight.enabled


def _acts(spec: RunSpec) -> bool:
    return spec.config.act.enabled


def _float_weights(spec: RunSpec) -> bool:  # 'int' is left out of records: old records and study keys stay as they were
    return spec.config.weight.enabled and spec.config.weight.is_float


def _float_acts(spec: RunSpec) -> bool:
    return spec.config.act.enabled and spec.config.act.is_float


def _lorc(spec: RunSpec) -> bool:
    return spec.config.lorc_rank > 0


def _calibrates(spec: RunSpec) -> bool:
    return spec.config.needs_calibration


def _extra_metrics(spec: RunSpec) -> bool:
    return spec.metrics != ("ppl",)  # the default is left out of the flat form: old study keys stay valid


def _has_tasks(spec: RunSpec) -> bool:
    return bool(spec.tasks)


def _speed(spec: RunSpec) -> bool:
    return spec.speed  # off is left out of the flat form: old study keys stay valid


def _transform(v: object) -> str:
    if v not in TRANSFORMS:
        raise ValueError(f"must be one of {', '.join(TRANSFORMS)}")
    return v


def _transformed(spec: RunSpec) -> bool:
    return spec.config.transform != "none"


def _reads(f: OptionField) -> Callable[[RunSpec], bool]:
    """Whether a run reads an option-set field: its method lists the key, or its transform reads the set."""

    def relevant(spec: RunSpec) -> bool:
        if f.meta.key == "percdamp" and spec.config.lorc_rank and spec.config.lorc_aware:
            return True  # activation-aware LoRC damps the Hessian too
        return (f.meta.key in get_method(spec.config.method).options
                or f.owner in get_transform(spec.config.transform).option_sets)

    return relevant


def _check_of(f: OptionField) -> Callable[[object], object]:
    """An option-set field's check: its own, else one from its default's type."""
    if f.meta.check is not None:
        return f.meta.check
    if f.meta.choices:
        def choice(v: object) -> str:
            if v not in f.meta.choices:
                raise ValueError(f"must be one of {', '.join(f.meta.choices)}")
            return v  # type: ignore[return-value]

        return choice
    if isinstance(f.default, bool):
        return _bool
    if isinstance(f.default, int):
        return _int_min(0)
    if isinstance(f.default, float):
        return _pos_float
    raise TypeError(f"option {f.meta.key}: give a check for a {type(f.default).__name__} default")


@dataclass(frozen=True)
class Option:
    """One flat key: a recipe key, a record ``config`` key, and ``ptqlab run --key``."""

    key: str
    path: str  # attribute path inside a RunSpec, e.g. "config.weight.bits"
    check: Callable[[object], object]  # validates a parsed value (ValueError with the reason)
    help: str
    relevant: Callable[[RunSpec], bool] = _always  # whether the value can affect the run's numbers
    group: str = "quantization"  # the CLI's option group
    negative: str | None = None  # for booleans: the flag that sets False (``--wasym``)
    deprecated: tuple[str, str] | None = None  # old (true flag, false flag) spellings, warned about
    unset: str = ""  # for options whose default is None: what that default means ("the model's maximum")

    def validate(self, value: object, cli: bool = False) -> object:
        """``check(value)``; a ValueError of an option whose default is None also says how to get that default,
        in the words of where the value came from (``cli``: omit the flag; a recipe, --set, --grid: null)."""
        try:
            return self.check(value)
        except ValueError as err:
            if self.default is not None:
                raise
            how = f"omit {self.flag}" if cli else "null"
            raise ValueError(f"{err}; {how} for the default ({self.unset})") from None

    @property
    def help_text(self) -> str:
        """The help line of ``ptqlab run --KEY``, with its default."""
        if self.is_bool:
            return self.help + (" (default)" if self.default else "")
        return help_with_default(self.help, self.unset if self.default is None else self.default)

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def is_bool(self) -> bool:
        return isinstance(self.default, bool)

    @property
    def default(self) -> object:
        return self.get(_default_spec())

    def get(self, spec: RunSpec) -> object:
        value = _get_path(spec, self.path)
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, LayerFilter):
            return str(value)
        return value


def _get_path(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


OPTIONS: dict[str, Option] = {o.key: o for o in [
    Option("method", "config.method", _method, "weight method: " + ", ".join(METHODS)),
    Option("transform", "config.transform", _transform,
           "transform before the weight method: " + ", ".join(TRANSFORMS) + " (with --method fp16: alone)",
           _transformed),
    Option("wbits", "config.weight.bits", _bits, "weight bits, 2..8 (16: not quantized)"),
    Option("wgroup", "config.weight.group_size", _group,
           "weight group size along the input dim (0: per row, -1: per tensor)", _weights),
    Option("wsym", "config.weight.symmetric", _bool, "symmetric weights", _weights, negative="--wasym"),
    Option("wfmt", "config.weight.fmt", _fmt,
           "weight number format: int; fp8 (E4M3, per channel or --wgroup -1); mxfp4 (E2M1, E8M0 scale per 32); "
           "nvfp4 (E2M1, E4M3 scale per 16 + fp32 per tensor). A float format sets --wbits and its block",
           _float_weights),
    Option("abits", "config.act.bits", _bits, "activation bits, 2..8 (16: not quantized)"),
    Option("agroup", "config.act.group_size", _group,
           "activation group size along the hidden dim (0: per token, -1: per tensor)", _acts),
    Option("act_sym", "config.act.symmetric", _bool, "symmetric activations", _acts,
           negative="--act-asym", deprecated=("--asym", "--aasym")),
    Option("afmt", "config.act.fmt", _fmt,
           "activation number format: int; fp8 (E4M3 per token, or --agroup -1); mxfp4; nvfp4 (its fp32 scale per "
           "token). A float format sets --abits and its block", _float_acts),
    Option("lorc_rank", "config.lorc_rank", _int_min(0), "LoRC rank (0: off)"),
    Option("lorc_bits", "config.lorc_bits", _bits, "bits of the LoRC factors (16: full precision)", _lorc),
    Option("lorc_aware", "config.lorc_aware", _bool, "activation-aware LoRC (SVD of E scaled by the Hessian)", _lorc),
    Option("quantize_head", "config.quantize_head", _bool, "also quantize the LM head (RTN)", _weights),
    Option("layers", "config.layers", _layers,
           "which linears to quantize: all, module:NAME, block:N or layer:N:NAME (the rest stay full precision)"),
    Option("calib", "calib", _calib,
           "calibration text: wikitext2|ptb|c4 (train split), testbed, a text file, or auto (testbed text for the "
           "testbed models, else c4)", _calibrates, group="data"),
    Option("nsamples", "nsamples", _int_min(1), "calibration windows", _calibrates, group="data"),
    Option("calib_seqlen", "calib_seqlen", _int_min(2, optional=True), "calibration window in tokens",
           _calibrates, group="data", unset="--seqlen"),
    Option("seed", "seed", _int_min(0), "calibration sampling seed", _calibrates, group="data"),
    Option("eval", "eval", _eval,
           "comma-separated: wikitext2, ptb, c4, heldout (the testbed's in-domain text) or text file paths",
           group="data"),
    Option("seqlen", "seqlen", _int_min(2, optional=True), "evaluation window in tokens", group="data",
           unset="the model's maximum, 2048 where it has none"),
    Option("max_eval_windows", "max_eval_windows", _int_min(1, optional=True),
           "evaluate only this many windows (a prefix)", group="data", unset="every window"),
    Option("dtype", "dtype", _dtype, "auto (fp16 on GPU, fp32 on CPU), float16, bfloat16, float32", group="data"),
    Option("metrics", "metrics", _metrics,
           "comma-separated: ppl, kld (KL divergence, top-1 agreement and delta p against the FP16 model on the "
           "eval windows); ppl is always measured", _extra_metrics, group="evaluation"),
    Option("tasks", "tasks", _tasks, "comma-separated lm-evaluation-harness tasks to score (pip install "
           "'ptqlab[eval]'), e.g. lambada_openai,piqa,arc_easy,hellaswag,winogrande", _has_tasks, group="evaluation"),
    Option("num_fewshot", "num_fewshot", _int_min(0, optional=True), "few-shot examples per task document",
           _has_tasks, group="evaluation", unset="each task's default"),
    Option("limit", "limit", _int_min(1, optional=True), "score only the first N documents of each task",
           _has_tasks, group="evaluation", unset="every document"),
    Option("tasks_dir", "tasks_dir", _tasks_dir, "folder of task YAMLs (lm-eval include_path) whose dataset "
           "files are local; relative data_files paths are read from this folder", _has_tasks, group="evaluation",
           unset="lm-eval's own tasks only"),
    Option("speed", "speed", _bool, "also measure speed on the GPU: greedy decode tokens/s at batch 1 and 16 "
           "(CUDA graph), prefill tokens/s, peak decode memory and the model's bytes (needs --kernel real, except "
           "on an FP16 run; OPT models)", _speed, group="evaluation"),
]}
def _add_option_set(entry: OptionSet) -> None:
    """Rows for the fields of a registered option set (methods' and transforms' own options), inserted before
    the data options so ``--help`` shows them with the quantization group; a set without fields (unregistered)
    loses its rows."""
    global _DEFAULT_SPEC
    for key in [k for k, o in OPTIONS.items() if o.path.startswith(f"config.options.{entry.owner}.")]:
        del OPTIONS[key]
    rows = []
    for f in entry.fields:
        if f.meta.key in OPTIONS:
            raise ValueError(f"option set '{entry.owner}': key '{f.meta.key}' is taken by another option")
        rows.append(Option(f.meta.key, f"config.options.{entry.owner}.{f.name}", _check_of(f), f.meta.help,
                           _reads(f), negative=f"--no-{f.meta.key.replace('_', '-')}" if isinstance(f.default, bool)
                           and f.default else None))
    items = list(OPTIONS.items())
    OPTIONS.clear()
    first_data = next(i for i, (_, o) in enumerate(items) if o.group == "data")
    OPTIONS.update(items[:first_data])
    OPTIONS.update({o.key: o for o in rows})
    OPTIONS.update(items[first_data:])
    _DEFAULT_SPEC = None


DEPRECATED_KEYS = {"asym": "act_sym"}
# values taken as written: dataset, metric and task lists, paths, layer filters
_TEXT_KEYS = ("eval", "calib", "layers", "metrics", "tasks", "tasks_dir")


def parse_text_value(key: str, text: str) -> object:
    """A value written as text (``--wbits 4``, ``--grid wbits=4``, ``--set seqlen=null``), before its check:
    YAML scalar rules (``true``, ``null``, ``128``) plus ``1e-3`` as a number; text keys stay text."""
    if key in _TEXT_KEYS:
        return text
    if not text.strip():
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str):
        for convert in (int, float):
            try:
                return convert(value)
            except ValueError:
                pass
    return value  # old recipe keys, read with a warning for one release


def from_flat(flat: dict) -> RunSpec:
    """The :class:`RunSpec` of a flat dict (``model`` required; missing keys take the field defaults).

    Values are checked with each option's check; an unknown key is an error.
    """
    flat = dict(flat)
    if "model" not in flat:
        raise QuantizationError("a run needs a model")
    model = flat.pop("model")
    unknown = [k for k in flat if k not in OPTIONS]
    if unknown:
        raise QuantizationError(f"unknown option '{unknown[0]}'; known: {', '.join(OPTIONS)}")
    values = {k: OPTIONS[k].default for k in OPTIONS}
    for key, value in flat.items():
        try:
            values[key] = OPTIONS[key].validate(value)
        except ValueError as err:
            raise QuantizationError(f"{key}: bad value {value!r}: {err}") from None
    nested: dict = {}
    for key, value in values.items():
        node = nested
        *parents, leaf = OPTIONS[key].path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    c = nested["config"]
    config = QuantConfig(
        method=c["method"], weight=_spec(c["weight"], "w"), act=_spec(c["act"], "a"), lorc_rank=c["lorc_rank"],
        lorc_bits=c["lorc_bits"], lorc_aware=c["lorc_aware"], quantize_head=c["quantize_head"],
        layers=LayerFilter.parse(c["layers"]), transform=c["transform"],
        options=OptionSets({owner: OPTION_SETS[owner].cls(**fields) for owner, fields in c.get("options", {}).items()}),
    )
    top = {k: v for k, v in nested.items() if k != "config"}
    for name in ("eval", "metrics", "tasks"):
        top[name] = tuple(top[name])
    return RunSpec(model=model, config=config, **top)


def _spec(fields: dict, prefix: str) -> QuantSpec:
    """The weight (``w``) or activation (``a``) spec of flat values; a format's error names the flags."""
    try:
        return QuantSpec(**fields)
    except QuantizationError as err:
        if fields.get("fmt", "int") == "int":
            raise
        field = getattr(err, "field", None)
        flag = {"bits": f"--{prefix}bits {fields['bits']}", "group_size": f"--{prefix}group {fields['group_size']}",
                "symmetric": "--wasym" if prefix == "w" else "--act-asym"}.get(field, "")
        raise QuantizationError(f"--{prefix}fmt {fields['fmt']} {flag}".strip() + f": {err}") from None


def _check_table() -> None:
    """Every dataclass field is reachable through exactly one option (a drift guard, run at import)."""
    paths = {o.path for o in OPTIONS.values()}
    expected = set()

    def walk(obj: object, prefix: str) -> None:
        if isinstance(obj, OptionSets):
            for owner, value in obj.items():
                walk(value, f"{prefix}{owner}.")
            return
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            path = f"{prefix}{f.name}"
            if (dataclasses.is_dataclass(value) and not isinstance(value, (LayerFilter,))) or isinstance(value, OptionSets):
                walk(value, path + ".")
            elif path != "model":
                expected.add(path)

    walk(_default_spec(), "")
    if paths != expected:
        raise AssertionError(f"config options and fields disagree: {sorted(paths ^ expected)}")


_DEFAULT_SPEC: RunSpec | None = None


def _default_spec() -> RunSpec:
    """The run of all defaults (rebuilt when an option set is registered, so its defaults are in it)."""
    global _DEFAULT_SPEC
    if _DEFAULT_SPEC is None:
        spec = RunSpec(model="", calib="c4")
        object.__setattr__(spec, "calib", AUTO_CALIBRATION)  # the default as given, before a model resolves it
        _DEFAULT_SPEC = spec
    return _DEFAULT_SPEC


on_register(_add_option_set)
_check_table()


def config_hash(record_config: dict) -> str:
    """Stable short hash of everything that affects a result."""
    blob = json.dumps(record_config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
