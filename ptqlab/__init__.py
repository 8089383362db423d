"""ptqlab: post-training quantization of large language models (the ZeroQuant-V2 study, as software)."""

__version__ = "0.1.0"

from .config import GPTQOptions, LayerFilter, QuantConfig, RunSpec, ZQOptions  # noqa: E402
from .quantizers import QuantSpec, QuantizationError, dequantize, fake_quantize, quantize  # noqa: E402


def quantize_(model, config: "QuantConfig", calibration=None, device: str = "cpu", progress: bool = False,
              batch_size: int = 8, offload_activations: bool = False):
    """Quantize ``model`` in place according to ``config``; returns the :class:`~ptqlab.pipeline.QuantReport`."""
    from .pipeline import quantize_model

    return quantize_model(model, config, calibration, device, progress, batch_size, offload_activations)


__all__ = ["GPTQOptions", "LayerFilter", "QuantConfig", "RunSpec", "QuantSpec", "QuantizationError", "ZQOptions", "dequantize",
           "fake_quantize", "quantize", "quantize_", "__version__"]
