"""The table of export formats: how a quantized model is written, recognised and read back.

Each entry names a format (``ptqlab run --save-format``), says what it is, and gives its ``save``,
``detect`` (is this folder one of mine?) and ``load``. compressed-tensors, the format transformers, vLLM
and llm-compressor share, is the one ptqlab writes today; another (GGUF, an AWQ/GPTQ legacy layout) is one
module that registers itself here, plus its tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ExportFormat:
    name: str
    summary: str
    save: Callable[..., dict]  # (model, tokenizer, directory, record, overwrite) -> storage summary
    detect: Callable[[str | os.PathLike], bool]
    load: Callable[..., tuple]  # (directory, dtype, adapter, verify) -> (model, tokenizer, ptqlab entry)


EXPORT_FORMATS: dict[str, ExportFormat] = {}
DEFAULT_FORMAT = "compressed-tensors"


def register_format(fmt: ExportFormat) -> ExportFormat:
    if fmt.name in EXPORT_FORMATS:
        raise ValueError(f"export format '{fmt.name}' is registered twice")
    EXPORT_FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> ExportFormat:
    try:
        return EXPORT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown export format '{name}'; choose from {', '.join(EXPORT_FORMATS)}") from None


def format_of(path: str | os.PathLike) -> ExportFormat | None:
    """The registered format a folder is saved in, or None (not a saved quantized model)."""
    if not Path(path).is_dir():
        return None
    return next((f for f in EXPORT_FORMATS.values() if f.detect(path)), None)


def is_saved_model(path: str | os.PathLike) -> bool:
    return format_of(path) is not None


def _register_builtin() -> None:
    from .checkpoint import save_quantized
    from .layout import is_quantized_folder
    from .load import load_quantized

    register_format(ExportFormat(
        DEFAULT_FORMAT, "compressed-tensors checkpoint (transformers, vLLM, llm-compressor) with LoRC as a PEFT "
        "LoRA adapter", save_quantized, is_quantized_folder, load_quantized))


_register_builtin()
