"""Putting a quantized model back to its pristine weights, without a second copy in memory.

A run wraps linears in :class:`~ptqlab.models.QuantLinear` that share (and
then overwrite) the original weight Parameters, and may replace the LM head.
:meth:`PristineWeights.restore` puts the original modules back and reloads
the weights of the wrapped ones from the checkpoint's safetensors files,
memory-mapped, one tensor at a time.  Where a weight cannot be found in a
safetensors file (``.bin`` checkpoints, renamed keys) a CPU copy of that
weight is kept from the start instead: correct, at the old cost in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .models import get_adapter


def _checkpoint_folder(name_or_path: str) -> Path | None:
    from .testbed import resolve_model_path

    path = Path(resolve_model_path(name_or_path))
    if path.is_dir():
        return path
    try:  # a hub id: its snapshot in the local cache (no download)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True, allow_patterns=["*.safetensors*"]))
    except Exception:  # noqa: BLE001 - no cache entry: fall back to copies
        return None


def _safetensors_index(folder: Path | None) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    if folder is None:
        return {}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: file for k in f.keys()})
    return out


def _all_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter (a transform also changes norms, embeddings and the head)."""
    return dict(model.named_parameters())


def _linear_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights and biases a run may overwrite in place: every linear inside the decoder blocks."""
    adapter = get_adapter(model)
    block_ids = {id(m) for block in adapter.blocks for m in block.modules()}
    out = {}
    for name, module in model.named_modules():
        if id(module) in block_ids and isinstance(module, nn.Linear):
            for pname, p in module.named_parameters(recurse=False):
                out[f"{name}.{pname}"] = p
    return out


class PristineWeights:
    """Knows where the pristine value of every overwritable parameter of ``model`` lives."""

    def __init__(self, model: nn.Module, name_or_path: str) -> None:
        index = _safetensors_index(_checkpoint_folder(name_or_path))
        prefix = getattr(model, "base_model_prefix", "")
        self.dtype = next(model.parameters()).dtype
        self.sources: dict[str, tuple[Path, str]] = {}  # param name -> (file, key)
        self.copies: dict[str, torch.Tensor] = {}  # param name -> CPU copy, where no file has it
        linears = _linear_params(model)
        for name, p in _all_params(model).items():
            for key in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
                if key in index:
                    self.sources[name] = (index[key], key)
                    break
            else:
                if name in linears:
                    self.copies[name] = p.detach().to("cpu", copy=True)
        # parameters outside the block linears that no file holds: a transform's changes to them cannot be undone
        self.unrestorable = sorted(n for n in _all_params(model) if n not in self.sources and n not in self.copies)
        self.tie_word_embeddings = getattr(model.config, "tie_word_embeddings", None)

    def restore(self, model: nn.Module, everything: bool = False) -> None:
        """Undo a run: original modules back in place, their weights reloaded; ``everything``: every parameter
        (after a transform, which changes norms, embeddings and the head too), not only the block linears."""
        if everything and self.unrestorable:
            raise RuntimeError(f"cannot restore {self.unrestorable[0]} after a transform: no safetensors file holds it")
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                original = getattr(child, "original", None)  # QuantLinear, RealLinear: the layer they replaced
                while getattr(original, "original", None) is not None:  # a replaced replacement (rotated head)
                    original = original.original
                if original is not None:
                    setattr(module, child_name, original)
        self._reload(model, everything)
        if self.tie_word_embeddings is not None:
            model.config.tie_word_embeddings = self.tie_word_embeddings

    @torch.no_grad()
    def _reload(self, model: nn.Module, everything: bool = False) -> None:
        from safetensors import safe_open

        params = _all_params(model) if everything else _linear_params(model)
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name, (file, key) in self.sources.items():
            if name not in params:
                continue
            by_file.setdefault(file, []).append((name, key))
        for file, items in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name, key in items:
                    params[name].data = f.get_tensor(key).to(self.dtype)
        for name, value in self.copies.items():
            params[name].data = value.clone()
