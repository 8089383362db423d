"""Save a ptqlab-quantized model as a Hugging Face folder in the compressed-tensors format.

Each quantized linear is written by compressed-tensors' own compressor for its
format (``pack-quantized`` for weight-only and sub-8-bit weights, ``int-quantized``
for 8-bit weights with quantized activations; ``float-quantized``, ``mxfp4-pack-quantized``
and ``nvfp4-pack-quantized`` for the float formats, ``float_formats.py``), from ptqlab's exact codes:
the compressor's output is checked to hold those codes before anything is written.
The activation spec becomes dynamic ``input_activations`` (per token, token groups
or per tensor). LoRC factors go beside the model as a PEFT LoRA adapter
(``adapter.py``). Everything is written into a temporary folder that is renamed
to the destination at the end, so an interrupted save leaves nothing there.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import sha256_file
from ..models import QuantLinear, get_adapter
from ..quantizers import PER_ROW, PER_TENSOR, QuantizationError, QuantSpec, weight_codes
from . import float_formats
from .adapter import write_adapter
from .layout import ADAPTER_DIR, PTQLAB_CONFIG_KEY
from .pack import pack_codes, pack_zero_points, to_signed

FORMAT_VERSION = 1


class ExportError(QuantizationError):
    """A model or spec that cannot be saved in the compressed-tensors format (the message says what)."""


@dataclass(frozen=True)
class _Scheme:
    weight: QuantSpec
    act: QuantSpec


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """The model's QuantLinears whose weights are quantized, by module name (the names in the checkpoint)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.weight_spec.enabled}


def _check_exportable(model: nn.Module) -> dict[str, QuantLinear]:
    if getattr(getattr(model, "config", None), "model_type", None) == "gpt2":
        raise ExportError("GPT-2's Conv1D layers store transposed weights; compressed-tensors packs nn.Linear "
                          "weights only, so GPT-2 models cannot be saved quantized")
    rotated = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_rotation]
    if rotated:
        raise ExportError(f"{rotated[0]} rotates its input online ({model.get_submodule(rotated[0]).input_rotation}, "
                          f"the rotation transform's MLP rotation): checkpoints do not carry it yet, and without it "
                          f"the saved weights compute something else; rotate with --no-rotate-online to save")
    head = get_adapter(model).lm_head
    if getattr(head, "bias", None) is not None and hasattr(head, "original") and getattr(head.original, "bias", 1) is None:
        raise ExportError(f"the LM head has a bias (a transform folded the final LayerNorm into it) that "
                          f"{model.config.model_type} checkpoints cannot hold")
    act_only = [n for n, m in model.named_modules()
                if isinstance(m, QuantLinear) and not m.weight_spec.enabled and m.act_spec.enabled]
    if act_only:
        bits = model.get_submodule(act_only[0]).act_spec.bits
        raise ExportError(f"{act_only[0]} quantizes its input but not its weight (W16A{bits}): compressed-tensors "
                          f"has no integer activation-only scheme that transformers or vLLM run")
    layers = quantized_linears(model)
    if not layers:
        raise ExportError("the model has no quantized weights (an FP16 run or an unquantized model): there is "
                          "nothing to save in a quantized format; use model.save_pretrained for a dense model")
    for name, layer in layers.items():
        if getattr(layer, "weight_scale", None) is None or getattr(layer, "weight_zero", None) is None:
            raise ExportError(f"{name}: the layer has no weight_scale/weight_zero (was it quantized by ptqlab's "
                              f"pipeline?); its integer codes cannot be recovered")
    return layers


def _weight_args(spec: QuantSpec):
    from compressed_tensors.quantization import QuantizationArgs

    if spec.is_float:
        return float_formats.weight_args(spec)
    if spec.group_size == PER_TENSOR:
        return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="tensor")
    if spec.group_size == PER_ROW:
        return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="channel")
    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="group",
                            group_size=spec.group_size)


def _act_args(spec: QuantSpec):
    """ptqlab's dynamic input quantization as compressed-tensors args (None when activations stay in float)."""
    from compressed_tensors.quantization import QuantizationArgs

    if not spec.enabled:
        return None
    if spec.is_float:
        return float_formats.act_args(spec)
    common = dict(num_bits=spec.bits, type="int", symmetric=spec.symmetric, dynamic=True)
    if spec.group_size == PER_ROW:
        return QuantizationArgs(strategy="token", **common)
    if spec.group_size == PER_TENSOR:
        return QuantizationArgs(strategy="tensor", **common)
    return QuantizationArgs(strategy="group", group_size=spec.group_size, **common)


def format_for(weight: QuantSpec, act: QuantSpec) -> str:
    """The compressed-tensors format a (weight, activation) spec is stored in."""
    if not weight.enabled:
        raise ExportError(f"weights {weight.describe()} are not quantized: no compressed-tensors format applies")
    reason = float_formats.exportable_reason(weight, act)
    if reason:
        raise ExportError(f"compressed-tensors cannot carry weights {weight.describe()} with activations "
                          f"{act.describe()}: {reason}")
    if weight.is_float:
        return float_formats.FLOAT_FORMATS[weight.fmt]
    return "int-quantized" if weight.bits == 8 and act.enabled else "pack-quantized"


def scheme_for(weight: QuantSpec, act: QuantSpec, targets: list[str]):
    """The compressed-tensors ``QuantizationScheme`` for one (weight, activation) spec."""
    from compressed_tensors.quantization import QuantizationScheme

    fmt = format_for(weight, act)  # a pair no format carries: ExportError with what is allowed
    try:
        return QuantizationScheme(targets=targets, weights=_weight_args(weight), input_activations=_act_args(act),
                                  format=fmt)
    except (ValueError, NotImplementedError) as err:  # pydantic validation errors are ValueErrors
        raise ExportError(f"compressed-tensors cannot express weights {weight.describe()} with activations "
                          f"{act.describe()}: {err}") from err


def layer_codes(name: str, layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes uint8 [out, in], scale fp32 [out, G], zero fp32 [out, G])`` of a quantized layer.

    The codes are the nearest grid points of the stored weight. Every solve
    writes ``((code - zero) * scale)`` computed in float32 and cast to the model
    dtype, so rounding the stored weight back onto the grid gives codes whose
    decoding, cast the same way, is the stored weight bit for bit (in bf16 at 8
    bits two codes can share one bf16 value; either then reproduces it). That
    equality is checked for every weight: a model saved is the model measured,
    and a layer whose qparams do not describe its weight is refused.
    """
    spec = layer.weight_spec
    stored = layer.weight.detach().cpu()
    w = stored.float()
    scale = layer.weight_scale.detach().float().cpu()
    zero = layer.weight_zero.detach().float().cpu()
    out_f, in_f = w.shape
    groups = in_f // spec.group_size if spec.group_size > 0 else 1
    if scale.shape != (out_f, groups) or zero.shape != (out_f, groups):
        raise ExportError(f"{name}: weight_scale {tuple(scale.shape)} / weight_zero {tuple(zero.shape)} do not fit "
                          f"a {out_f}x{in_f} weight with {spec.describe()} (expected {(out_f, groups)})")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ExportError(f"{name}: weight_scale holds zero, negative or non-finite values")
    if spec.group_size == PER_TENSOR and not (bool((scale == scale[0, 0]).all()) and bool((zero == zero[0, 0]).all())):
        raise ExportError(f"{name}: a per-tensor spec with different scales per row")
    s = scale.repeat_interleave(in_f // groups, dim=1)
    z = zero.repeat_interleave(in_f // groups, dim=1)
    codes = weight_codes(w, scale, zero, spec).float()
    decoded = (codes - z) * s
    mismatch = decoded.to(stored.dtype) != stored
    if bool(mismatch.any()):
        off_grid = torch.where(mismatch, (decoded - w).abs() / s, torch.zeros_like(w))
        row, col = divmod(int(off_grid.argmax()), in_f)
        dtype = str(stored.dtype).replace("torch.", "")
        raise ExportError(f"{name}: weight [{row}, {col}] = {float(w[row, col]):.6g} is not on the grid of its "
                          f"weight_scale/weight_zero ({float(off_grid.max()):.3g} steps off, {int(mismatch.sum())} "
                          f"weights differ from their {dtype} grid value): the layer's qparams do not describe its "
                          f"weight")
    return (codes if spec.is_float else codes.to(torch.uint8)), scale, zero


def _scale_tensor(name: str, scale: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    stored = (scale[:1, 0] if spec.group_size == PER_TENSOR else scale).to(dtype)
    if not bool(torch.isfinite(stored).all()) or not bool((stored > 0).all()):
        raise ExportError(f"{name}: a weight scale does not fit {str(dtype).replace('torch.', '')} "
                          f"(range {float(scale.min()):.3g}..{float(scale.max()):.3g}); save with another scale dtype")
    return stored.contiguous()


def scale_dtype_for(layers: dict[str, QuantLinear]) -> torch.dtype:
    """fp16 when every scale is exactly an fp16 number, else float32: the saved model is then exactly the
    measured one. (Rounding float32 scales to fp16 moves each weight by up to 2**-11 of itself; measured on
    testbed-opt W8A8 that moves the PPL by 0.1-0.4%, beyond the reload check's 0.1%.)"""
    # mxfp4/nvfp4 store their scales in their own dtypes (E8M0, E4M3): only integer and fp8 layers read this
    exact = all(torch.equal(m.weight_scale.float().half().float(), m.weight_scale.float()) for m in layers.values()
                if m.weight_spec.fmt in ("int", "fp8"))
    return torch.float16 if exact else torch.float32


def compress_layer(name: str, layer: QuantLinear, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for one quantized linear (local names: ``weight_packed``, ...).

    Written by compressed-tensors' own compressor for the format, from weights
    rebuilt out of ptqlab's codes and the stored (rounded) scales, then checked
    against ptqlab's codes.
    """
    from compressed_tensors.compressors.base import BaseCompressor

    spec, act = layer.weight_spec, layer.act_spec
    scheme = scheme_for(spec, act, [name])
    codes, scale, zero = layer_codes(name, layer)
    if spec.is_float:
        out = float_formats.compress_float_layer(name, spec, codes, scale, scheme, scale_dtype, ExportError)
        if layer.bias is not None:
            out["bias"] = layer.bias.detach()
        return {k: v.contiguous() for k, v in out.items()}
    stored_scale = _scale_tensor(name, scale, spec, scale_dtype)
    groups = scale.shape[1]
    s_full = stored_scale.float().reshape(-1, 1 if spec.group_size == PER_TENSOR else groups)
    s_full = s_full.expand(codes.shape[0], groups).repeat_interleave(codes.shape[1] // groups, dim=1)
    z_full = zero.repeat_interleave(codes.shape[1] // groups, dim=1)
    state = {"weight": (codes.float() - z_full) * s_full, "weight_scale": stored_scale}
    if not spec.symmetric:
        zp = to_signed(zero, spec.bits)
        state["weight_zero_point"] = zp[:1, 0].contiguous() if spec.group_size == PER_TENSOR else zp
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    out = dict(compressor.compress(state, scheme))
    # The format's compressor re-rounds the weights; it must land on ptqlab's codes exactly.
    if scheme.format == "pack-quantized":
        same = torch.equal(out["weight_packed"], pack_codes(codes, spec.bits))
        if not spec.symmetric and spec.group_size != PER_TENSOR:
            same = same and torch.equal(out["weight_zero_point"], pack_zero_points(zero, spec.bits))
    else:
        same = torch.equal(out["weight"], to_signed(codes, spec.bits))
    if not same:
        raise ExportError(f"{name}: compressed-tensors' {scheme.format} compressor did not reproduce ptqlab's codes")
    if layer.bias is not None:
        out["bias"] = layer.bias.detach()
    return {k: v.contiguous() for k, v in out.items()}


def weight_tensor_names(format_name: str, symmetric: bool) -> tuple[str, ...]:
    """The local names of a quantized linear's weight tensors in a format (what ``stored_bits_per_weight`` counts)."""
    if format_name in float_formats.FLOAT_FORMATS.values():
        return float_formats.weight_tensor_names(format_name)
    names = ("weight_packed", "weight_scale", "weight_shape") if format_name == "pack-quantized" else (
        "weight", "weight_scale")
    return names if symmetric else (*names, "weight_zero_point")


def _stored_weight_bytes(layer: QuantLinear, scale_bytes: int) -> int:
    """Bytes of one quantized linear's weight tensors on disk (bias excluded, as in ``bits_per_weight``)."""
    spec = layer.weight_spec
    out_f, in_f = layer.out_features, layer.in_features
    if spec.is_float:
        return float_formats.stored_weight_bytes(spec, out_f, in_f, scale_bytes)
    n_scales = 1 if spec.group_size == PER_TENSOR else out_f * (in_f // spec.group_size if spec.group_size > 0 else 1)
    fmt = format_for(spec, layer.act_spec)
    total = n_scales * scale_bytes
    if fmt == "pack-quantized":
        total += out_f * math.ceil(in_f * spec.bits / 32) * 4 + 2 * 8  # weight_shape: two int64
        if not spec.symmetric:
            groups = n_scales // out_f if spec.group_size != PER_TENSOR else 0
            total += math.ceil(out_f * spec.bits / 32) * 4 * groups if groups else 1
    else:
        total += out_f * in_f  # int8
        if not spec.symmetric:
            total += n_scales  # int8 zero points
    return total


def _adapter_bytes(layer: QuantLinear) -> int:
    """Bytes of a layer's LoRC factors in the adapter (stored in the model's dtype, as measured)."""
    if layer.lorc_u is None:
        return 0
    return (layer.lorc_u.numel() + layer.lorc_v.numel()) * layer.lorc_u.element_size()


def stored_bits_per_weight(model: nn.Module) -> float | None:
    """Bits per weight the quantized linears take on disk once saved (codes, scales, zero points, the LoRC
    adapter in the model's dtype), from the tensor shapes; ``None`` when the model cannot be saved quantized."""
    try:
        layers = _check_exportable(model)
    except ExportError:
        return None
    params = sum(m.out_features * m.in_features for m in layers.values())
    scale_bytes = torch.finfo(scale_dtype_for(layers)).bits // 8
    stored = sum(_stored_weight_bytes(m, scale_bytes) + _adapter_bytes(m) for m in layers.values())
    return 8 * stored / params


def _config_groups(layers: dict[str, QuantLinear], model: nn.Module) -> tuple[dict, list[str]]:
    """Layers grouped by spec. One spec: target the class ``Linear`` and ignore the other linears (what
    llm-compressor writes and every reader handles); several: target module names."""
    by_scheme: dict[_Scheme, list[str]] = {}
    for name, layer in layers.items():
        by_scheme.setdefault(_Scheme(layer.weight_spec, layer.act_spec), []).append(name)
    if len(by_scheme) == 1:
        (key, _), = by_scheme.items()
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | QuantLinear) and n not in layers]
        return {"group_0": scheme_for(key.weight, key.act, ["Linear"])}, ignore
    groups = {f"group_{i}": scheme_for(key.weight, key.act, names) for i, (key, names) in enumerate(by_scheme.items())}
    return groups, []


def _float_state(model: nn.Module, layers: dict[str, QuantLinear], dtype: torch.dtype,
                 keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor outside the quantized linears' weights (of those ``keep`` accepts), in the save dtype; tied
    weights (embeddings and LM head) once, as transformers stores them."""
    skip = {f"{n}.{p}" for n in layers for p in ("weight", "bias", "lorc_u", "lorc_v")}
    skip |= {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, QuantLinear) for p in ("lorc_u", "lorc_v")}
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for key, value in model.state_dict().items():
        if key in skip or (keep is not None and not keep(key)):
            continue
        if value.is_floating_point() and value.numel() and value.data_ptr() in seen:
            if not getattr(model.config, "tie_word_embeddings", False):
                raise ExportError(f"{key} and {seen[value.data_ptr()]} share memory but the config does not tie them")
            continue
        seen[value.data_ptr()] = key
        value = value.detach().cpu()
        if value.is_floating_point():
            cast = value.to(dtype)
            if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(value).all()):
                raise ExportError(f"{key} does not fit {dtype} (values up to {float(value.abs().max()):.3g})")
            value = cast
        out[key] = value
    return out


def _save_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model was measured in: its float tensors are saved as they are, never rounded."""
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ExportError(f"the model's parameters are {dtype}; save a float32, float16 or bfloat16 model")
    return dtype


def _write_config(folder: Path, model: nn.Module, qconfig, dtype: torch.dtype, ptqlab_entry: dict) -> None:
    from compressed_tensors.compressors import ModelCompressor

    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.use_cache = True
    config.save_pretrained(folder)
    ModelCompressor(quantization_config=qconfig).update_config(str(folder))
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data[PTQLAB_CONFIG_KEY] = ptqlab_entry
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))


# Left out of the record saved in config.json: the per-layer error log (megabytes for large models; it stays in
# the run's JSONL record), wall-clock times and peak memory, which differ between two runs of one command, so that saving the
# same run twice writes the same bytes.
_NOT_SAVED = ("layers", "time_s", "timings", "memory")


def file_digests(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``folder`` except config.json (which holds the digests)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files if p.relative_to(folder) != Path("config.json")}


def _ptqlab_entry(layers: dict[str, QuantLinear], record: dict | None) -> dict:
    entry: dict = {"format_version": FORMAT_VERSION}
    if record is not None:
        entry["record"] = {k: v for k, v in record.items() if k not in _NOT_SAVED}
    ranks = {n: m.lorc_u.shape[1] for n, m in layers.items() if m.lorc_u is not None}
    if ranks:
        entry["adapter"] = {"path": ADAPTER_DIR, "lorc_rank": max(ranks.values())}
    return entry


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _readable(folder: Path) -> None:
    """mkdtemp makes a private folder (0700); the saved model gets the usual permissions under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _replace_folder(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``; an old ``target`` is moved aside first and removed only
    once the new one is in place, so an interruption leaves the old or the new folder, never a mixture."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    aside.rmdir()
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:  # overwrite=True onto a file
        aside.unlink()


def save_quantized(model: nn.Module, tokenizer, directory: str | os.PathLike, record: dict | None = None,
                   overwrite: bool = False, scale_dtype: torch.dtype | None = None) -> dict:
    """Write ``model`` (quantized by ptqlab) to ``directory`` in the compressed-tensors format.

    Also writes the tokenizer, a ``ptqlab`` entry in config.json (``record``,
    the run's record, without its per-layer log) and, when the layers carry
    LoRC factors, a PEFT LoRA adapter in ``directory/adapter``. Scales are
    stored in ``scale_dtype`` (default: fp16 where that is exact, else float32,
    :func:`scale_dtype_for`). Returns
    ``{"stored_bits_per_weight", "quantized_linear_bytes", "fp16_linear_bytes", "adapter_bytes"}``
    measured on the tensors written.
    """
    from safetensors.torch import save_file

    def write_weights(path: Path, layers: dict[str, QuantLinear], scale_dtype: torch.dtype, dtype: torch.dtype) -> int:
        state = _float_state(model, layers, dtype)
        quantized_bytes = 0
        for name, layer in layers.items():
            tensors = compress_layer(name, layer, scale_dtype)
            fmt = format_for(layer.weight_spec, layer.act_spec)
            quantized_bytes += _tensor_bytes({k: tensors[k] for k in weight_tensor_names(fmt, layer.weight_spec.symmetric)})
            state.update({f"{name}.{k}": (v.to(dtype) if k == "bias" else v) for k, v in tensors.items()})
        save_file(state, str(path), metadata={"format": "pt"})
        return quantized_bytes

    return write_quantized_folder(model, tokenizer, directory, write_weights, record, overwrite, scale_dtype)


# write_weights(path of model.safetensors, quantized layers, scale dtype, save dtype) -> bytes of their weights
WeightsWriter = Callable[[Path, dict[str, QuantLinear], torch.dtype, torch.dtype], int]


def write_quantized_folder(model: nn.Module, tokenizer, directory: str | os.PathLike, write_weights: WeightsWriter,
                           record: dict | None = None, overwrite: bool = False,
                           scale_dtype: torch.dtype | None = None) -> dict:
    """The folder :func:`save_quantized` writes, its ``model.safetensors`` written by ``write_weights`` (from the
    model in memory, or from blocks written out as they were quantized: :mod:`ptqlab.streaming`); the
    adapter, tokenizer and config.json around it, into a temporary folder renamed to ``directory`` at the end."""
    target = Path(directory)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not empty (pass overwrite=True to replace it)")
    layers = _check_exportable(model)
    scale_dtype = scale_dtype or scale_dtype_for(layers)
    qgroups, ignore = _config_groups(layers, model)
    dtype = _save_dtype(model)

    from compressed_tensors.quantization import QuantizationConfig

    formats = {s.format for s in qgroups.values()}
    qconfig = QuantizationConfig(config_groups=qgroups, ignore=ignore, quantization_status="compressed",
                                 format=formats.pop() if len(formats) == 1 else "mixed-precision")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        quantized_bytes = write_weights(tmp / "model.safetensors", layers, scale_dtype, dtype)
        adapter_bytes = write_adapter(layers, tmp / ADAPTER_DIR, base=str(target.resolve()))
        params = sum(m.out_features * m.in_features for m in layers.values())
        stats = {
            "stored_bits_per_weight": 8 * (quantized_bytes + adapter_bytes) / params,
            "quantized_linear_bytes": quantized_bytes,
            "adapter_bytes": adapter_bytes,
            "fp16_linear_bytes": 2 * params,
            "scale_dtype": str(scale_dtype).replace("torch.", ""),
        }
        if record is not None:
            record = {**record, **{k: v for k, v in stats.items() if k == "stored_bits_per_weight"}}
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # written last: it holds the sha256 of every other file, which load_quantized verifies
        entry = {**_ptqlab_entry(layers, record), "storage": stats, "files": file_digests(tmp)}
        _write_config(tmp, model, qconfig, dtype, entry)
        _readable(tmp)
        _replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats
