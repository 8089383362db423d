"""Load a compressed-tensors folder back as a model of ptqlab QuantLinears.

Every quantized linear gets its weight dequantized from the stored integer
codes (``(u - z) * scale`` in float32, then the model dtype), its
``weight_scale``/``weight_zero`` and ``weight_spec``, and the ``act_spec``
the config's dynamic ``input_activations`` state; a LoRA adapter beside the
model becomes ``lorc_u``/``lorc_v``. The model evaluates as ptqlab measured it,
with no re-quantization. Folders written by other tools (llm-compressor) with
integer pack-/int-quantized weights load too, and FP8 (``float-quantized``), MXFP4 and NVFP4
(``mxfp4-``/``nvfp4-pack-quantized``) weights (``float_formats.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..models import QuantLinear
from ..quantizers import PER_ROW, PER_TENSOR, QuantSpec
from .adapter import read_adapter
from .layout import ADAPTER_CONFIG, ADAPTER_DIR, PTQLAB_CONFIG_KEY, LoadError, is_quantized_folder, read_safetensors
from .float_formats import decode_float_layer, spec_of_args
from .pack import to_unsigned, unpack_codes, unpack_zero_points







def _read_weights(folder: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """``{name: (tensor, file)}`` over model.safetensors or the shards its index lists."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise LoadError(f"{index}: unreadable shard index ({err})") from err
    else:
        files = ["model.safetensors"]
    out = {}
    for name in files:
        path = folder / name
        out.update({k: (v, path) for k, v in read_safetensors(path).items()})
    return out


def _spec(args, what: str, where: Path) -> QuantSpec:
    """A compressed-tensors QuantizationArgs as a ptqlab QuantSpec (integers, fp8, mxfp4, nvfp4)."""
    if args.type == "float":
        spec = spec_of_args(args)
        if spec is None:
            raise LoadError(f"{where}: {what} are float {args.num_bits}-bit with the '{args.strategy}' strategy; "
                            f"ptqlab models fp8 (per channel/token/tensor), mxfp4 (blocks of 32) and nvfp4 (16)")
        return spec
    if args.type != "int":
        raise LoadError(f"{where}: {what} are {args.type} {args.num_bits}-bit; ptqlab models integer and float grids only")
    strategy = args.strategy
    if strategy in ("channel", "token"):
        group = PER_ROW
    elif strategy == "tensor":
        group = PER_TENSOR
    elif strategy == "group":
        group = args.group_size
    else:
        raise LoadError(f"{where}: {what} use the '{strategy}' strategy, which ptqlab does not model")
    try:
        return QuantSpec(args.num_bits, bool(args.symmetric), group)
    except ValueError as err:
        raise LoadError(f"{where}: {what}: {err}") from err


def _take(tensors: dict, key: str, config_path: Path, files: str) -> tuple[torch.Tensor, Path]:
    if key not in tensors:
        raise LoadError(f"{files} has no tensor '{key}', which {config_path} implies: the config disagrees "
                        f"with the tensors")
    return tensors.pop(key)


def _quant_linear(name: str, module: nn.Module, scheme, fmt: str, tensors: dict, config_path: Path,
                  files: str, dtype: torch.dtype) -> QuantLinear:
    """One quantized linear from its stored tensors, checked against the module's shape and the scheme."""
    spec = _spec(scheme.weights, "weights", config_path)
    if spec.group_size != PER_ROW and spec.group_size != PER_TENSOR and module.in_features % spec.group_size:
        raise LoadError(f"{config_path}: group size {spec.group_size} does not divide {name}'s "
                        f"{module.in_features} inputs")
    out_f, in_f = module.out_features, module.in_features
    groups = in_f // spec.group_size if spec.group_size > 0 else 1
    if spec.is_float:
        values, scale = decode_float_layer(name, spec, fmt, lambda key: _take(tensors, key, config_path, files),
                                           out_f, in_f, LoadError)
        step = in_f // groups
        weight = values * scale.repeat_interleave(step, 1)
        return _finish(name, weight, scale, torch.zeros_like(scale), spec, scheme, tensors, config_path, dtype)
    scale, where = _take(tensors, f"{name}.weight_scale", config_path, files)
    expected_scale = (1,) if spec.group_size == PER_TENSOR else (out_f, groups)
    if tuple(scale.shape) not in (expected_scale, (1, 1) if spec.group_size == PER_TENSOR else expected_scale):
        raise LoadError(f"{where}: {name}.weight_scale has shape {tuple(scale.shape)}, but {config_path.name} "
                        f"({spec.describe()}) and the {out_f}x{in_f} layer need {expected_scale}")
    scale = scale.float().reshape(-1, 1 if spec.group_size == PER_TENSOR else groups).expand(out_f, groups)
    try:
        if fmt == "pack-quantized":
            shape, _ = _take(tensors, f"{name}.weight_shape", config_path, files)
            if [int(x) for x in shape.tolist()] != [out_f, in_f]:
                raise LoadError(f"{where}: {name}.weight_shape {shape.tolist()} is not the model's {[out_f, in_f]}")
            packed, where = _take(tensors, f"{name}.weight_packed", config_path, files)
            codes = unpack_codes(packed, spec.bits, (out_f, in_f))
        elif fmt in ("int-quantized", "naive-quantized"):
            signed, where = _take(tensors, f"{name}.weight", config_path, files)
            if signed.dtype != torch.int8 or tuple(signed.shape) != (out_f, in_f):
                raise LoadError(f"{where}: {name}.weight is {signed.dtype} {tuple(signed.shape)}, expected int8 "
                                f"{(out_f, in_f)} for {fmt}")
            lo, hi = -(1 << (spec.bits - 1)), (1 << (spec.bits - 1)) - 1
            if int(signed.min()) < lo or int(signed.max()) > hi:
                raise LoadError(f"{where}: {name}.weight holds codes outside the {spec.bits}-bit range")
            codes = to_unsigned(signed, spec.bits)
        else:
            raise LoadError(f"{config_path}: format '{fmt}' is not an integer format ptqlab reads")
        if spec.symmetric:
            zero = torch.full((out_f, groups), float(1 << (spec.bits - 1)))
        else:
            zp, where = _take(tensors, f"{name}.weight_zero_point", config_path, files)
            if fmt == "pack-quantized" and spec.group_size != PER_TENSOR:
                zero = unpack_zero_points(zp, spec.bits, (out_f, groups)).float()
            else:
                zero = to_unsigned(zp.reshape(-1, 1 if spec.group_size == PER_TENSOR else groups), spec.bits)
                zero = zero.float().expand(out_f, groups)
    except ValueError as err:  # QuantizationError from the unpackers: a tensor that does not fit the config
        if isinstance(err, LoadError):
            raise
        raise LoadError(f"{where}: {name}: {err}; the config ({config_path.name}) disagrees with the tensors") from err
    step = in_f // groups
    weight = (codes.float() - zero.repeat_interleave(step, 1)) * scale.repeat_interleave(step, 1)
    return _finish(name, weight, scale.contiguous(), zero.contiguous(), spec, scheme, tensors, config_path, dtype)


def _finish(name: str, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, scheme,
            tensors: dict, config_path: Path, dtype: torch.dtype) -> QuantLinear:
    """The QuantLinear of a decoded weight (float32, cast here as the run cast it), its grid, bias and inputs."""
    bias = tensors.pop(f"{name}.bias", (None, None))[0]
    layer = QuantLinear(weight.to(dtype), None if bias is None else bias.to(dtype), name)
    layer.weight_spec = spec
    layer.set_weight_qparams(scale, zero)
    if scheme.input_activations is not None:
        if not scheme.input_activations.dynamic:
            raise LoadError(f"{config_path}: {name} has static input activation scales; ptqlab quantizes "
                            f"activations dynamically only")
        layer.act_spec = _spec(scheme.input_activations, "input activations", config_path)
    if scheme.output_activations is not None:
        raise LoadError(f"{config_path}: output activation quantization is not supported by ptqlab")
    return layer


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def verify_files(folder: Path, entry: dict, adapter: bool = True) -> None:
    """Check every file that config.json's ``ptqlab`` entry lists against its sha256 (a missing, truncated or
    altered file is a :class:`LoadError` naming it); folders without digests (other tools) pass. Without
    ``adapter`` the adapter's files are not needed and not checked."""
    from ..data import sha256_file

    expected = {rel: digest for rel, digest in (entry.get("files") or {}).items()
                if adapter or not rel.startswith(f"{ADAPTER_DIR}/")}
    if not expected:
        return
    missing = [rel for rel in expected if not (folder / rel).is_file()]
    if missing:
        raise LoadError(f"{folder / missing[0]}: file missing ({len(missing)} of the {len(expected)} files the "
                        f"folder was saved with are gone)")
    changed = [rel for rel, digest in expected.items() if sha256_file(folder / rel) != digest]
    if changed:
        raise LoadError(f"{folder / changed[0]}: its sha256 is not the one recorded at save time: the file was "
                        f"altered or corrupted since ({len(changed)} such files; verify=False / --no-verify skips "
                        f"this check)")


def _check_adapter_present(folder: Path, entry: dict, adapter: bool) -> None:
    """A record with LoRC whose adapter is gone would load and evaluate as another model under the same name."""
    if adapter and entry.get("adapter") and not (folder / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        raise LoadError(f"{folder / ADAPTER_DIR / ADAPTER_CONFIG}: file missing, but the folder was saved with LoRC "
                        f"rank {entry['adapter'].get('lorc_rank')}; restore the adapter, or load the base alone "
                        f"(adapter=False)")


def load_quantized(directory: str | os.PathLike, dtype: torch.dtype = torch.float32, adapter: bool = True,
                   verify: bool = True):
    """Load a compressed-tensors folder (as :func:`save_quantized` writes) into ptqlab QuantLinears.

    Returns ``(model, tokenizer, entry)``: ``entry`` is config.json's ``ptqlab``
    entry (the run record at save time; ``{}`` for folders from other tools).
    With ``adapter``, ``directory/adapter`` (a LoRA adapter) becomes the layers' LoRC factors;
    a folder saved with LoRC whose adapter is missing is an error. With ``verify``, every file is
    checked against the sha256 recorded at save time (one read of the folder).
    """
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(directory)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LoadError(f"{config_path}: file missing (not a saved model folder)")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise LoadError(f"{config_path}: not valid JSON ({err})") from err
    qdata = raw.get("quantization_config") or {}
    if qdata.get("quant_method") != "compressed-tensors":
        raise LoadError(f"{config_path}: no compressed-tensors quantization_config (not a quantized folder)")
    try:
        qconfig = QuantizationConfig.model_validate(
            {k: v for k, v in qdata.items() if k in QuantizationConfig.model_fields})
    except ValueError as err:
        raise LoadError(f"{config_path}: invalid quantization_config: {err}") from err

    entry = raw.get(PTQLAB_CONFIG_KEY, {})
    _check_adapter_present(folder, entry, adapter)
    if verify:
        verify_files(folder, entry, adapter)

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is built dense; the tensors are decoded below
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _read_weights(folder)
    files = ", ".join(sorted({str(p) for _, p in tensors.values()}))

    quantized: set[str] = set()
    for group, scheme in qconfig.config_groups.items():
        if scheme.weights is None:
            raise LoadError(f"{config_path}: config group {group} quantizes no weights; ptqlab cannot model it")
        fmt = scheme.format or qconfig.format
        for name, module in list(match_named_modules(model, scheme.targets, qconfig.ignore)):
            if not isinstance(module, nn.Linear):
                raise LoadError(f"{config_path}: {name} is a {type(module).__name__}, not a linear layer")
            _set_module(model, name, _quant_linear(name, module, scheme, fmt, tensors, config_path, files, dtype))
            quantized.add(name)

    state = {k: v.to(dtype) if v.is_floating_point() else v for k, (v, _) in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if getattr(config, "tie_word_embeddings", False) \
        else set()
    missing = [k for k in missing if k not in tied and k.rpartition(".")[0] not in quantized]
    if unexpected:
        raise LoadError(f"{tensors[unexpected[0]][1]}: tensor '{unexpected[0]}' belongs to no layer of the model or "
                        f"is not quantized as {config_path.name} says ({len(unexpected)} such tensors)")
    if missing:
        raise LoadError(f"{files}: no tensor '{missing[0]}' for the model {config_path.name} describes "
                        f"({len(missing)} missing)")
    if tied:
        model.tie_weights()

    adapter_dir = folder / ADAPTER_DIR
    if adapter and (adapter_dir / ADAPTER_CONFIG).is_file():
        for name, (u, v) in read_adapter(adapter_dir).items():
            layer = model.get_submodule(name) if name in dict(model.named_modules()) else None
            if not isinstance(layer, QuantLinear):
                raise LoadError(f"{adapter_dir}: the adapter targets {name}, which is not a quantized layer")
            if u.shape[0] != layer.out_features or v.shape[1] != layer.in_features:
                raise LoadError(f"{adapter_dir}: {name}'s factors {tuple(u.shape)}x{tuple(v.shape)} do not fit "
                                f"its {layer.out_features}x{layer.in_features} weight")
            layer.set_lorc(u, v)

    model.eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    return model, tokenizer, entry
