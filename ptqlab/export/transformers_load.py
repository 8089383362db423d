"""A saved folder as a plain transformers model (no ptqlab layers), with its LoRC adapter applied by PEFT.

transformers reads a compressed-tensors folder two ways, and they differ in what they run:

* the default (``AutoModelForCausalLM.from_pretrained(DIR)``) keeps the weights packed and decompresses them on
  the first forward; compressed-tensors' forward wrapper quantizes each layer's input dynamically, so a W8A8 or
  W4A8 model runs with its activations quantized. Its packed layers have no ``weight`` until decompressed, which
  is why ``PeftModel.from_pretrained`` fails on them (``'Linear' object has no attribute 'weight'``): decompress
  first, as :func:`load_with_transformers` does;
* ``quantization_config=CompressedTensorsConfig(dequantize=True)`` loads dense weights; transformers 5.24 then
  drops the activation quantization (a W8A8 model measures as W8A16, seen on the CPU here), 5.17 kept it (seen on
  an H200). The compressed load keeps it in both.

The folder's ``config.json`` names the dtype the run measured in; load in it (``dtype="auto"``, the default
here) to get ptqlab's numbers, since transformers' own default is float32 only when the config says nothing.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from .layout import ADAPTER_CONFIG, ADAPTER_DIR


def activation_schemes(directory: str | os.PathLike) -> list[str]:
    """The config groups of a saved folder that quantize layer inputs (``[]`` for weight-only models)."""
    data = json.loads((Path(directory) / "config.json").read_text())
    groups = (data.get("quantization_config") or {}).get("config_groups") or {}
    return [name for name, group in groups.items() if group.get("input_activations")]


def load_with_transformers(directory: str | os.PathLike, dtype: torch.dtype | str = "auto", adapter: bool = True,
                           dequantize: bool | None = None, device_map=None):
    """``AutoModelForCausalLM`` for a saved folder, with dense weights and ``DIR/adapter`` applied through PEFT.

    ``dequantize=None`` (default) picks the load that runs the saved model: the dense load for weight-only
    folders (the same weights, and the one path that also reads asymmetric packed zero points with
    transformers 5.x), the compressed load then decompressed for folders that quantize activations, which keeps
    compressed-tensors' dynamic input quantization (W8A8, W4A8 run with quantized activations, on
    compressed-tensors' activation grid, ``ptqlab/export/README.md``). ``dequantize=True`` forces the dense load
    (a warning says when that drops activation quantization); ``False`` forces the compressed one.
    """
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    folder = Path(directory)
    if dequantize is None:
        dequantize = not activation_schemes(folder)
    kwargs = {"dtype": dtype, "device_map": device_map}
    if dequantize:
        if activation_schemes(folder):
            warnings.warn(f"{folder}: dequantize=True can drop the saved activation quantization (transformers "
                          f"5.24 runs a W8A8 model as W8A16); load with dequantize=False to keep it", stacklevel=2)
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if not dequantize:
        # what the first forward would do: PEFT needs each layer's dense weight to attach LoRA to
        model.hf_quantizer.compressor.decompress_model(model)
    model.eval()
    if adapter and (folder / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder / ADAPTER_DIR))
        model.eval()
    return model
