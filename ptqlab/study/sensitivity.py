"""Per-layer sensitivity: quantize one part of the model with RTN, keep the rest in full precision.

Granularities (``--granularity``):

* ``module``: one module *type* in every block at once, by its name inside
  the block (``self_attn.q_proj``, ``fc1``, ``mlp.dense_4h_to_h`` ...);
* ``block``: every linear layer of one decoder block;
* ``layer``: one linear layer of one block (``3:self_attn.q_proj``), the
  finest map (blocks x module types).

Each target is one run in the study store (``kind = 'sensitivity'``), keyed
like the other runs by ``config_hash`` of its run dict, and compared with
the model's FP16 baseline run (shared with the other studies in the DB).
"""

from __future__ import annotations

import time

import torch

from ..config import config_hash
from ..evaluate import perplexity
from ..experiment import ModelSession, versions
from ..methods import rtn_quantize
from ..models import ModelAdapter, get_adapter, wrap_linears
from ..quantizers import QuantizationError, QuantSpec, storage_bits_per_weight
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


def selects(granularity: str, target: str, block_index: int, name: str) -> bool:
    if granularity == "module":
        return name == target
    if granularity == "block":
        return str(block_index) == target
    index, _, module = target.partition(":")
    return str(block_index) == index and name == module


def sensitivity_spec(model: str, granularity: str, target: str, wbits: int = 4, wgroup: int = 0, wsym: bool = True,
                     abits: int = 16, agroup: int = 0, asym: bool = True, seqlen: int | None = None,
                     eval: list[str] | None = None, max_eval_windows: int | None = None,
                     dtype: str = "auto") -> dict:
    """The canonical run dict of one sensitivity run (16-bit parts drop their group/symmetry)."""
    if wbits == 16 and abits == 16:
        raise RecipeError("sensitivity needs --wbits or --abits below 16")
    QuantSpec(wbits, wsym, wgroup), QuantSpec(abits, asym, agroup)  # validate
    if wbits == 16:
        wgroup, wsym = 0, True
    if abits == 16:
        agroup, asym = 0, True
    return {"kind": "sensitivity", "model": model, "granularity": granularity, "target": target, "method": "rtn",
            "wbits": wbits, "wgroup": wgroup, "wsym": wsym, "abits": abits, "agroup": agroup, "asym": asym,
            "seqlen": seqlen, "eval": list(eval or DEFAULTS["eval"]), "max_eval_windows": max_eval_windows,
            "dtype": dtype}


def plan_sensitivity(model: str, granularity: str, precisions: list[dict], eval_settings: dict) -> list[PlannedRun]:
    """The FP16 baseline, then one run per (precision, target)."""
    base = baseline_spec(model, eval_settings)
    runs = [PlannedRun(base, run_key(base))]
    for precision in precisions:
        for target in targets(model, granularity):
            spec = sensitivity_spec(model, granularity, target, **precision,
                                    **{k: eval_settings[k] for k in EVAL_KEYS})
            runs.append(PlannedRun(spec, run_key(spec)))
    return runs


@torch.no_grad()
def run_sensitivity(spec: dict, session: ModelSession, progress: bool = False) -> dict:
    """Quantize the spec's target with RTN (the rest stays full precision); the run's record."""
    start = time.perf_counter()
    seqlen = session.seqlen(spec["seqlen"])
    eval_data = {name: session.eval_tokens(name, seqlen) for name in spec["eval"]}
    wspec = QuantSpec(spec["wbits"], spec["wsym"], spec["wgroup"])
    aspec = QuantSpec(spec["abits"], spec["asym"], spec["agroup"])

    model = session.fresh_model()
    t0 = time.perf_counter()
    adapter = get_adapter(model)
    layers, all_linears = [], []
    for index, block in enumerate(adapter.blocks):
        for name, layer in wrap_linears(block, prefix=f"blocks.{index}.").items():
            all_linears.append(layer)
            if not selects(spec["granularity"], spec["target"], index, name):
                continue
            original = layer.weight.data.clone()
            if wspec.enabled:
                layer.weight.data.copy_(rtn_quantize(layer.weight.data, wspec, layer.name))
            layer.weight_spec = wspec
            layer.act_spec = aspec
            err = (original.float() - layer.weight.float()).norm() / original.float().norm().clamp(min=1e-30)
            layers.append({"layer": layer.name, "out": layer.out_features, "in": layer.in_features,
                           "rel_weight_error": float(err)})
    if not layers:
        raise QuantizationError(f"{spec['granularity']} '{spec['target']}' matches no linear layer of {spec['model']}")
    quant_time = time.perf_counter() - t0
    total_bits = sum(storage_bits_per_weight(m.weight_spec, m.in_features, m.out_features) * m.in_features
                     * m.out_features for m in all_linears)
    total_weights = sum(m.in_features * m.out_features for m in all_linears)

    model.to(session.device)
    t0 = time.perf_counter()
    ppl = {name: perplexity(model, tokens, seqlen, session.device, spec["max_eval_windows"], f"eval {name}", progress)
           for name, (tokens, _) in eval_data.items()}
    eval_time = time.perf_counter() - t0
    del model

    config = dict(spec)
    config["seqlen"] = seqlen
    config["dtype"] = str(session.dtype).replace("torch.", "")
    return {
        "config": config,
        "config_hash": config_hash(config),
        "name": f"rtn {spec['granularity']}={spec['target']} W{wspec.bits}A{aspec.bits}",
        "ppl": ppl,
        "bits_per_weight": total_bits / max(total_weights, 1),
        "time_s": time.perf_counter() - start,
        "timings": {"load": session.load_time, "quantize": quant_time, "eval": eval_time},
        "data_sources": {name: src for name, (_, src) in eval_data.items()},
        "layers": layers,
        "versions": versions(session.device),
    }
