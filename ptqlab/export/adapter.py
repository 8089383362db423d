"""LoRC factors as a PEFT LoRA adapter.

LoRC adds ``U V`` (``U [out, r]``, ``V [r, in]``) to a quantized weight; LoRA adds
``(alpha / r) B A`` with ``B [out, r]``, ``A [r, in]``. So ``lora_B = U``,
``lora_A = V`` and ``lora_alpha = r`` (scale 1) is the same layer, and
``peft.PeftModel.from_pretrained`` (or vLLM's LoRA support) applies it to the
quantized base unchanged. The factors are stored in the dtype the model was
measured in (dequantized from ``--lorc-bits``; the record keeps the paper's
accounting at ``lorc_bits``), so the adapter adds exactly what was measured.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from ..models import QuantLinear
from .layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoadError, read_safetensors



def _key(name: str, factor: str) -> str:
    # PEFT's saved names: the PeftModel wrapper's prefix, no adapter name
    return f"base_model.model.{name}.lora_{factor}.weight"


def write_adapter(layers: dict[str, QuantLinear], folder: Path, base: str) -> int:
    """Write the LoRC factors of ``layers`` as a PEFT LoRA adapter in ``folder``; returns the bytes of its tensors
    (0, and nothing written, when no layer has LoRC).

    ``base`` becomes ``base_model_name_or_path``. The config is written with
    sorted keys and target modules, so the same run saved twice gives the same bytes.
    """
    import json

    from peft import LoraConfig
    from safetensors.torch import save_file

    with_lorc = {n: m for n, m in layers.items() if m.lorc_u is not None}
    if not with_lorc:
        return 0
    tensors: dict[str, torch.Tensor] = {}
    ranks = {}
    for name, layer in with_lorc.items():
        tensors[_key(name, "A")] = layer.lorc_v.detach().cpu().contiguous()
        tensors[_key(name, "B")] = layer.lorc_u.detach().cpu().contiguous()
        ranks[name] = layer.lorc_u.shape[1]
    r = Counter(ranks.values()).most_common(1)[0][0]
    # a layer narrower than the rank keeps min(out, in) factors: its own rank (alpha = rank keeps the scale 1)
    pattern = {n: k for n, k in ranks.items() if k != r}
    config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(with_lorc), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", rank_pattern=pattern, alpha_pattern=dict(pattern),
                        base_model_name_or_path=base, inference_mode=True)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    # PEFT keeps target_modules as a set and writes it in hash order: sort it for reproducible bytes
    path = folder / ADAPTER_CONFIG
    data = json.loads(path.read_text())
    data["target_modules"] = sorted(data["target_modules"])
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def read_adapter(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (U [out, r], V [r, in])}`` from a LoRA adapter folder, the LoRA scale folded into U."""
    import json


    config_path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LoadError(f"{config_path}: cannot read the adapter config ({err})") from err
    if config.get("peft_type") != "LORA":
        raise LoadError(f"{config_path}: not a LoRA adapter (peft_type={config.get('peft_type')!r})")
    if config.get("use_rslora") or config.get("use_dora"):
        raise LoadError(f"{config_path}: rsLoRA/DoRA adapters are not LoRC factors")
    tensors = read_safetensors(folder / ADAPTER_WEIGHTS)
    r, alpha = config["r"], config["lora_alpha"]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    out = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in tensors:
            raise LoadError(f"{folder / ADAPTER_WEIGHTS}: {key} has no {b_key}")
        a, b = tensors[key], tensors[b_key]
        pattern = name
        rank = ranks.get(pattern, r)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise LoadError(f"{folder / ADAPTER_WEIGHTS}: {name} has rank {a.shape[0]}/{b.shape[1]} but "
                            f"{config_path.name} says {rank}")
        scale = alphas.get(pattern, alpha) / rank
        out[name] = (b.float() * scale, a.float())
    return out
