"""Reports over a study database: tables (markdown, CSV, LaTeX) and recommendations.

For each model (and evaluation setting: sequence length, datasets, windows,
dtype), rows are methods (LoRC ranks as their own rows), columns are
precisions (``W8A16``, ``W4A16 g128``, ``W4A8`` ...), and each cell is the
mean perplexity over the evaluation datasets with its degradation from the
model's FP16 baseline and the paper's sensitivity class:

* Class-1: ``delta PPL <= 0.1``;
* Class-2: ``0.1 < delta PPL <= 0.5``;
* Class-3: ``delta PPL > 0.5``

(thresholds configurable, inclusive, with a 1e-9 allowance for the rounding
of the subtraction).  The recommendation table lists, per class, the
configurations that stay within it, lowest storage (bits per weight, then
activation bits) first.  CSV is long-format: one line per run.

That is the default (the paper's). A report can instead rest on any recorded
metric (:class:`Metric`, ``--metric``): ``ppl``, ``kld`` (mean KL divergence to
FP16; also ``kld.median``, ``kld.p99``, ``kld.top1`` as disagreement
``1 - top1``, ``kld.dp`` as ``-dp``) or a task's ``task:NAME[:acc|acc_norm|...]``
(the drop from FP16's accuracy); on one dataset (``--dataset heldout``) rather
than the mean over datasets; with bounds relative to the FP16 value
(``--relative``: percent). A configuration that beats its own FP16 baseline by
more than noise is flagged and not recommended: noise is twice the standard
error of the paired per-window NLL difference for PPL (records with
``window_nll``; older records: the Class-1 bound) and twice the combined
standard error for task accuracy; KL divergence cannot beat FP16.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from ..config import METHODS, TRANSFORMS
from .recipe import EVAL_KEYS, layer_target, method_label, precision_label
from .store import Store

DEFAULT_THRESHOLDS = (0.1, 0.5)
EPS = 1e-9
FORMATS = ("markdown", "csv", "latex")
_EXTRA_KEYS = ("calib", "nsamples", "calib_seqlen", "seed", "blocksize", "percdamp", "act_order", "zq_steps",
               "zq_lr", "zq_batch", "quantize_head", "layers")


@dataclass(frozen=True)
class Metric:
    """What a report classifies and ranks by: a recorded value, its degradation from FP16 (>= 0 is worse)."""

    kind: str  # "ppl" | "kld" | "task"
    field: str = ""  # kld: mean, median, p99, top1, dp; task: the lm-eval metric (acc, acc_norm, ...)
    task: str = ""
    dataset: str | None = None  # None: the mean over the evaluation datasets (ppl, kld)
    relative: bool = False  # degradation in percent of the FP16 value

    @classmethod
    def parse(cls, text: str, dataset: str | None = None, relative: bool = False) -> "Metric":
        kind, _, rest = text.partition(":") if text.startswith("task:") else text.partition(".")
        if text == "ppl":
            metric = cls("ppl", dataset=dataset, relative=relative)
        elif kind == "kld" and (rest or "mean") in KLD_FIELDS:
            metric = cls("kld", rest or "mean", dataset=dataset, relative=relative)
        elif kind == "task" and rest:
            task, _, field = rest.partition(":")
            metric = cls("task", field or "acc", task, None, relative)
        else:
            raise ValueError(f"--metric: {text!r} is not a metric; give ppl, kld[.{'|.'.join(KLD_FIELDS)}] or "
                             f"task:NAME[:METRIC] (e.g. task:piqa:acc_norm)")
        if metric.relative and metric.kind == "kld":
            raise ValueError("--relative: KL divergence has no FP16 value to be relative to (it is 0 there); "
                             "use absolute --thresholds")
        return metric

    @property
    def name(self) -> str:
        base = {"ppl": "PPL", "kld": f"KLD{'' if self.field == 'mean' else ' ' + self.field}",
                "task": f"{self.task} {self.field}"}[self.kind]
        return base

    @property
    def delta_name(self) -> str:
        if self.kind == "kld":
            return {"top1": "1-top1", "dp": "-dp"}.get(self.field, self.name)
        return ("%" if self.relative else "") + f"d{self.name}" if self.kind == "ppl" else \
            ("%" if self.relative else "") + f"d{self.field}({self.task})"

    @property
    def default_thresholds(self) -> tuple[float, ...]:
        return DEFAULT_BOUNDS[(self.kind, self.field if self.kind == "kld" else "", self.relative)]

    @property
    def lower_is_better(self) -> bool:
        return self.kind != "task" or self.field in LOWER_IS_BETTER_TASK_METRICS

    def _one(self, r: "Result", dataset: str) -> float | None:
        if self.kind == "ppl":
            return r.ppl.get(dataset)
        value = ((r.row.get("metrics") or {}).get("kld") or {}).get(dataset, {}).get(self.field)
        return None if value is None else float(value)

    def value(self, r: "Result") -> float | None:
        """The recorded value (None when the run has none)."""
        if not r.done:
            return None
        if self.kind == "task":
            value = ((r.row.get("metrics") or {}).get("tasks") or {}).get(self.task, {}).get(self.field)
            return None if value is None else float(value)
        datasets = [self.dataset] if self.dataset else list(r.spec.get("eval", []))
        values = [self._one(r, d) for d in datasets]
        if not values or any(v is None for v in values):
            return None
        return sum(values) / len(values)

    def degradation(self, r: "Result") -> float | None:
        """How much worse than FP16 (>= 0 worse; in percent of FP16's value when relative)."""
        value = self.value(r)
        if value is None:
            return None
        if self.kind == "kld":
            return {"top1": 1.0 - value, "dp": -value}.get(self.field, value)
        base = self.value(r.baseline) if r.baseline is not None else None
        if base is None:
            return None
        d = value - base if self.lower_is_better else base - value
        if self.relative:
            return 100.0 * d / abs(base) if base else None
        return d

    def noise(self, r: "Result") -> float | None:
        """Twice the standard error of the degradation (its units), None where not known."""
        if self.kind == "kld" or r.baseline is None or not r.done or not r.baseline.done:
            return None
        if self.kind == "task":
            def se(x: Result) -> float | None:
                v = ((x.row.get("metrics") or {}).get("tasks") or {}).get(self.task, {}).get(f"{self.field}_stderr")
                return None if v is None else float(v)

            a, b = se(r), se(r.baseline)
            if a is None or b is None:
                return None
            n = 2 * math.sqrt(a * a + b * b)
        else:
            datasets = [self.dataset] if self.dataset else list(r.spec.get("eval", []))
            parts = []
            for d in datasets:
                mine = ((r.row.get("metrics") or {}).get("window_nll") or {}).get(d)
                theirs = ((r.baseline.row.get("metrics") or {}).get("window_nll") or {}).get(d)
                if not mine or not theirs or len(mine) != len(theirs) or len(mine) < 2:
                    return None
                diff = [x - y for x, y in zip(mine, theirs)]
                mean = sum(diff) / len(diff)
                sd = math.sqrt(sum((x - mean) ** 2 for x in diff) / (len(diff) - 1))
                parts.append(r.baseline.ppl[d] * 2 * sd / math.sqrt(len(diff)))  # d PPL = PPL d(mean NLL)
            n = math.sqrt(sum(x * x for x in parts)) / len(parts)
        base = self.value(r.baseline)
        return 100.0 * n / abs(base) if self.relative and base else n

    def beats_baseline(self, r: "Result", thresholds: tuple[float, ...]) -> float | None:
        """The improvement over FP16 when it exceeds the noise (the Class-1 bound where the noise is unknown):
        such a run is flagged, not recommended."""
        d = self.degradation(r)
        if d is None or d >= 0 or self.kind == "kld":
            return None
        noise = self.noise(r)
        return -d if -d > (thresholds[0] if noise is None else noise) + EPS else None


KLD_FIELDS = ("mean", "median", "p99", "top1", "dp")
LOWER_IS_BETTER_TASK_METRICS = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
# class bounds: the paper's for absolute PPL; the others are ptqlab's choices (say so when citing them)
DEFAULT_BOUNDS: dict[tuple, tuple[float, ...]] = {
    ("ppl", "", False): DEFAULT_THRESHOLDS, ("ppl", "", True): (1.0, 5.0),
    ("kld", "mean", False): (0.01, 0.05), ("kld", "median", False): (0.005, 0.025), ("kld", "p99", False): (0.1, 0.5),
    ("kld", "top1", False): (0.02, 0.1), ("kld", "dp", False): (0.002, 0.01),
    ("task", "", False): (0.01, 0.03), ("task", "", True): (1.0, 3.0),
}
PPL = Metric("ppl")


def classify(delta: float, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> int:
    """Sensitivity class of a perplexity degradation: 1 + the number of thresholds it exceeds."""
    for i, t in enumerate(thresholds):
        if delta <= t + EPS:
            return i + 1
    return len(thresholds) + 1


def parse_thresholds(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--thresholds: expected comma-separated numbers such as 0.1,0.5, got {text!r}") from None
    if not values or any(b <= a for a, b in zip(values, values[1:])) or values[0] < 0:
        raise ValueError(f"--thresholds: expected increasing non-negative numbers, got {text!r}")
    return values


@dataclass
class Result:
    """One run of the store, with its comparison to the baseline once known."""

    row: dict
    baseline: "Result | None" = None

    @property
    def spec(self) -> dict:
        return self.row["spec"]

    @property
    def kind(self) -> str:
        return self.row["kind"]

    @property
    def model(self) -> str:
        return self.row["model"]

    @property
    def status(self) -> str:
        return self.row["status"]

    @property
    def ppl(self) -> dict[str, float]:
        return self.row["ppl"] or {}

    @property
    def done(self) -> bool:
        return self.status == "done" and bool(self.ppl)

    @property
    def mean_ppl(self) -> float | None:
        return sum(self.ppl.values()) / len(self.ppl) if self.done else None

    @property
    def bits_per_weight(self) -> float | None:
        return self.row["bits_per_weight"]

    @property
    def speed(self) -> dict:
        """The ``--speed`` figures (:func:`ptqlab.speed.measure_speed`), empty where the run was not timed."""
        return (self.row.get("metrics") or {}).get("speed") or {}

    def speedup(self, key: str) -> float | None:
        """This run's ``speed[key]`` (a rate) over its FP16 baseline's, where both were timed."""
        base = self.baseline.speed.get(key) if self.baseline is not None else None
        mine = self.speed.get(key)
        return mine / base if mine is not None and base else None

    @property
    def context(self) -> tuple:
        return tuple(tuple(v) if isinstance(v := self.spec.get(k), list) else v for k in EVAL_KEYS)

    @property
    def granularity(self) -> str:
        return layer_target(self.spec)[0]

    @property
    def target(self) -> str:
        return layer_target(self.spec)[1]

    @property
    def is_baseline(self) -> bool:
        s = self.spec
        return (self.kind == "quant" and s.get("method") == "fp16" and s.get("wbits") == 16 and s.get("abits") == 16
                and s.get("transform", "none") == "none")

    def delta(self, dataset: str | None = None) -> float | None:
        if not self.done or self.baseline is None or not self.baseline.done:
            return None
        if dataset is None:
            return self.mean_ppl - self.baseline.mean_ppl
        if dataset not in self.ppl or dataset not in self.baseline.ppl:
            return None
        return self.ppl[dataset] - self.baseline.ppl[dataset]


def load_results(db: str) -> list[Result]:
    """The runs of a study database. A run computed again on changed data (a new store key for the same
    run dict) replaces the older row, so the report never shows a stale result beside the new one."""
    with Store(db, readonly=True) as store:  # a report never writes
        latest: dict[str, Result] = {}
        for r in (Result(row) for row in store.rows()):
            same = json.dumps(r.spec, sort_keys=True)
            old = latest.get(same)
            if old is None or (r.done, r.row.get("finished_at") or 0) >= (old.done, old.row.get("finished_at") or 0):
                latest[same] = r
        results = list(latest.values())
    baselines = {(r.model, r.context): r for r in results if r.is_baseline and r.done}
    for r in results:
        r.baseline = baselines.get((r.model, r.context))
    return results


def context_label(context: tuple) -> str:
    seqlen, evals, windows, dtype, metrics, tasks, fewshot, limit, tasks_dir, speed = context
    parts = [f"seqlen {seqlen if seqlen is not None else 'max'}", "eval " + "+".join(evals)]
    if windows is not None:
        parts.append(f"first {windows} windows")
    if dtype != "auto":
        parts.append(dtype)
    if metrics:
        parts.append("metrics " + "+".join(metrics))
    if tasks:
        parts.append("tasks " + "+".join(tasks) + (f" {fewshot}-shot" if fewshot is not None else "")
                     + (f" first {limit}" if limit is not None else ""))
    if speed:
        parts.append("timed")
    return ", ".join(parts)


def _group_order(g: int) -> float:
    return 0.0 if g == -1 else 1.0 if g == 0 else 2.0 + 1.0 / g


def precision_sort_key(spec: dict) -> tuple:
    return (-spec.get("abits", 16), -spec.get("wbits", 16), _group_order(spec.get("wgroup", 0)),
            not spec.get("wsym", True), _group_order(spec.get("agroup", 0)), not spec.get("act_sym", True),
            spec.get("wfmt", "int"), spec.get("afmt", "int"))


def _method_sort_key(spec: dict) -> tuple:
    method = spec.get("method", "rtn")
    order = list(METHODS)
    return (order.index(method) if method in order else len(order), spec.get("lorc_rank", 0),
            spec.get("lorc_bits", 8), bool(spec.get("lorc_aware")))


def row_labels(results: list[Result]) -> dict[int, str]:
    """Row label of each result: method (+LoRC), plus any option that varies among the results."""
    varying = [k for k in _EXTRA_KEYS
               if len({repr(r.spec[k]) for r in results if k in r.spec}) > 1]
    out = {}
    for r in results:
        extras = [f"{k}={r.spec[k]}" for k in varying if k in r.spec]
        out[id(r)] = " ".join([method_label(r.spec), *extras])
    return out


@dataclass
class Section:
    """A titled table, format-neutral."""

    title: str
    notes: list[str]
    header: list[str]
    rows: list[list[str]]
    level: int = 2
    cells: dict = field(default_factory=dict)  # (row label, column label) -> Result (for tests/tools)
    kind: str = "quant"  # "model" (heading), "quant", "recommendations", "sensitivity", "speed", "failures"


def _signed(x: float) -> str:
    return f"{round(x, 3) + 0.0:+.3f}"  # no "-0.000"


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _value_text(metric: Metric, value: float) -> str:
    return f"{value:.4f}" if metric.kind == "kld" else f"{value:.3f}"


def cell_text(r: Result, thresholds: tuple[float, ...], metric: Metric = PPL) -> str:
    if not r.done:
        return r.status
    value = metric.value(r)
    if value is None:
        return "n/a"
    delta = metric.degradation(r)
    if delta is None:
        return _value_text(metric, value)
    if metric.kind == "kld":
        return f"{_value_text(metric, value)} (C{classify(delta, thresholds)})"
    return f"{value:.3f} ({_signed(delta)}, C{classify(delta, thresholds)})"


def _class_legend(thresholds: tuple[float, ...], metric: Metric = PPL) -> str:
    d = metric.delta_name
    parts = [f"Class-1: {d} <= {thresholds[0]:g}"]
    for i in range(1, len(thresholds)):
        parts.append(f"Class-{i + 1}: {thresholds[i - 1]:g} < {d} <= {thresholds[i]:g}")
    parts.append(f"Class-{len(thresholds) + 1}: {d} > {thresholds[-1]:g}")
    return "; ".join(parts)


def metric_note(metric: Metric, thresholds: tuple[float, ...]) -> str:
    """Which metric a classification rests on, on which data, with which bounds."""
    if metric.kind == "task":
        on = f"{metric.field} on task {metric.task} (drop from FP16)"
    else:
        on = f"{metric.name} on {metric.dataset}" if metric.dataset else f"mean {metric.name} over the datasets"
        on += " (vs FP16)" if metric.kind == "ppl" else " (to FP16)"
    paper = metric == replace(PPL, dataset=metric.dataset) and thresholds == DEFAULT_THRESHOLDS
    bounds = ", ".join(f"{t:g}" for t in thresholds) + (" percent of the FP16 value" if metric.relative else "")
    return f"rests on {on}; class bounds {bounds}" + (" (the paper's)" if paper else "")


def _pivot(results: list[Result], row_of, col_of, row_order, col_order, thresholds, metric: Metric = PPL):
    rows_keys = sorted({row_of(r) for r in results}, key=row_order)
    cols_keys = sorted({col_of(r) for r in results}, key=col_order)
    cells = {(row_of(r), col_of(r)): r for r in results}
    body = [[rk[-1], *[cell_text(cells[(rk, ck)], thresholds, metric) if (rk, ck) in cells else ""
                       for ck in cols_keys]] for rk in rows_keys]
    return [ck[-1] for ck in cols_keys], body, {(rk[-1], ck[-1]): cells[(rk, ck)] for (rk, ck) in cells}


def _baseline_note(base: Result | None, datasets: list[str], metric: Metric = PPL) -> str:
    if base is None:
        return "FP16 baseline: not in the database (no degradation or class without it)"
    if not base.done:
        return f"FP16 baseline: {base.status}"
    per = ", ".join(f"{d} {base.ppl[d]:.3f}" for d in datasets if d in base.ppl)
    text = f"FP16 baseline: mean PPL {base.mean_ppl:.3f} ({per}); bits/weight {_fmt(base.bits_per_weight, '.2f')}"
    if metric.kind == "task":
        text += f"; {metric.task} {metric.field} {_fmt(metric.value(base))}"
    return text


def _what(metric: Metric, datasets: list[str]) -> str:
    if metric.kind == "task":
        return f"{metric.task} {metric.field}"
    return f"{metric.dataset} {metric.name}" if metric.dataset else f"mean {metric.name} over {', '.join(datasets)}"


def build_sections(results: list[Result], thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
                   per_dataset: bool = False, top: int = 5, metric: Metric = PPL) -> list[Section]:
    sections: list[Section] = []
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.model, r.context), []).append(r)
    for (model, context), group in groups.items():
        datasets = list(context[1])
        base = next((r for r in group if r.is_baseline), None)
        quant = [r for r in group if r.kind == "quant" and not r.is_baseline]
        sens = [r for r in group if r.kind == "sensitivity"]
        title = f"{model} ({context_label(context)})"
        sections.append(Section(title, [_baseline_note(base, datasets, metric)], [], [], level=2, kind="model"))
        cells_note = f"cells: {metric.name} (class)" if metric.kind == "kld" else \
            f"cells: {metric.name} ({metric.delta_name} vs FP16, class)"
        split = [None, *(datasets if per_dataset and metric.kind != "task" else [])]
        if quant:
            labels = row_labels(quant)
            row_of = lambda r: (*_method_sort_key(r.spec), labels[id(r)])  # noqa: E731
            col_of = lambda r: (*precision_sort_key(r.spec), precision_label(r.spec))  # noqa: E731
            for dataset in split:
                m = metric if dataset is None else replace(metric, dataset=dataset)
                cols, body, cells = _pivot(quant, row_of, col_of, lambda k: k, lambda k: k, thresholds, m)
                sections.append(Section(
                    f"{model}: {_what(m, datasets)}", [f"{cells_note}; {_class_legend(thresholds, m)}"],
                    ["method", *cols], body, level=3, cells=cells))
            sections.append(recommendations(model, quant, thresholds, top, metric))
        timed = speed_section(model, [r for r in group if r.kind == "quant"])
        if timed is not None:
            sections.append(timed)
        for granularity in sorted({r.granularity for r in sens}):
            part = [r for r in sens if r.granularity == granularity]
            order = {t: i for i, t in enumerate(dict.fromkeys(r.target for r in part))}
            row_of = lambda r: (order[r.target], r.target)  # noqa: E731
            col_of = lambda r: (*precision_sort_key(r.spec), precision_label(r.spec))  # noqa: E731
            for dataset in split:
                m = metric if dataset is None else replace(metric, dataset=dataset)
                cols, body, cells = _pivot(part, row_of, col_of, lambda k: k, lambda k: k, thresholds, m)
                what = _what(m, datasets).split(" over ")[0]
                sections.append(Section(
                    f"{model}: sensitivity per {granularity} (RTN on that part only), {what}",
                    [f"{cells_note}; {_class_legend(thresholds, m)}"],
                    [granularity, *cols], body, level=3, cells=cells, kind="sensitivity"))
    return sections


# the speed table's figures: record key -> (column, format); "x" columns are speedups over the FP16 run
SPEED_COLUMNS = (("decode_tok_s_b1", "decode tok/s b1", ".0f"), ("decode_tok_s_b1", "x FP16 b1", "x"),
                 ("decode_tok_s_b16", "decode tok/s b16", ".0f"), ("decode_tok_s_b16", "x FP16 b16", "x"),
                 ("prefill_tok_s", "prefill tok/s", ".0f"), ("prefill_tok_s", "x FP16 prefill", "x"),
                 ("weight_bytes", "weight MiB", "mib"), ("decode_peak_gpu_gib", "decode peak GiB", ".3f"))


def _speed_cell(r: Result, key: str, fmt: str) -> str:
    if fmt == "x":
        x = r.speedup(key)
        return "" if x is None else f"{x:.2f}x"
    v = r.speed.get(key)
    return "" if v is None else f"{v / 2**20:.1f}" if fmt == "mib" else f"{v:{fmt}}"


def speed_section(model: str, runs: list[Result]) -> Section | None:
    """The timed runs (``speed: true``) of one model and context, fewest bits first: mean PPL beside decode and
    prefill tokens/s, their speedup over the FP16 run, the model's bytes and the peak memory while decoding."""
    timed = sorted((r for r in runs if r.done and r.speed),
                   key=lambda r: (not r.is_baseline, r.bits_per_weight or 0, precision_sort_key(r.spec)))
    if not timed:
        return None
    labels = row_labels(timed)
    rows = [[labels[id(r)], precision_label(r.spec), _fmt(r.bits_per_weight, ".2f"), _fmt(r.mean_ppl),
             *[_speed_cell(r, key, fmt) for key, _, fmt in SPEED_COLUMNS]] for r in timed]
    first = timed[0].speed
    notes = [f"greedy decode of {first.get('new_tokens')} tokens after a {first.get('prompt_tokens')}-token prompt "
             f"(one CUDA-graph step replayed; median of {first.get('repeats')} repeats), prefill of "
             f"{first.get('prefill_tokens')} tokens; weight MiB: the bytes of the model's tensors on the GPU; "
             + ("x FP16: over the FP16 run of this model" if any(r.is_baseline for r in timed)
                else "no timed FP16 run: no speedups")]
    return Section(f"{model}: speed", notes, ["method", "precision", "bits/w", "mean PPL",
                                              *[c for _, c, _ in SPEED_COLUMNS]], rows, level=3,
                   cells={(labels[id(r)], precision_label(r.spec)): r for r in timed}, kind="speed")


def _storage_order(metric: Metric):
    return lambda r: (r.bits_per_weight if r.bits_per_weight is not None else 99, r.spec.get("abits", 16),
                      metric.degradation(r))


def recommendations(model: str, quant: list[Result], thresholds: tuple[float, ...], top: int,
                    metric: Metric = PPL) -> Section:
    """Per class (except the last), the configurations that stay in it: lowest bits first. A configuration
    that beats its own FP16 baseline by more than noise is listed as flagged, not recommended."""
    labels = row_labels(quant)
    rows = []
    done = [r for r in quant if metric.degradation(r) is not None]
    flagged = [r for r in done if metric.beats_baseline(r, thresholds) is not None]
    done = [r for r in done if r not in flagged]
    value_name = metric.name if metric.kind != "ppl" or metric.dataset else "mean PPL"
    for k in range(1, len(thresholds) + 1):
        fits = sorted((r for r in done if classify(metric.degradation(r), thresholds) <= k), key=_storage_order(metric))
        if not fits:
            rows.append([f"Class-{k}", "none", "", "", "", ""])
        for r in fits[: top or None]:
            rows.append([f"Class-{k}", labels[id(r)], precision_label(r.spec), _fmt(r.bits_per_weight, ".2f"),
                         _value_text(metric, metric.value(r)), _signed(metric.degradation(r))])
    for r in flagged:
        rows.append(["flagged", labels[id(r)], precision_label(r.spec), _fmt(r.bits_per_weight, ".2f"),
                     _value_text(metric, metric.value(r)), _signed(metric.degradation(r))])
    notes = ["configurations within each class, lowest bits first (bits/weight includes scales, zero points and "
             "LoRC factors; then activation bits)" + (f"; top {top} per class" if top else ""),
             metric_note(metric, thresholds)]
    if flagged:
        notes.append("flagged: beats its own FP16 baseline by more than noise (2 standard errors of the paired "
                     "per-window difference; the Class-1 bound where the record has no per-window NLLs): not "
                     "recommended, look at it first (calibration on the evaluation text, a baseline on other data)")
    return Section(f"{model}: recommendations", notes,
                   ["within", "method", "precision", "bits/w", value_name, metric.delta_name], rows, level=3,
                   kind="recommendations")


def failures_section(results: list[Result]) -> Section | None:
    """The failed runs with the first line of their error (``None`` when nothing failed)."""
    failed = [r for r in results if r.status == "failed"]
    if not failed:
        return None
    rows = []
    for r in failed:
        err = (r.row.get("error") or "").strip().splitlines()
        rows.append([r.model, r.row["name"], str(r.row["attempts"]), r.row.get("worker") or "", err[0] if err else "?"])
    return Section(f"Failed runs ({len(failed)})",
                   ["a run that raised, or whose worker died too often; the full traceback is in the database "
                    "(runs.error, or --format csv); rerun them with ptqlab study ... --retry-failed"],
                   ["model", "run", "attempts", "worker", "error"], rows, level=2, kind="failures")


# ---------------------------------------------------------------- renderers


def render_markdown(sections: list[Section], title: str = "Study report") -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"{'#' * s.level} {s.title}", ""]
        out += [n + "  " if i < len(s.notes) - 1 else n for i, n in enumerate(s.notes)]
        out.append("")
        if s.header:
            esc = lambda x: str(x).replace("|", "\\|")  # noqa: E731
            out.append("| " + " | ".join(esc(h) for h in s.header) + " |")
            out.append("|" + "|".join(["---"] + ["---:"] * (len(s.header) - 1)) + "|")
            out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in s.rows]
            out.append("")
    return "\n".join(out)


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "<": r"\textless{}", ">": r"\textgreater{}"}


def latex_escape(text: str) -> str:
    pieces = str(text).split("<=")
    return r"$\leq$".join("".join(_LATEX_ESCAPES.get(ch, ch) for ch in piece) for piece in pieces)


def render_latex(sections: list[Section], title: str = "Study report") -> str:
    out = [f"% {latex_escape(title)} -- generated by ptqlab report; needs \\usepackage{{booktabs}}", ""]
    for s in sections:
        if not s.header:
            out.append(f"% {s.title}: " + "; ".join(s.notes))
            out.append("")
            continue
        caption = latex_escape(s.title + ". " + " ".join(s.notes)).replace("dPPL", r"$\Delta$PPL")
        out += [r"\begin{table}[ht]", r"\centering", rf"\caption{{{caption}}}",
                r"\begin{tabular}{l" + "r" * (len(s.header) - 1) + "}", r"\toprule",
                " & ".join(latex_escape(h).replace("dPPL", r"$\Delta$PPL") for h in s.header) + r" \\",
                r"\midrule"]
        out += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in s.rows]
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


def _iso(t: float | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def render_csv(results: list[Result], thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
               per_dataset: bool = False, metric: Metric = PPL) -> str:
    """One line per run (every status), with its baseline, degradation and class (by PPL; with another
    ``metric``, also that metric's value, degradation, class and flag), the mean KL divergence per dataset
    and every task score the runs recorded."""
    datasets = sorted({d for r in results for d in r.spec.get("eval", [])}) if per_dataset else []
    header = ["model", "kind", "granularity", "target", "method", "lorc_rank", "row", "precision", "wbits", "wgroup",
              "wsym", "abits", "agroup", "act_sym", "status", "bits_per_weight", "mean_ppl", "baseline_mean_ppl",
              "delta_ppl", "class"]
    for d in datasets:
        header += [f"ppl_{d}", f"delta_{d}", f"class_{d}"]
    kld_sets = sorted({d for r in results for d in ((r.row.get("metrics") or {}).get("kld") or {})})
    task_cols = sorted({(t, m) for r in results for t, v in ((r.row.get("metrics") or {}).get("tasks") or {}).items()
                        for m in v})
    header += [f"kld_{d}" for d in kld_sets] + [f"{t}_{m}" for t, m in task_cols]
    speed_keys = [k for k in dict.fromkeys(k for k, _, _ in SPEED_COLUMNS) if any(k in r.speed for r in results)]
    header += speed_keys + [f"speedup_{k}" for k in speed_keys if "tok_s" in k]
    if metric != PPL:
        header += ["metric", "metric_value", "metric_degradation", "metric_class", "metric_flagged"]
    header += ["seqlen", "eval", "max_eval_windows", "dtype", "run_hash", "record_hash", "worker", "attempts",
               "started_at", "finished_at", "error"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.model, r.context, r.kind), []).append(r)
    labels = {}
    for group in groups.values():
        labels.update(row_labels(group))
    num = lambda x: "" if x is None else repr(float(x))  # noqa: E731 - full precision
    for r in results:
        s = r.spec
        delta = r.delta()
        line = [r.model, r.kind, r.granularity if r.kind == "sensitivity" else "",
                r.target if r.kind == "sensitivity" else "", s.get("method", ""),
                s.get("lorc_rank", 0), labels[id(r)], precision_label(s), s.get("wbits"), s.get("wgroup"),
                s.get("wsym"), s.get("abits"), s.get("agroup"), s.get("act_sym"), r.status, num(r.bits_per_weight),
                num(r.mean_ppl), num(r.baseline.mean_ppl if r.baseline and r.baseline.done else None), num(delta),
                "" if delta is None else classify(delta, thresholds)]
        for d in datasets:
            dd = r.delta(d)
            line += [num(r.ppl.get(d)), num(dd), "" if dd is None else classify(dd, thresholds)]
        recorded = r.row.get("metrics") or {}
        line += [num(((recorded.get("kld") or {}).get(d) or {}).get("mean")) for d in kld_sets]
        line += [num(((recorded.get("tasks") or {}).get(t) or {}).get(m)) for t, m in task_cols]
        line += [num(r.speed.get(k)) for k in speed_keys] + [num(r.speedup(k)) for k in speed_keys
                                                             if "tok_s" in k]
        if metric != PPL:
            md = metric.degradation(r)
            line += [metric.delta_name, num(metric.value(r)), num(md),
                     "" if md is None else classify(md, thresholds),
                     "" if md is None else metric.beats_baseline(r, thresholds) is not None]
        err = (r.row.get("error") or "").splitlines()
        line += [s.get("seqlen"), "+".join(s.get("eval", [])), s.get("max_eval_windows"), s.get("dtype"),
                 r.row["run_hash"], r.row.get("record_hash") or "", r.row.get("worker") or "", r.row["attempts"],
                 _iso(r.row.get("started_at")), _iso(r.row.get("finished_at")), err[0] if err else ""]
        w.writerow(["" if x is None else x for x in line])
    return buf.getvalue()


def report(db: str, fmt: str = "markdown", per_dataset: bool = False,
           thresholds: tuple[float, ...] | None = None, top: int = 5, metric: Metric = PPL) -> str:
    """The report of a study database; ``metric`` (default: mean PPL, the paper's) is what classes, ranks and
    recommendations rest on; ``thresholds`` None: that metric's default bounds (:data:`DEFAULT_BOUNDS`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")
    thresholds = thresholds or metric.default_thresholds
    results = load_results(db)
    if fmt == "csv":
        return render_csv(results, thresholds, per_dataset, metric)
    sections = build_sections(results, thresholds, per_dataset, top, metric)
    sections += size_trend_sections(results, thresholds, metric.dataset, metric)  # 2+ sizes of a testbed family
    failures = failures_section(results)
    if failures is not None:
        sections.append(failures)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    title = f"Study report: {db} ({', '.join(f'{n} {s}' for s, n in counts.items()) or 'empty'})"
    return render_markdown(sections, title) if fmt == "markdown" else render_latex(sections, title)


# ---------------------------------------------------------------- size trends (testbed family)


def model_size(model: str) -> tuple[str, int] | None:
    """``(family, parameter count)`` of a testbed family member (``testbed-opt-25m`` -> ("testbed-opt", ...)),
    None for any other model."""
    from ..testbed import family_member

    member = family_member(model)
    return None if member is None else (f"testbed-{member.arch}", member.params)


def _size_label(params: int) -> str:
    return f"{params / 1e6:.1f}M"


def _trend_word(values: list[float]) -> str:
    """How a series moves from the smallest to the largest model: falls / rises / mixed / flat."""
    steps = [b - a for a, b in zip(values, values[1:])]
    if len(values) < 2 or all(abs(s) < EPS for s in steps):
        return "flat"
    if all(s <= EPS for s in steps):
        return "falls"
    if all(s >= -EPS for s in steps):
        return "rises"
    return "mixed"


def size_trend_groups(results: list[Result]) -> dict[tuple, dict[int, list[Result]]]:
    """Finished quantization runs of testbed family members with a baseline, by (family, evaluation
    context) and parameter count; only families with at least two sizes."""
    groups: dict[tuple, dict[int, list[Result]]] = {}
    for r in results:
        fam = model_size(r.model)
        if fam is None or r.kind != "quant" or r.is_baseline or r.delta() is None:
            continue
        groups.setdefault((fam[0], r.context), {}).setdefault(fam[1], []).append(r)
    return {k: v for k, v in groups.items() if len(v) >= 2}


def size_trend_sections(results: list[Result], thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
                        dataset: str | None = None, metric: Metric = PPL) -> list[Section]:
    """The size study's tables, per family and evaluation setting: dPPL of every configuration against
    the parameter count (with whether it falls or rises with size), the sensitivity class of each
    precision per size (best method), and per size the lowest-bit configuration of each class.

    ``dataset`` None: the first evaluation dataset of the setting (``heldout`` in recipes/sizes.yaml);
    ``metric``: what the degradation is (default dPPL); a run that beats its FP16 by more than noise is not
    recommended (:meth:`Metric.beats_baseline`).
    """
    sections: list[Section] = []
    for (family, context), by_size in size_trend_groups(results).items():
        ds = dataset or context[1][0]
        m = replace(metric, dataset=ds) if metric.kind != "task" else metric
        on = ds if metric.kind != "task" else metric.task
        dn = m.delta_name
        sizes = sorted(by_size)
        cols = [_size_label(p) for p in sizes]
        models = {p: by_size[p][0].model for p in sizes}
        base = {p: by_size[p][0].baseline.ppl.get(ds) for p in sizes}
        sections.append(Section(
            f"Size trends: {family} ({context_label(context)}), {on} {m.name}",
            [f"models: {', '.join(f'{models[p]} ({_size_label(p)} parameters)' for p in sizes)}",
             "FP16 PPL: " + ", ".join(f"{_size_label(p)} {_fmt(base[p])}" for p in sizes)],
            [], [], level=2, kind="size-trend"))
        # 1. the degradation of each configuration against size
        keyed: dict[tuple, dict[int, Result]] = {}
        for p in sizes:
            for r in by_size[p]:
                key = (*precision_sort_key(r.spec), *_method_sort_key(r.spec), precision_label(r.spec),
                       method_label(r.spec))
                keyed.setdefault(key, {})[p] = r
        rows, cells = [], {}
        for key in sorted(keyed):
            per = keyed[key]
            deltas = [m.degradation(per[p]) if p in per else None for p in sizes]
            known = [d for d in deltas if d is not None]
            row = [key[-2], key[-1]]
            for p, d in zip(sizes, deltas):
                row.append("" if d is None else f"{_signed(d)} C{classify(d, thresholds)}")
                if d is not None:
                    cells[(f"{key[-2]} {key[-1]}", _size_label(p))] = per[p]
            row.append(_trend_word(known) if len(known) == len(sizes) else "incomplete")
            rows.append(row)
        sections.append(Section(
            f"{family}: {dn} vs parameter count ({on})",
            [f"cells: {dn} vs the size's own FP16 (class); {_class_legend(thresholds, m)}; "
             f"trend: how {dn} moves from the smallest to the largest size"],
            ["precision", "method", *cols, "trend"], rows, level=3, cells=cells, kind="size-trend"))
        # 2. class of each precision per size, with its best method
        prec: dict[tuple, dict[int, Result]] = {}
        for key, per in keyed.items():
            for p, r in per.items():
                pk = (*precision_sort_key(r.spec), key[-2])
                best = prec.setdefault(pk, {}).get(p)
                if m.degradation(r) is None:
                    continue
                if best is None or m.degradation(r) < m.degradation(best):
                    prec[pk][p] = r
        rows = []
        for pk in sorted(prec):
            row = [pk[-1]]
            for p in sizes:
                r = prec[pk].get(p)
                row.append("" if r is None else
                           f"Class-{classify(m.degradation(r), thresholds)} ({method_label(r.spec)}, "
                           f"{_signed(m.degradation(r))})")
            rows.append(row)
        sections.append(Section(
            f"{family}: class by size ({on})", [f"cells: the class of the best method at that precision (its {dn})"],
            ["precision", *cols], rows, level=3, kind="size-trend"))
        # 3. per-size recommendation: the fewest bits that stay within each class
        rows, flagged = [], []
        for p in sizes:
            row = [f"{models[p]} ({_size_label(p)})"]
            candidates = [r for r in by_size[p] if m.degradation(r) is not None]
            flagged += [r for r in candidates if m.beats_baseline(r, thresholds) is not None]
            candidates = [r for r in candidates if m.beats_baseline(r, thresholds) is None]
            for k in range(1, len(thresholds) + 1):
                fits = sorted((r for r in candidates if classify(m.degradation(r), thresholds) <= k),
                              key=_storage_order(m))
                row.append("none" if not fits else
                           f"{precision_label(fits[0].spec)} {method_label(fits[0].spec)} "
                           f"({_signed(m.degradation(fits[0]))})")
            rows.append(row)
        notes = ["the configuration with the fewest bits per weight (then activation bits) that stays within each "
                 "class", metric_note(m, thresholds)]
        if flagged:
            notes.append("flagged, not recommended (beat their own FP16 by more than noise): " + ", ".join(
                f"{r.model} {precision_label(r.spec)} {method_label(r.spec)} ({_signed(m.degradation(r))})"
                for r in flagged))
        sections.append(Section(
            f"{family}: recommendation per size ({on})", notes,
            ["model", *[f"within Class-{k}" for k in range(1, len(thresholds) + 1)]], rows, level=3,
            kind="size-trend"))
    return sections
