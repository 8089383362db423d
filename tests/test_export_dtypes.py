"""Ship exactly what was measured, in every dtype: each registered method, each kind of spec, float32, float16
and bfloat16, quantized in memory, saved and reloaded by ptqlab with bit-identical weights and logits.

fp16 and bf16 run on the CPU here (slow kernels, same numbers as the GPU's for the weights: the dequantized
weights are computed in float32 and cast); the GPU suite (tests/gpu/) repeats the round trip through
``ptqlab run`` on CUDA with perplexities.
"""

from __future__ import annotations

import pytest
import torch

from ptqlab import LayerFilter, QuantConfig, QuantSpec, ZQOptions, quantize_
from ptqlab.data import calibration_windows
from ptqlab.export import load_quantized, save_quantized
from ptqlab.methods import METHODS
from ptqlab.models import QuantLinear, load_model
from ptqlab.testbed import CALIBRATION_TEXT

MODEL = "testbed-opt-2m"  # trained (so grids and errors are realistic), and fast enough for the whole matrix
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
A8 = QuantSpec(8, True, 0)
SPECS = {  # (weight, activation, lorc rank)
    "w4g32": (QuantSpec(4, True, 32), QuantSpec(), 0),
    "w3g32-asym": (QuantSpec(3, False, 32), QuantSpec(), 0),
    "w4-asym-row": (QuantSpec(4, False, 0), QuantSpec(), 0),
    "w8a8": (QuantSpec(8, True, 0), A8, 0),
    "w8a8-asym": (QuantSpec(8, False, 0), A8, 0),
    "w4a8-lorc": (QuantSpec(4, True, 32), A8, 4),
}
QUANTIZING = [name for name, m in METHODS.items() if m.quantizes_weights]
# RTN at every spec; the calibrating methods at the spec the bug report named (W8A8) and the richest one (groups,
# activations, LoRC). They quantize one block only: the round trip is per layer, and CI has 2 cores.
CASES = [("rtn", spec) for spec in SPECS] + [(m, s) for m in QUANTIZING if m != "rtn" for s in ("w8a8", "w4a8-lorc")]


@pytest.fixture(scope="module")
def windows():
    _, tokenizer = load_model(MODEL, torch.float32)
    calib, _ = calibration_windows(tokenizer, str(CALIBRATION_TEXT), 4, 64, 0)
    probe = calib[:2]
    return calib, probe


def _quantized(method: str, spec: str, dtype: torch.dtype, calib: torch.Tensor):
    weight, act, rank = SPECS[spec]
    model, tokenizer = load_model(MODEL, dtype)
    layers = LayerFilter() if method == "rtn" else LayerFilter.parse("block:1")
    config = QuantConfig(method=method, weight=weight, act=act, lorc_rank=rank, options={"zq": ZQOptions(steps=2, batch_size=2)},
                         layers=layers)
    quantize_(model, config, calib if config.needs_calibration else None)
    return model, tokenizer


def _same_model(saved_from: torch.nn.Module, loaded: torch.nn.Module) -> None:
    original = dict(saved_from.named_modules())
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert layers, "nothing was loaded as quantized"
    for name, layer in layers.items():
        mine = original[name]
        assert layer.weight.dtype == mine.weight.dtype
        assert torch.equal(layer.weight, mine.weight), f"{name}: weights differ after the round trip"
        assert layer.act_spec == mine.act_spec and layer.weight_spec == mine.weight_spec
        if mine.lorc_u is not None:
            assert torch.equal(layer.lorc_u, mine.lorc_u) and torch.equal(layer.lorc_v, mine.lorc_v)
    for key, value in saved_from.state_dict().items():  # norms, embeddings, biases: not rounded on the way
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("method", "spec"), CASES)
def test_every_method_spec_and_dtype_saves_and_reloads_exactly(method, spec, dtype, windows, tmp_path):
    calib, probe = windows
    model, tokenizer = _quantized(method, spec, DTYPES[dtype], calib)
    save_quantized(model, tokenizer, tmp_path / "out")
    loaded, _, entry = load_quantized(tmp_path / "out", DTYPES[dtype])
    _same_model(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=probe).logits, model(input_ids=probe).logits)
