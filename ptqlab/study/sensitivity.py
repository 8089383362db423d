"""Per-layer sensitivity: quantize one part of the model with RTN, keep the rest in full precision.

Granularities (``--granularity``):

* ``module``: one module *type* in every block at once, by its name inside
  the block (``self_attn.q_proj``, ``fc1``, ``mlp.dense_4h_to_h`` ...);
* ``block``: every linear layer of one decoder block;
* ``layer``: one linear layer of one block (``3:self_attn.q_proj``), the
  finest map (blocks x module types).

Each target is one run in the study store (``kind = 'sensitivity'``): an
ordinary RTN run whose config's layer filter (``layers: module:fc1``,
``block:3``, ``layer:3:fc1``) keeps the rest in full precision, executed by
:func:`ptqlab.experiment.run` like any other run and compared with the
model's FP16 baseline run (shared with the other studies in the DB).  This
module only plans and names the targets.
"""

from __future__ import annotations

import torch

from ..config import from_flat
from ..models import ModelAdapter, get_adapter
from .recipe import DEFAULTS, EVAL_KEYS, PlannedRun, RecipeError, baseline_spec, run_key

GRANULARITIES = ("module", "block", "layer")


def model_structure(model: str) -> tuple[int, list[str]]:
    """``(number of blocks, linear names inside a block in forward order)``, without loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..testbed import resolve_model_path

    path = resolve_model_path(model)
    try:
        cfg = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(f"could not read the config of model '{model}': {err}") from err
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    adapter = get_adapter(skeleton)
    names: list[str] = []
    for block in adapter.blocks:
        for name in ModelAdapter.linear_layers(block):
            if name not in names:
                names.append(name)
    return len(adapter.blocks), names


def targets(model: str, granularity: str) -> list[str]:
    n_blocks, names = model_structure(model)
    if granularity == "module":
        return names
    if granularity == "block":
        return [str(i) for i in range(n_blocks)]
    if granularity == "layer":
        return [f"{i}:{name}" for i in range(n_blocks) for name in names]
    raise RecipeError(f"unknown granularity '{granularity}'; choose from {', '.join(GRANULARITIES)}")


def sensitivity_spec(model: str, granularity: str, target: str, wbits: int = 4, wgroup: int = 0, wsym: bool = True,
                     abits: int = 16, agroup: int = 0, act_sym: bool = True, seqlen: int | None = None,
                     eval: list[str] | None = None, max_eval_windows: int | None = None,
                     dtype: str = "auto", **evaluation: object) -> dict:
    """The run dict of one sensitivity run: RTN with a layer filter (an ordinary run of the config);
    ``evaluation``: the other evaluation keys (metrics, tasks, ...: recipe.EVAL_KEYS)."""
    if wbits == 16 and abits == 16:
        raise RecipeError("sensitivity needs --wbits or --abits below 16")
    flat = {"model": model, "method": "rtn", "wbits": wbits, "wgroup": wgroup, "wsym": wsym, "abits": abits,
            "agroup": agroup, "act_sym": act_sym, "layers": f"{granularity}:{target}", "seqlen": seqlen,
            "eval": list(eval or DEFAULTS["eval"]), "max_eval_windows": max_eval_windows, "dtype": dtype,
            **evaluation}
    return {"kind": "sensitivity", **from_flat(flat).to_flat()}


def plan_sensitivity(model: str, granularity: str, precisions: list[dict], eval_settings: dict,
                     data_dir: str | None = None) -> list[PlannedRun]:
    """The FP16 baseline, then one run per (precision, target)."""
    base = baseline_spec(model, eval_settings)
    runs = [PlannedRun(base, run_key(base, data_dir))]
    for precision in precisions:
        for target in targets(model, granularity):
            spec = sensitivity_spec(model, granularity, target, **precision,
                                    **{k: eval_settings.get(k, DEFAULTS[k]) for k in EVAL_KEYS})
            runs.append(PlannedRun(spec, run_key(spec, data_dir)))
    return runs
