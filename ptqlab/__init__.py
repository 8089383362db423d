"""ptqlab: post-training quantization of large language models (the ZeroQuant-V2 study, as software)."""

__version__ = "0.1.0"

from .config import GPTQOptions, LayerFilter, QuantConfig, RunSpec, ZQOptions  # noqa: E402
from .quantizers import QuantSpec, QuantizationError, dequantize, fake_quantize, quantize  # noqa: E402


def save_quantized(model, tokenizer, directory, record: dict | None = None, overwrite: bool = False,
                   scale_dtype=None) -> dict:
    """Save a ptqlab-quantized model in the compressed-tensors format: :func:`ptqlab.export.save_quantized`."""
    from .export import save_quantized as _save

    return _save(model, tokenizer, directory, record, overwrite, scale_dtype)


def load_quantized(directory, dtype=None, adapter: bool = True, verify: bool = True):
    """Load a saved quantized folder as a model of ptqlab QuantLinears: ``(model, tokenizer, ptqlab entry)``;
    :func:`ptqlab.export.load_quantized` (``dtype`` defaults to float32)."""
    import torch

    from .export import load_quantized as _load

    return _load(directory, dtype or torch.float32, adapter, verify)


def calibration_windows(tokenizer, source: str, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                        data_dir=None):
    """``LongTensor [nsamples, seqlen]`` of calibration windows (and the source's name), as ``ptqlab run``
    draws them: :func:`ptqlab.data.calibration_windows`."""
    from .data import calibration_windows as _windows

    return _windows(tokenizer, source, nsamples, seqlen, seed, data_dir)


def quantize_(model, config: "QuantConfig", calibration=None, device: str = "cpu", progress: bool = False,
              batch_size: int = 8, offload_activations: bool = False):
    """Quantize ``model`` in place according to ``config``; returns the :class:`~ptqlab.pipeline.QuantReport`."""
    from .pipeline import quantize_model

    return quantize_model(model, config, calibration, device, progress, batch_size, offload_activations)


__all__ = ["GPTQOptions", "LayerFilter", "QuantConfig", "RunSpec", "QuantSpec", "QuantizationError", "ZQOptions", "calibration_windows",
           "dequantize", "fake_quantize", "load_quantized", "quantize", "quantize_", "save_quantized", "__version__"]
