"""ZQ-Local and ZQ-Global's training steps replayed as one captured CUDA graph (issue 22: the methods recipe on the
testbed is launch-bound) against the eager loop (``PTQLAB_ZQ_GRAPHS=0``): the same objective history and the same
quantized weights, on a random layer and through the pipeline on each testbed architecture, with and without
8-bit activations (whose fake quantization runs inside the captured step); and capture never falls back."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from ptqlab import QuantConfig, QuantSpec
from ptqlab.data import calibration_windows
from ptqlab.methods.zeroquant import ZQOptions, zq_local_quantize
from ptqlab.models import QuantLinear, load_model
from ptqlab.pipeline import quantize_model


def _eager(monkeypatch) -> None:
    monkeypatch.setenv("PTQLAB_ZQ_GRAPHS", "0")


def _graphed(monkeypatch) -> None:
    monkeypatch.delenv("PTQLAB_ZQ_GRAPHS", raising=False)


@pytest.mark.parametrize("spec", [QuantSpec(4, True, 128), QuantSpec(3, False, 0)], ids=["w4-g128", "w3-asym-row"])
def test_zq_local_graph_replays_equal_the_eager_loop(monkeypatch, spec):
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(384, 256, device="cuda", generator=g) * 0.02
    X = torch.randn(2048, 256, device="cuda", generator=g)
    H = 2 * X.t() @ X / X.shape[0]
    _eager(monkeypatch)
    eager = zq_local_quantize(W, H, spec, steps=40)
    _graphed(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the eager loop would warn
        graphed = zq_local_quantize(W, H, spec, steps=40)
    assert len(graphed.history) == len(eager.history) == 41
    torch.testing.assert_close(torch.tensor(graphed.history), torch.tensor(eager.history), rtol=1e-5, atol=0)
    assert min(graphed.history) < graphed.history[0]  # it learned something (Adam here is not monotone)
    same = (graphed.weight == eager.weight).float().mean()
    assert same >= 0.999, f"only {same:.4f} of the weights equal"
    torch.testing.assert_close(graphed.scale, eager.scale)


def _quantized(model, calib, config) -> tuple[dict[str, torch.Tensor], list]:
    m = copy.deepcopy(model)
    report = quantize_model(m, config, calib, "cuda", progress=False, batch_size=8)
    weights = {n: mod.weight.detach().float().cpu() for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
    return weights, report.layers


@pytest.mark.parametrize("model_name", ["testbed-opt", "testbed-bloom", "testbed-llama"])
@pytest.mark.parametrize("method", ["zq-global", "zq-local"])
@pytest.mark.parametrize("abits", [16, 8])
def test_zq_pipeline_graphed_equals_eager(monkeypatch, model_name, method, abits):
    model, tokenizer = load_model(model_name, dtype=torch.float16)
    calib, _ = calibration_windows(tokenizer, "testbed", 16, 512, seed=0)
    config = QuantConfig(method=method, weight=QuantSpec(4, True, 128), act=QuantSpec(abits, True, 0),
                         options={"zq": ZQOptions(steps=30)})
    _eager(monkeypatch)
    eager, eager_log = _quantized(model, calib, config)
    _graphed(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphed, graphed_log = _quantized(model, calib, config)
    assert eager.keys() == graphed.keys() and eager
    total = sum(w.numel() for w in eager.values())
    same = sum(int((eager[k] == graphed[k]).sum()) for k in eager)
    assert same >= 0.995 * total, f"{model_name} {method} A{abits}: {same / total:.4f} of the weights equal"
    if method == "zq-global":
        mse = [(e["zq_global_mse"], g["zq_global_mse"]) for e, g in zip(eager_log, graphed_log) if "zq_global_mse" in e]
        assert mse
        for (e0, e1), (g0, g1) in mse:
            assert g0 == pytest.approx(e0, rel=1e-5) and g1 == pytest.approx(e1, rel=1e-3)
