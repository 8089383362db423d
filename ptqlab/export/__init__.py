"""Deployable quantized models: compressed-tensors checkpoints, LoRC as a PEFT LoRA adapter, reload.

``save_quantized(model, tokenizer, dir, record)`` writes a Hugging Face folder
that transformers (through compressed-tensors), vLLM and ptqlab load;
``load_quantized(dir)`` gives back a model of ptqlab QuantLinears that
evaluates as it was measured; ``stored_bits_per_weight(model)`` is what the
quantized linears will take on disk; ``load_with_transformers(dir)`` is the same folder as a plain transformers
model with the LoRC adapter applied by PEFT.
"""

from .checkpoint import ExportError, save_quantized, stored_bits_per_weight
from .load import LoadError, is_quantized_folder, load_quantized
from .registry import EXPORT_FORMATS, ExportFormat, format_of, get_format, register_format
from .transformers_load import load_with_transformers

__all__ = ["EXPORT_FORMATS", "ExportError", "ExportFormat", "LoadError", "format_of", "get_format",
           "is_quantized_folder", "register_format", "load_quantized", "load_with_transformers",
           "save_quantized", "stored_bits_per_weight"]
