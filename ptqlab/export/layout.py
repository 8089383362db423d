"""What a saved folder looks like: its file names, config keys, and reading its tensors safely.

Shared by the writer (``checkpoint.py``), the reader (``load.py``) and the LoRC adapter (``adapter.py``), so
that none of them imports another for a name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

PTQLAB_CONFIG_KEY = "ptqlab"  # ptqlab's entry in config.json: the run record, storage, file digests
ADAPTER_DIR = "adapter"  # the LoRC factors, as a PEFT LoRA adapter
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoadError(ValueError):
    """A saved quantized folder that cannot be loaded (the message names the file)."""


def is_quantized_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model folder whose config.json declares compressed-tensors quantization."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (data.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, with a clear error for a missing, truncated or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise LoadError(f"{path}: file missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise LoadError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err
