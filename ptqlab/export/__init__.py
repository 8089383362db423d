"""Deployable quantized models: compressed-tensors checkpoints, LoRC as a PEFT LoRA adapter, reload.

``save_quantized(model, tokenizer, dir, record)`` writes a Hugging Face folder
that transformers (through compressed-tensors), vLLM and ptqlab load;
``load_quantized(dir)`` gives back a model of ptqlab QuantLinears that
evaluates as it was measured; ``stored_bits_per_weight(model)`` is what the
quantized linears will take on disk.
"""

from .checkpoint import ExportError, save_quantized, stored_bits_per_weight
from .load import LoadError, is_quantized_folder, load_quantized

__all__ = ["ExportError", "LoadError", "is_quantized_folder", "load_quantized", "save_quantized",
           "stored_bits_per_weight"]
