"""ptqlab's SmoothQuant and AWQ against llm-compressor's, on the trained testbed OPT (CPU).

    bash bench/compare_llmcompressor.sh            # everything: venv for llm-compressor, both tools, the table

The two tools live in two virtual environments (llm-compressor pins its own compressed-tensors and
transformers), so this file has four steps, each run by the driver with the right interpreter:

``prepare`` (ptqlab's venv)
    ptqlab's calibration windows (``calibration_windows(tok, "testbed", N, 512, seed 0)``) and the heldout
    token stream (``eval_tokens``) saved to ``WORK/data.pt``: both tools calibrate on these very windows and
    are scored on these very tokens.
``ptqlab`` (ptqlab's venv)
    ptqlab's rows through ``quantize_`` on those windows, scored by ``ptqlab.evaluate.perplexity``.
``llmc`` (llm-compressor's venv)
    ``oneshot`` with each recipe on a ``datasets.Dataset`` of those ``input_ids``; the model is scored in that
    venv, as llm-compressor left it (its own fake quantization of weights and activations), by ptqlab's
    ``evaluate.py`` loaded from its file (torch and tqdm only: none of ptqlab's other dependencies), and its
    weights are written with their quantization applied as a dense fp32 HF folder (``WORK/llmc/<row>``).
``dense`` (ptqlab's venv)
    each such folder loaded with transformers and scored by ptqlab (for W8A8 rows ptqlab's own per-token
    int8 activation quantization is put on the inputs: ``QuantConfig("rtn", act=QuantSpec(8))``): the
    cross-check that the two evaluations agree.

Rows go to ``--out`` (JSONL): tool, method, precision, heldout PPL, quantization time, and for llm-compressor
both PPLs (``ppl`` in its own venv, ``ppl_dense`` from the dense folder in ptqlab's).
OPT has no default mappings in llm-compressor 0.14 (its SmoothQuant registry falls back to Llama's
``input_layernorm``/``q_proj`` names, its AWQ registry to Llama's): the recipes pass ptqlab's ``MAPPINGS["opt"]``
written as llm-compressor mappings, anchored to the decoder layers (``re:.*final_layer_norm`` alone would
also match ``model.decoder.final_layer_norm``).
Two things of llm-compressor 0.14.0.1 / compressed-tensors 0.19.0 on this CPU model, both in the notes of
bench/README.md: its AWQModifier fails on a CPU-only torch (``pin_memory``; see
:func:`cpu_pin_memory_workaround`, and the driver records the unpatched error), and its fake per-token
dynamic activation quantization is per tensor for 2-D inputs (OPT's fc1/fc2 see ``[tokens, hidden]``), so for
W8A8 the comparable llm-compressor figure is ``ppl_dense`` (its weights, exact per-token A8).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

MODEL = "testbed-opt"
SEQLEN = 512
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# ptqlab's MAPPINGS["opt"] (ptqlab/models.py) as llm-compressor mappings, per decoder layer
SQ_MAPPINGS = [
    [["re:.*layers\\.\\d+\\.self_attn\\.q_proj$", "re:.*layers\\.\\d+\\.self_attn\\.k_proj$",
      "re:.*layers\\.\\d+\\.self_attn\\.v_proj$"], "re:.*layers\\.\\d+\\.self_attn_layer_norm$"],
    [["re:.*layers\\.\\d+\\.fc1$"], "re:.*layers\\.\\d+\\.final_layer_norm$"],
]
AWQ_MAPPINGS = [
    ("re:.*layers\\.\\d+\\.self_attn_layer_norm$",
     ["re:.*layers\\.\\d+\\.self_attn\\.q_proj$", "re:.*layers\\.\\d+\\.self_attn\\.k_proj$",
      "re:.*layers\\.\\d+\\.self_attn\\.v_proj$"]),
    ("re:.*layers\\.\\d+\\.self_attn\\.v_proj$", ["re:.*layers\\.\\d+\\.self_attn\\.out_proj$"]),
    ("re:.*layers\\.\\d+\\.final_layer_norm$", ["re:.*layers\\.\\d+\\.fc1$"]),
]
# AutoAWQ's OPT mapping also scales fc1 -> fc2 (ReLU commutes with a positive scale); ptqlab's has no such pair
AWQ_FC2_MAPPING = ("re:.*layers\\.\\d+\\.fc1$", ["re:.*layers\\.\\d+\\.fc2$"])

# precision label -> (weight bits, group size (0: per row), symmetric, activation bits)
PRECISIONS = {
    "W8A8": (8, 0, True, 8),
    "W4A16 g128 sym": (4, 128, True, 16),
    "W4A16 g128 asym": (4, 128, False, 16),
    "W3A16 g128 sym": (3, 128, True, 16),
}

# (method label, precision): the rows of each tool. A method is "<transform>+<weight method>".
PTQLAB_ROWS = [
    ("rtn", "W8A8"), ("gptq", "W8A8"), ("smoothquant+rtn", "W8A8"), ("smoothquant+gptq", "W8A8"),
    ("rtn", "W4A16 g128 sym"), ("gptq", "W4A16 g128 sym"), ("awq+rtn", "W4A16 g128 sym"),
    ("awq(no clip)+rtn", "W4A16 g128 sym"),
    ("rtn", "W4A16 g128 asym"), ("awq+rtn", "W4A16 g128 asym"), ("awq(no clip)+rtn", "W4A16 g128 asym"),
    ("rtn", "W3A16 g128 sym"), ("gptq", "W3A16 g128 sym"), ("awq+rtn", "W3A16 g128 sym"),
    ("awq(no clip)+rtn", "W3A16 g128 sym"),
]
LLMC_ROWS = [
    ("rtn", "W8A8"), ("gptq", "W8A8"), ("smoothquant+rtn", "W8A8"), ("smoothquant+gptq", "W8A8"),
    ("rtn", "W4A16 g128 sym"), ("gptq", "W4A16 g128 sym"), ("awq+rtn", "W4A16 g128 sym"),
    ("awq(duo off)+rtn", "W4A16 g128 sym"), ("awq(+fc1->fc2)+rtn", "W4A16 g128 sym"),
    ("rtn", "W4A16 g128 asym"), ("awq+rtn", "W4A16 g128 asym"), ("awq(duo off)+rtn", "W4A16 g128 asym"),
    ("rtn", "W3A16 g128 sym"), ("gptq", "W3A16 g128 sym"), ("awq+rtn", "W3A16 g128 sym"),
    ("awq(duo off)+rtn", "W3A16 g128 sym"),
]


def slug(method: str, precision: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in f"{method}_{precision}")
    return "-".join(p for p in keep.split("-") if p)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def env_info() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu": cpu_name(), "threads": torch.get_num_threads()}
    for pkg in ("llmcompressor", "compressed_tensors"):
        try:
            mod = __import__(pkg)
            info[pkg] = getattr(mod, "__version__", None) or _dist_version(pkg)
        except ImportError:
            pass
    return info


def _dist_version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg.replace("_", "-"))
    except PackageNotFoundError:
        return None


def emit(out: Path, row: dict) -> None:
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("tool", "method", "precision", "ppl", "quant_s") if k in row}), flush=True)


# ---------------------------------------------------------------------------------------------- ptqlab's venv
def step_prepare(a) -> None:
    from ptqlab.data import calibration_windows, eval_tokens, load_text
    from ptqlab.models import load_model
    from ptqlab.testbed import resolve_model_path

    _, tok = load_model(MODEL, torch.float32)
    windows, source = calibration_windows(tok, "testbed", a.nsamples, SEQLEN, a.seed)
    tokens = eval_tokens(tok, load_text("heldout", "eval"), SEQLEN)
    a.work.mkdir(parents=True, exist_ok=True)
    torch.save({"windows": windows, "heldout": tokens, "calib_source": source, "seed": a.seed,
                "model_path": str(resolve_model_path(MODEL))}, a.work / "data.pt")
    print(f"calibration {tuple(windows.shape)} from {source}; heldout {tokens.numel()} tokens "
          f"({tokens.numel() // SEQLEN} windows of {SEQLEN})")


def ptqlab_config(method: str, precision: str):
    from ptqlab import QuantConfig, QuantSpec
    from ptqlab.transforms.awq import AWQOptions

    wbits, group, sym, abits = PRECISIONS[precision]
    transform, _, base = method.rpartition("+")
    options = {}
    if transform.startswith("awq"):
        options["awq"] = AWQOptions(clip="no clip" not in transform)
        transform = "awq"
    return QuantConfig(base, QuantSpec(wbits, sym, group), act=QuantSpec(abits), transform=transform or "none",
                       options=options)


def step_ptqlab(a) -> None:
    from ptqlab import quantize_
    from ptqlab.evaluate import perplexity
    from ptqlab.models import load_model

    data = torch.load(a.work / "data.pt")
    env = env_info()
    rows = [("fp32", "FP32")] + PTQLAB_ROWS
    for method, precision in rows:
        model, _ = load_model(MODEL, torch.float32)
        config = ptqlab_config(method, precision) if method != "fp32" else None
        t0 = time.perf_counter()
        if config is not None:
            # windows only where the run uses them (given to plain RTN, ptqlab would also log per-layer errors)
            calib = data["windows"] if config.needs_calibration else None
            quantize_(model, config, calibration=calib, progress=False)
        quant_s = time.perf_counter() - t0
        ppl = perplexity(model, data["heldout"], SEQLEN, "cpu", progress=False)
        described = {"config": config.name(), "options": config.options.as_dicts().get(config.transform)} if config \
            else {"config": "fp32"}
        emit(a.out, {"tool": "ptqlab", "method": method, "precision": precision, "ppl": round(ppl, 4),
                     "quant_s": round(quant_s, 2), "nsamples": int(data["windows"].shape[0]), "seqlen": SEQLEN,
                     "eval": "heldout", **described, **env})


def step_dense(a) -> None:
    """The llm-compressor folders, loaded and scored in ptqlab's venv (W8A8: ptqlab's A8 on the inputs)."""
    from transformers import AutoModelForCausalLM

    from ptqlab import QuantConfig, QuantSpec, quantize_
    from ptqlab.evaluate import perplexity

    data = torch.load(a.work / "data.pt")
    for line in (a.work / "llmc_rows.jsonl").read_text().splitlines():
        row = json.loads(line)
        if not row.get("folder"):
            continue
        model = AutoModelForCausalLM.from_pretrained(row["folder"], dtype=torch.float32).eval()
        model.config.use_cache = False
        if PRECISIONS.get(row["precision"], (0, 0, 0, 16))[3] == 8:
            quantize_(model, QuantConfig("rtn", act=QuantSpec(8)), progress=False)
        row["ppl_dense"] = round(perplexity(model, data["heldout"], SEQLEN, "cpu", progress=False), 4)
        row.pop("folder")
        emit(a.out, row)


# ---------------------------------------------------------------------------------------- llm-compressor's venv
def ptqlab_evaluator():
    """ptqlab's evaluate.py, loaded from its file (it imports torch and tqdm only)."""
    spec = importlib.util.spec_from_file_location("ptqlab_evaluate", ROOT / "ptqlab" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llmc_recipe(method: str, precision: str) -> list:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    wbits, group, sym, abits = PRECISIONS[precision]
    weights = QuantizationArgs(num_bits=wbits, type="int", symmetric=sym,
                               strategy="group" if group else "channel", group_size=group or None)
    acts = (QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
            if abits == 8 else None)
    scheme = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)}
    transform, _, base = method.rpartition("+")
    recipe: list = []
    if transform == "smoothquant":
        recipe.append(SmoothQuantModifier(smoothing_strength=0.5, mappings=SQ_MAPPINGS))
    elif transform.startswith("awq"):
        from llmcompressor.modifiers.transform.awq import AWQMapping

        mappings = [AWQMapping(s, b) for s, b in AWQ_MAPPINGS + ([AWQ_FC2_MAPPING] if "fc2" in transform else [])]
        recipe.append(AWQModifier(mappings=mappings, duo_scaling="duo off" not in transform))
    elif transform:
        raise ValueError(f"unknown transform in {method}")
    if base == "gptq":
        # ptqlab's GPTQ defaults: block 128, 1% dampening, no act-order
        recipe.append(GPTQModifier(config_groups=scheme, ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                                   actorder=None))
    else:
        recipe.append(QuantizationModifier(config_groups=scheme, ignore=["lm_head"]))
    return recipe


@torch.no_grad()
def save_dense(model, path: Path, model_path: str) -> None:
    """The model's weights with llm-compressor's quantization applied, in a plain fp32 HF folder."""
    from compressed_tensors.quantization import forward_quantize
    from transformers import AutoModelForCausalLM

    state = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None:
            state[f"{name}.weight"] = forward_quantize(module, module.weight, "weight", scheme.weights).float()
    dense = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    own = model.state_dict()
    full = {k: state.get(k, own[k]).float() for k in dense.state_dict()}
    dense.load_state_dict(full, strict=True)
    dense.save_pretrained(path, safe_serialization=True)


def cpu_pin_memory_workaround() -> bool:
    """llm-compressor 0.14.0.1's AWQModifier pins its cached block inputs before each grid search
    (``IntermediatesCache.pin_memory`` -> ``Tensor.pin_memory()``), which on a CPU-only torch raises
    "RuntimeError: Cannot access accelerator device when none is available.". Pinning only speeds host ->
    device copies, so without an accelerator it is made a no-op; nothing else of the algorithm changes."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        return False
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return True


def step_llmc(a) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    patched = False if a.no_workaround else cpu_pin_memory_workaround()

    evaluate = ptqlab_evaluator()
    data = torch.load(a.work / "data.pt")
    windows, heldout, model_path = data["windows"], data["heldout"], data["model_path"]
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    env = env_info()
    rows_file = a.work / "llmc_rows.jsonl"
    only = set(a.only.split(",")) if a.only else None
    if not only:
        rows_file.unlink(missing_ok=True)
    for method, precision in [("fp32", "FP32")] + LLMC_ROWS:
        name = slug(method, precision)
        if only and name not in only:
            continue
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        model.config.use_cache = False
        row = {"tool": "llm-compressor", "method": method, "precision": precision, "nsamples": len(ds),
               "seqlen": SEQLEN, "eval": "heldout", "cpu_pin_memory_noop": patched, **env}
        t0 = time.perf_counter()
        try:
            if method != "fp32":
                oneshot(model=model, dataset=ds, recipe=llmc_recipe(method, precision), num_calibration_samples=len(ds),
                        max_seq_length=SEQLEN, shuffle_calibration_samples=False, batch_size=1,
                        output_dir=None, log_dir=None)
        except Exception as err:  # a failed row is recorded with its error, the others still run
            row.update(error=f"{type(err).__name__}: {err}"[:2000], quant_s=round(time.perf_counter() - t0, 2))
            emit(a.out, row)
            continue
        row["quant_s"] = round(time.perf_counter() - t0, 2)
        row["ppl"] = round(evaluate.perplexity(model, heldout, SEQLEN, "cpu", progress=False), 4)
        folder = a.work / "llmc" / name
        save_dense(model, folder, model_path)
        row["folder"] = str(folder)
        with rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("method", "precision", "ppl", "quant_s")}), flush=True)


# ---------------------------------------------------------------------------------------------------- the table
def step_table(a) -> None:
    """The Markdown table of ``--out``: one line per (precision, method), both tools side by side."""
    rows = [json.loads(line) for line in a.out.read_text().splitlines() if line.strip()]
    by: dict = {}
    for r in rows:
        key = "llm-compressor (no workaround)" if r.get("cpu_pin_memory_noop") is False and "error" in r else r["tool"]
        by.setdefault((r["precision"], r["method"]), {})[key] = r
    order = ["FP32"] + list(PRECISIONS)
    print("| precision | method | ptqlab | llm-compressor, own eval | llm-compressor weights, ptqlab eval "
          "| ptqlab s | llm-compressor s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    first = {key: i for i, key in enumerate(by)}  # within a precision, rows in the order they were run
    for (precision, method), tools in sorted(by.items(), key=lambda kv: (order.index(kv[0][0]), first[kv[0]])):
        p, c = tools.get("ptqlab"), tools.get("llm-compressor")
        own = dense = "—"
        if c and "error" in c:
            own = "error: " + c["error"][:90]
        elif c:
            own = f"{c['ppl']:.3f}"
            dense = f"{c['ppl_dense']:.3f}" if "ppl_dense" in c else "—"
        cells = [precision, method, f"{p['ppl']:.3f}" if p else "—", own, dense,
                 f"{p['quant_s']:.0f}" if p else "—", f"{c['quant_s']:.0f}" if c else "—"]
        print("| " + " | ".join(cells) + " |")
        if "llm-compressor (no workaround)" in tools:
            err = tools["llm-compressor (no workaround)"]["error"]
            print(f"| {precision} | {method}, llm-compressor as shipped | — | error: {err[:90]} | — | — | — |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["prepare", "ptqlab", "llmc", "dense", "table"])
    p.add_argument("--work", type=Path, default=Path(os.environ.get("LLMC_WORK", "/tmp/llmc_compare")))
    p.add_argument("--out", type=Path, default=HERE / "results" / "llmcompressor_compare_cpu.jsonl")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="llmc step: comma-separated row slugs (debugging)")
    p.add_argument("--no-workaround", action="store_true",
                   help="llmc step: leave llm-compressor's CPU pin_memory call as it is (AWQ then fails on CPU)")
    a = p.parse_args()
    {"prepare": step_prepare, "ptqlab": step_ptqlab, "llmc": step_llmc, "dense": step_dense,
     "table": step_table}[a.step](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
