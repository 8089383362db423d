"""Sweep definitions: YAML recipes and ``--grid`` shorthand, expanded into run dicts.

A recipe::

    name: methods                      # optional
    description: ...                   # optional
    models: [testbed-opt, testbed-bloom]
    settings:                          # fixed values for every run (optional)
      calib: testbed
      eval: [wikitext2, ptb]
    axes:                              # crossed; a list of such mappings = union of crosses
      method: [rtn, gptq]
      wbits: [8, 4, 3]
      wgroup: [0, 128]
    exclude:                           # a run matching every key of one rule is skipped
      - {method: rtn, wbits: 3}
      - {wbits: 8, wgroup: [128]}      # a list in a rule means "any of"

Every planned run is a flat, *canonical* run dict (see :data:`DEFAULTS` for
its keys).  Options that cannot affect a run's numbers are normalised away
(no calibration keys for RTN, no group size for 16-bit weights, ...), so two
spellings of the same experiment give the same dict.  The key of a run in
the results store is ``config_hash(run_dict)`` (:func:`run_key`), computable
before the run; the record's own ``config_hash`` (hash of ``record["config"]``)
is stored next to it.

Runs that make no sense are dropped or merged with a note, never an error:
``fp16`` means W16A16 (its ``wbits`` is ignored, so it dedupes); weights left
at 16 bits with quantized activations are activation-only RTN; GPTQ/ZQ with
16-bit weights and LoRC without weight quantization are dropped.  The FP16
baseline of every (model, evaluation setting) is added automatically.
"""

from __future__ import annotations

import difflib
import itertools
import warnings
import shlex
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import DEPRECATED_KEYS, OPTIONS, config_hash, from_flat, parse_text_value
from ..methods import get_method
from ..data import data_fingerprint
from ..formats import implied_bits
from ..quantizers import QuantizationError

DEFAULT_MODELS = ("testbed-opt", "testbed-bloom")

class _OptionView(Mapping):
    """A live view of :data:`ptqlab.config.OPTIONS` (a transform registered later adds its keys)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __getitem__(self, key: str) -> object:
        return getattr(OPTIONS[key], self.what)

    def __iter__(self) -> Iterator[str]:
        return iter(OPTIONS)

    def __len__(self) -> int:
        return len(OPTIONS)


# Every key a run dict can hold, with its default: the config's options (ptqlab.config.OPTIONS).
DEFAULTS: Mapping[str, object] = _OptionView("default")
# What identifies the evaluation a run is compared under (its baseline shares these).
EVAL_KEYS = ("seqlen", "eval", "max_eval_windows", "dtype", "metrics", "tasks", "num_fewshot", "limit",
             "tasks_dir", "speed")
LIST_KEYS = ("eval", "metrics", "tasks")  # one value is a list: never split into an axis by --grid
TOP_KEYS = ("name", "description", "models", "settings", "axes", "exclude", "save")


class RecipeError(ValueError):
    """A malformed recipe or grid; the message names the key and, for YAML, the line."""


VALIDATORS: Mapping[str, object] = _OptionView("check")


def _canonical_key(key: object, where: str) -> object:
    """A deprecated key's new name (with a warning)."""
    if key in DEPRECATED_KEYS:
        warnings.warn(f"{where}: key '{key}' is deprecated and will be removed in the next release: use "
                      f"'{DEPRECATED_KEYS[key]}'", FutureWarning, stacklevel=3)
        return DEPRECATED_KEYS[key]
    return key


def _unknown_key_message(key: object, allowed) -> str:
    hint = difflib.get_close_matches(str(key), list(allowed), n=1)
    return f"unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + \
        f"; allowed keys: {', '.join(allowed)}"


# ---------------------------------------------------------------- YAML with line numbers


class _LDict(dict):
    """A mapping that remembers the 1-based line of each key and value."""

    line = 0

    def __init__(self) -> None:
        super().__init__()
        self.key_lines: dict = {}
        self.value_lines: dict = {}


class _LList(list):
    line = 0

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[int] = []


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_map(loader: _LineLoader, node: yaml.MappingNode):
    d = _LDict()
    d.line = node.start_mark.line + 1
    yield d
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise RecipeError(f"line {line}: a mapping key must be a plain name") from None
        if key in d:
            raise RecipeError(f"line {line}: key {key!r} given twice in one mapping")
        d[key] = loader.construct_object(value_node, deep=True)
        d.key_lines[key] = line
        d.value_lines[key] = value_node.start_mark.line + 1


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode):
    seq = _LList()
    seq.line = node.start_mark.line + 1
    yield seq
    for item in node.value:
        seq.append(loader.construct_object(item, deep=True))
        seq.lines.append(item.start_mark.line + 1)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def _plain(v: object) -> object:
    """Strip the line-tracking subclasses (for hashing / JSON)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


# ---------------------------------------------------------------- plan


@dataclass(frozen=True)
class PlannedRun:
    """One run of a study: its canonical dict and its store key."""

    spec: dict
    key: str

    @property
    def model(self) -> str:
        return self.spec["model"]

    @property
    def kind(self) -> str:
        return self.spec.get("kind", "quant")

    def name(self) -> str:
        return run_name(self.spec)


@dataclass
class Plan:
    runs: list[PlannedRun] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)  # note -> how many runs it concerned
    name: str = "study"

    def note_lines(self) -> list[str]:
        return [f"{msg} ({n} run{'s' if n != 1 else ''})" for msg, n in self.notes.items()]


def data_fingerprints(spec: dict, data_dir: str | None = None) -> dict[str, str]:
    """Content hashes of the evaluation and calibration texts a run reads (see :func:`ptqlab.data.data_fingerprint`)."""
    out = {f"eval:{name}": data_fingerprint(name, "eval", data_dir) for name in spec.get("eval", [])}
    if "calib" in spec:
        out["calib"] = data_fingerprint(spec["calib"], "calib", data_dir)
    if spec.get("tasks_dir"):
        out["tasks_dir"] = tasks_dir_fingerprint(spec["tasks_dir"])
    return out


def tasks_dir_fingerprint(folder: str) -> str:
    """Content hash of a task folder's files (YAMLs and their local data): edited tasks get new keys."""
    import hashlib

    from ..data import _file_sha256

    root = Path(folder).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    digest = hashlib.sha256("".join(f"{p.relative_to(root)}:{_file_sha256(p)};" for p in files).encode())
    return f"sha256:{digest.hexdigest()[:16]}"


def model_fingerprint(model: str) -> str:
    """Content hash of a local model folder's ``config.json`` and weight files, or ``name:<model>`` for a hub id
    (its revision is fixed by the hub) and for a testbed member that has not been built yet.

    Testbed members larger than the shipped ones are rebuilt into a cache by a command: a rebuilt (retrained)
    member must not inherit the rows of the one it replaced.
    """
    import hashlib

    from ..data import _file_sha256
    from ..testbed import resolve_model_path

    if not model:
        return "name:"
    try:
        path = Path(resolve_model_path(model))
    except FileNotFoundError:
        return f"name:{model}"
    files = sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin")) \
        if path.is_dir() else []
    if not files:
        return f"name:{model}"
    digest = hashlib.sha256("".join(f"{p.name}:{_file_sha256(p)};" for p in files).encode())
    return f"sha256:{digest.hexdigest()[:16]}"


def run_key(spec: dict, data_dir: str | None = None) -> str:
    """The results-store key of a run: ``config_hash`` of its canonical run dict and of the contents of its data
    and (local) model.

    Regenerated or edited data (a new local copy, an edited text file) or a rebuilt model folder gives
    new keys, so a resumed study recomputes instead of reusing stale rows.
    """
    return config_hash({**spec, "data": data_fingerprints(spec, data_dir),
                        "model_files": model_fingerprint(spec.get("model", ""))})


def _spec_parts(who: str, group: int, symmetric: bool, group_prefix: str) -> list[str]:
    """Label parts of one spec beyond its bits: its groups, per-tensor scale, asymmetry."""
    parts = []
    if group > 0:
        parts.append(f"{group_prefix}{group}")
    elif group == -1:
        parts.append(f"{who}:tensor")
    if not symmetric:
        parts.append(f"{who}:asym")
    return parts


def precision_label(spec: dict) -> str:
    """``W4A8``, ``W4A16 g128``, ``W8A8 w:asym a:tensor``, ``W8A8 w:fp8 a:fp8``, ``W4A16 w:nvfp4 g16`` ...
    (the report's columns)."""
    w, a = spec.get("wbits", 16), spec.get("abits", 16)
    parts = [f"W{w}A{a}"]
    if w != 16:
        parts += [f"w:{spec['wfmt']}"] if spec.get("wfmt", "int") != "int" else []
        parts += _spec_parts("w", spec.get("wgroup", 0), spec.get("wsym", True), "g")
    if a != 16:
        parts += [f"a:{spec['afmt']}"] if spec.get("afmt", "int") != "int" else []
        parts += _spec_parts("a", spec.get("agroup", 0), spec.get("act_sym", True), "ag")
    return " ".join(parts)


def method_label(spec: dict) -> str:
    """``gptq``, ``gptq +LoRC8``, ``rtn +LoRC4/16b aware``, ``awq+rtn`` (the report's rows)."""
    label = spec.get("method", "rtn")
    if spec.get("transform", "none") != "none":
        label = f"{spec['transform']}+{label}"
    r = spec.get("lorc_rank", 0)
    if r:
        label += f" +LoRC{r}"
        if spec.get("lorc_bits", 8) != 8:
            label += f"/{spec['lorc_bits']}b"
        if spec.get("lorc_aware"):
            label += " aware"
    return label


def layer_target(spec: dict) -> tuple[str, str]:
    """``(granularity, target)`` of a run's layer filter: ``("module", "fc1")``, ``("all", "")``."""
    granularity, _, target = spec.get("layers", "all").partition(":")
    return granularity, target


def run_name(spec: dict) -> str:
    if spec.get("kind") == "sensitivity":
        granularity, target = layer_target(spec)
        return f"{spec['model']} sensitivity {granularity}={target} {precision_label(spec)}"
    return f"{spec['model']} {method_label(spec)} {precision_label(spec)}"


def canonical_run(raw: dict) -> tuple[dict | None, str | None]:
    """Normalise one crossed run; ``(None, why)`` drops it, ``(dict, note)`` keeps it (note may be None).

    The study's own merges come first (fp16 means W16A16, 16-bit weights with
    quantized activations is activation-only RTN); the rest is the config's
    canonical flat form (:meth:`ptqlab.config.RunSpec.to_flat`).
    """
    r = {**DEFAULTS, **raw}
    note = None
    if r["method"] == "fp16":
        r["wfmt"] = "int"  # W16: no weight format
    # a float format fixes its bits: wbits/abits left at 16 are read as them (ptqlab.formats.normalize)
    r["wbits"], r["abits"] = implied_bits(r["wfmt"], r["wbits"]), implied_bits(r["afmt"], r["abits"])
    if r["method"] == "fp16" and r["wbits"] != 16:
        note = "method fp16 keeps weights in full precision: its wbits is ignored (deduplicated)"
        r["wbits"] = 16
    if r["wbits"] == 16:
        if get_method(r["method"]).needs_calibration:
            return None, f"dropped {r['method']} with wbits 16: the method quantizes weights"
        if r["lorc_rank"]:
            return None, "dropped LoRC with wbits 16: nothing to compensate"
        r["method"] = "fp16" if r["abits"] == 16 else "rtn"  # activation-only quantization is RTN
        r["quantize_head"] = False
    return {"kind": "quant", **from_flat(r).to_flat()}, note


def baseline_spec(model: str, eval_settings: dict) -> dict:
    """The FP16 run every run of ``model`` under ``eval_settings`` is compared with."""
    spec, _ = canonical_run({"model": model, "method": "fp16",
                             **{k: eval_settings.get(k, DEFAULTS[k]) for k in EVAL_KEYS}})
    return spec


def _matches(run: dict, rule: dict) -> bool:
    """Whether ``run`` matches every key of an exclude ``rule`` (each rule value is a list of options)."""
    return all(run.get(key) in options for key, options in rule.items())


def expand(models: list[str], settings: dict, axes_list: list[dict], exclude: list[dict], name: str = "study",
           data_dir: str | None = None, save: list[dict] | None = None) -> Plan:
    """Cross the axes, apply settings and exclusions, normalise, dedupe, add baselines.

    ``save``: rules choosing the runs whose quantized model is written to disk (``[{}]``: every run that
    quantizes weights); those run dicts carry ``save: true``.
    """
    plan = Plan(name=name)
    seen: set[str] = set()
    by_model: dict[str, list[PlannedRun]] = {m: [] for m in models}
    contexts: dict[str, list[dict]] = {m: [] for m in models}
    for model in models:
        for axes in axes_list:
            keys = list(axes)
            for values in itertools.product(*(axes[k] for k in keys)):
                raw = {**DEFAULTS, **settings, **dict(zip(keys, values)), "model": model}
                if any(_matches(raw, rule) for rule in exclude):
                    plan.notes["excluded by an exclude rule"] += 1
                    continue
                try:
                    spec, note = canonical_run(raw)
                except QuantizationError as err:
                    plan.notes[f"dropped: {err}"] += 1
                    continue
                if spec is None:
                    plan.notes[note] += 1
                    continue
                if note:
                    plan.notes[note] += 1
                if save and spec["wbits"] != 16 and any(_matches(raw, rule) for rule in save):
                    spec["save"] = True
                    plan.notes["quantized model saved (save: in the recipe)"] += 1
                key = run_key(spec, data_dir)
                if key in seen:
                    plan.notes["duplicate after normalisation (kept once)"] += 1
                    continue
                seen.add(key)
                ctx = {k: spec.get(k, DEFAULTS[k]) for k in EVAL_KEYS}
                if ctx not in contexts[model]:
                    contexts[model].append(ctx)
                by_model[model].append(PlannedRun(spec, key))
    for model in models:
        baselines = []
        for ctx in contexts[model] or [{k: settings.get(k, DEFAULTS[k]) for k in EVAL_KEYS}]:
            spec = baseline_spec(model, ctx)
            key = run_key(spec, data_dir)
            if key in seen:
                # already in the grid: move it to the front so the baseline runs first
                run = next(r for r in by_model[model] if r.key == key)
                by_model[model].remove(run)
            else:
                seen.add(key)
                plan.notes["FP16 baseline added"] += 1
                run = PlannedRun(spec, key)
            baselines.append(run)
        plan.runs.extend(baselines + by_model[model])
    return plan


# ---------------------------------------------------------------- parsing


def _check_value(key: str, value: object, where: str) -> object:
    if key not in VALIDATORS:
        raise RecipeError(f"{where}: {_unknown_key_message(key, VALIDATORS)}")
    try:
        return OPTIONS[key].validate(_plain(value))
    except ValueError as err:
        raise RecipeError(f"{where}: bad value {_plain(value)!r} for '{key}': {err}") from None


def _loc(source: str, line: int | None, path: str) -> str:
    return f"{source}, line {line}: {path}" if line else f"{source}: {path}"


def _parse_mapping_of_values(d: object, source: str, path: str, as_axes: bool, line: int | None = None) -> dict:
    if not isinstance(d, dict):
        raise RecipeError(f"{_loc(source, getattr(d, 'line', None) or line, path)}: expected a mapping of keys to "
                          f"{'lists of values' if as_axes else 'values'}")
    out = {}
    for key, value in d.items():
        kline = d.key_lines.get(key) if isinstance(d, _LDict) else None
        key = _canonical_key(key, _loc(source, kline, f"{path}.{key}"))
        if key == "model" or key == "models":
            raise RecipeError(f"{_loc(source, kline, f'{path}.{key}')}: give models in the top-level 'models' list")
        if key not in VALIDATORS:
            raise RecipeError(f"{_loc(source, kline, f'{path}.{key}')}: {_unknown_key_message(key, VALIDATORS)}")
        if as_axes:
            items = value if isinstance(value, list) else [value]
            lines = value.lines if isinstance(value, _LList) else [d.value_lines.get(key) if isinstance(d, _LDict) else None] * len(items)
            if not items:
                raise RecipeError(f"{_loc(source, kline, f'{path}.{key}')}: an axis needs at least one value")
            checked = []
            for i, (item, line) in enumerate(zip(items, lines)):
                v = _check_value(key, item, _loc(source, line, f"{path}.{key}[{i}]"))
                if v not in checked:
                    checked.append(v)
            out[key] = checked
        else:
            line = d.value_lines.get(key) if isinstance(d, _LDict) else None
            out[key] = _check_value(key, value, _loc(source, line, f"{path}.{key}"))
    return out


def _parse_exclude(rules: object, source: str, what: str = "exclude") -> list[dict]:
    """Rules that match runs (``exclude``, ``save``): partial run mappings, a list value meaning any of."""
    if rules is None:
        return []
    if not isinstance(rules, list):
        raise RecipeError(f"{_loc(source, getattr(rules, 'line', None), what)}: expected a list of partial run "
                          f"mappings, e.g. - {{method: rtn, wbits: 3}}")
    out = []
    for i, rule in enumerate(rules):
        line = rules.lines[i] if isinstance(rules, _LList) else None
        if not isinstance(rule, dict) or not rule:
            raise RecipeError(f"{_loc(source, line, f'{what}[{i}]')}: expected a non-empty mapping such as "
                              f"{{method: rtn, wbits: 3}}")
        parsed = {}
        for key, value in rule.items():
            kline = rule.key_lines.get(key) if isinstance(rule, _LDict) else line
            where = _loc(source, kline, f"{what}[{i}].{key}")
            key = _canonical_key(key, where)
            if key == "model":
                vals = value if isinstance(value, list) else [value]
                if not all(isinstance(v, str) for v in vals):
                    raise RecipeError(f"{where}: bad value {_plain(value)!r} for 'model': must be model names")
                parsed[key] = _plain(vals)
                continue
            if key in LIST_KEYS:
                parsed[key] = [_check_value(key, value, where)]
                continue
            vals = value if isinstance(value, list) else [value]
            parsed[key] = [_check_value(key, v, where) for v in vals]
        out.append(parsed)
    return out


def _parse_models(value: object, source: str, line: int | None) -> list[str]:
    models = [value] if isinstance(value, str) else value
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise RecipeError(f"{_loc(source, line, 'models')}: bad value {_plain(value)!r}: expected a list of model "
                          f"names or folders")
    return list(dict.fromkeys(models))


def parse_recipe_text(text: str, source: str = "<recipe>", models: list[str] | None = None,
                      overrides: dict | None = None, data_dir: str | None = None) -> Plan:
    """Parse and expand a YAML recipe; ``models`` replaces its models, ``overrides`` its settings."""
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        raise RecipeError(f"{source}, line {line}: YAML syntax error: {err.problem or err}") from None
    except RecipeError as err:
        raise RecipeError(f"{source}, {err}") from None
    if not isinstance(doc, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with 'models', 'axes', optional 'settings' and 'exclude'")
    for key in doc:
        if key not in TOP_KEYS:
            raise RecipeError(f"{_loc(source, doc.key_lines.get(key), str(key))}: {_unknown_key_message(key, TOP_KEYS)}")
    for key in ("name", "description"):
        if key in doc and not isinstance(doc[key], str):
            raise RecipeError(f"{_loc(source, doc.value_lines.get(key), key)}: bad value {_plain(doc[key])!r}: "
                              f"expected text")
    recipe_models = _parse_models(doc["models"], source, doc.value_lines.get("models")) if "models" in doc \
        else list(DEFAULT_MODELS)
    settings = _parse_mapping_of_values(doc.get("settings") or _LDict(), source, "settings", as_axes=False,
                                        line=doc.value_lines.get("settings"))
    if "axes" not in doc:
        raise RecipeError(f"{source}: the recipe has no 'axes' (give at least e.g. 'axes: {{wbits: [4]}}')")
    axes_doc = doc["axes"]
    axes_items = axes_doc if isinstance(axes_doc, list) else [axes_doc]
    axes_list = []
    for i, axes in enumerate(axes_items):
        path = f"axes[{i}]" if isinstance(axes_doc, list) else "axes"
        line = axes_doc.lines[i] if isinstance(axes_doc, _LList) else doc.value_lines.get("axes")
        parsed = _parse_mapping_of_values(axes, source, path, as_axes=True, line=line)
        for key in parsed:
            if key in settings:
                line = axes.key_lines.get(key) if isinstance(axes, _LDict) else None
                raise RecipeError(f"{_loc(source, line, f'{path}.{key}')}: '{key}' is both a setting and an axis; "
                                  f"keep one")
        axes_list.append(parsed)
    exclude = _parse_exclude(doc.get("exclude"), source)
    save_doc = doc.get("save", False)
    if isinstance(save_doc, bool):
        save = [{}] if save_doc else []
    else:
        save = _parse_exclude(save_doc, source, "save")
    if overrides:
        settings = {**settings, **overrides}
        axes_list = [{k: v for k, v in axes.items() if k not in overrides} for axes in axes_list]
    name = doc.get("name") or Path(source).stem
    return expand(models or recipe_models, settings, axes_list, exclude, name, data_dir, save)


def load_recipe(path: str | Path, models: list[str] | None = None, overrides: dict | None = None,
                data_dir: str | None = None) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    return parse_recipe_text(path.read_text(encoding="utf-8"), str(path), models, overrides, data_dir)


def parse_assignments(text: str, what: str, as_axes: bool) -> dict:
    """``"method=rtn,gptq wbits=3,4"`` -> ``{"method": ["rtn", "gptq"], "wbits": [3, 4]}`` (validated).

    With ``as_axes=False`` each key takes one value.  ``eval``, ``metrics`` and
    ``tasks`` always take one value (their comma-separated list), never an axis.
    """
    out: dict = {}
    for item in shlex.split(text):
        key, eq, value = item.partition("=")
        key = _canonical_key(key.strip().replace("-", "_"), what)
        if not eq or not key:
            raise RecipeError(f"{what}: '{item}' is not KEY=VALUE[,VALUE...]")
        if key not in VALIDATORS:
            raise RecipeError(f"{what}: {_unknown_key_message(key, VALIDATORS)}")
        if key in out:
            raise RecipeError(f"{what}: key '{key}' given twice")
        raw_values = value.split(",") if as_axes and key not in LIST_KEYS else [value]
        values: list = []
        for v in raw_values:
            parsed = parse_text_value(key, v)
            checked = _check_value(key, parsed, f"{what}: {key}")
            if checked not in values:
                values.append(checked)
        out[key] = values if as_axes else values[0]
    return out


def parse_grid(grid: str, models: list[str], overrides: dict | None = None, data_dir: str | None = None) -> Plan:
    """The ``--grid "method=rtn,gptq wbits=3,4,8 wgroup=0,128"`` shorthand (one cross)."""
    axes = parse_assignments(grid, "--grid", as_axes=True)
    if not axes:
        raise RecipeError("--grid: give at least one KEY=VALUES, e.g. --grid \"method=rtn,gptq wbits=4,8\"")
    overrides = overrides or {}
    axes = {k: v for k, v in axes.items() if k not in overrides}
    return expand(models, overrides, [axes], [], "grid", data_dir)


def describe_plan(plan: Plan) -> str:
    models = list(dict.fromkeys(r.model for r in plan.runs))
    return f"{len(plan.runs)} runs over {len(models)} model{'s' if len(models) != 1 else ''} ({', '.join(models)})"
