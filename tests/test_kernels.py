"""CPU side of issue 10: batched evaluation, the LoRC inference layouts, kernel selection and its errors,
the integer grid the real kernels read.  The Triton/CUDA kernels themselves are checked by
bench/gpu_check_kernels.py through the device tool (CI has no GPU)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ptqlab import QuantConfig, QuantSpec, quantize_
from ptqlab.data import load_text, tokenize
from ptqlab.evaluate import EvaluationError, default_eval_batch, perplexity
from ptqlab.kernels.real import KERNELS, KernelError, scheme_of, select_kernels, weight_codes
from ptqlab.models import QuantLinear, load_model
from ptqlab.quantizers import quantize


def _layer(out=48, inp=64, rank=0, seed=0, bias=True) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    layer = QuantLinear(torch.randn(out, inp, generator=g), torch.randn(out, generator=g) if bias else None, "l")
    if rank:
        layer.set_lorc(torch.randn(out, rank, generator=g) * 0.1, torch.randn(rank, inp, generator=g) * 0.1)
    return layer


def _record_grid(layer: QuantLinear, spec: QuantSpec) -> None:
    """What the quantization pipeline records after quantizing (the contract), done here by RTN."""
    q = quantize(layer.weight.data, spec, layer.name)
    layer.weight.data.copy_(q.dequantize())
    layer.weight_spec = spec
    layer.set_weight_qparams(q.scale.squeeze(-1), q.zero.squeeze(-1))


@pytest.mark.parametrize("arch", ["opt", "bloom"])
def test_batched_evaluation_equals_one_window_at_a_time(arch, tiny_models, data_dir):
    model, tok = load_model(tiny_models[arch], torch.float32)
    quantize_(model, QuantConfig("rtn", QuantSpec(4, True, 32), act=QuantSpec(8, False, 0)))
    tokens = tokenize(tok, load_text("ptb", "eval", data_dir).text[:6000])[: 48 * 7]  # a prefix: fast
    one = perplexity(model, tokens, 48, progress=False, eval_batch=1)
    assert default_eval_batch(model, 48, "cpu") == 1
    assert tokens.numel() == 48 * 7
    for b in (3, 64):  # an uneven last batch; more than there are
        assert perplexity(model, tokens, 48, progress=False, eval_batch=b) == pytest.approx(one, rel=1e-6)
    with pytest.raises(EvaluationError, match="eval_batch must be a positive"):
        perplexity(model, tokens, 48, progress=False, eval_batch=0)


def test_non_finite_logits_are_reported_once_per_batch(tiny_models, data_dir):
    model, tok = load_model(tiny_models["opt"], torch.float32)
    tokens = tokenize(tok, load_text("ptb", "eval", data_dir).text[:4000])[: 32 * 4]
    model.lm_head.weight.data[5, 0] = float("nan")  # no activation quantizer to catch it before the logits
    with pytest.raises(EvaluationError, match=r"non-finite loss in windows 0\.\.1"):
        perplexity(model, tokens, 32, progress=False, eval_batch=2, desc="eval ptb")


@pytest.mark.parametrize("bias", [True, False])
def test_lorc_inference_layout_equals_the_reference(bias):
    layer = _layer(rank=5, bias=bias).double()
    layer.act_spec = QuantSpec(8, False, 16)
    x = torch.randn(3, 7, 64, dtype=torch.float64)
    want = layer(x)  # grad enabled: the reference three-op path
    assert QuantLinear.lorc_mode == "addmm"
    with torch.no_grad():
        assert torch.allclose(layer(x), want, rtol=1e-12, atol=1e-12)
        assert layer(x[0, 0]).shape == (48,)


@pytest.mark.parametrize("spec", [QuantSpec(4, True, 16), QuantSpec(4, False, 0), QuantSpec(8, True, 0),
                                  QuantSpec(3, False, 32), QuantSpec(2, True, 64)])
def test_weight_codes_reproduce_the_dequantized_weight(spec):
    layer = _layer(out=33, inp=64, seed=1)
    _record_grid(layer, spec)
    codes, scale, zero = weight_codes(layer)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= spec.maxq
    reps = 64 // scale.shape[1]
    deq = (codes.float() - zero.repeat_interleave(reps, 1)) * scale.repeat_interleave(reps, 1)
    assert torch.equal(deq.to(layer.weight.dtype), layer.weight.data)
    if spec.symmetric and spec.group_size == 0:  # the int8 path's signed integers times one scale per row
        signed = codes.to(torch.int16) - zero.to(torch.int16)
        assert signed.min() >= -(2 ** (spec.bits - 1)) and signed.max() <= 2 ** (spec.bits - 1) - 1
        assert torch.equal((signed.double() * scale.double()).float(), layer.weight.data)


@pytest.mark.parametrize("group", [16, 0])
def test_int4_packing_round_trips(group):
    from ptqlab.kernels.real import dequant_int4_reference, pack_int4

    layer = _layer(out=9, inp=64, seed=4)
    _record_grid(layer, QuantSpec(4, False, group))
    codes, scale, zero = weight_codes(layer)
    packed = pack_int4(codes)
    assert packed.shape == (9, 32) and packed.dtype == torch.uint8
    assert torch.equal(dequant_int4_reference(packed, scale, zero, layer.weight.dtype), layer.weight.data)


def test_weight_codes_need_the_recorded_grid():
    layer = _layer()
    layer.weight_spec = QuantSpec(4, True, 16)
    with pytest.raises(KernelError, match="no weight_scale/weight_zero"):
        weight_codes(layer)


FP8 = QuantSpec(fmt="fp8")


@pytest.mark.parametrize("w, a, triton, tinygemm", [
    (QuantSpec(4, True, 128), QuantSpec(), "w4a16-triton", "w4a16-tinygemm"),
    (QuantSpec(4, False, 32), QuantSpec(), "w4a16-triton", "w4a16-tinygemm"),
    (QuantSpec(4, True, 512), QuantSpec(), "w4a16-triton", "w4a16-gemlite"),  # tinygemm groups: 32..256
    (QuantSpec(4, True, 16), QuantSpec(), "w4a16-gemlite", "w4a16-gemlite"),  # Triton chunks: groups >= 32
    (QuantSpec(4, True, 96), QuantSpec(), "w4a16-gemlite", "w4a16-gemlite"),  # ... of a power of two
    (QuantSpec(4, False, 0), QuantSpec(), "w4a16-triton", "w4a16-gemlite"),
    (QuantSpec(8, True, 0), QuantSpec(), "w8a16-gemlite", "w8a16-gemlite"),
    (QuantSpec(3, True, 128), QuantSpec(), None, None),
    (QuantSpec(4, True, -1), QuantSpec(), None, None),
    (QuantSpec(8, True, 0), QuantSpec(8, True, 0), "w8a8-triton", "w8a8-int8"),
    (QuantSpec(4, True, 0), QuantSpec(8, True, 0), "w4a8-triton", "w4a8-int8"),
    (QuantSpec(4, True, 128), QuantSpec(8, True, 0), None, None),  # groups do not fit one scale per int8 row
    (QuantSpec(8, True, 0), QuantSpec(8, False, 0), None, None),
    (QuantSpec(8, True, 0), QuantSpec(4, True, 0), None, None),
    (QuantSpec(), QuantSpec(8, True, 0), None, None),
    (FP8, FP8, "w8a8-fp8", None),  # the triton family only
    (FP8, QuantSpec(), None, None),  # FP8 weight-only: no real kernel
    (FP8, QuantSpec(8, True, 0), None, None),
    (QuantSpec(8, True, 0), FP8, None, None),
    (QuantSpec(4, True, 0, fmt="mxfp4"), QuantSpec(), None, None),
])
def test_scheme_of(w, a, triton, tinygemm):
    layer = _layer()
    layer.weight_spec, layer.act_spec = w, a
    assert scheme_of(layer) == triton  # the default preference: the Triton family
    assert scheme_of(layer, "triton") == triton
    assert scheme_of(layer, "tinygemm") == tinygemm
    if triton == "w4a16-triton" and tinygemm == "w4a16-tinygemm":
        assert scheme_of(layer, "gemlite") == "w4a16-gemlite"
    assert triton is None or triton in KERNELS


def test_scheme_of_rejects_an_unknown_preference():
    layer = _layer()
    layer.weight_spec = QuantSpec(4, True, 128)
    with pytest.raises(KernelError, match="unknown kernel preference 'marlin'; choose one of triton, tinygemm"):
        scheme_of(layer, "marlin")


def _model_with(w: QuantSpec, a: QuantSpec) -> torch.nn.Module:
    model = torch.nn.Sequential(_layer(seed=2), _layer(out=64, inp=48, seed=3))
    for m in model:
        m.weight_spec, m.act_spec = w, a
    return model


def test_kernel_selection_fake_and_cpu():
    model = _model_with(QuantSpec(4, True, 16), QuantSpec())
    assert select_kernels(model, "fake", "cuda") == {"mode": "fake", "real": {}, "fake": 2}
    with pytest.raises(KernelError, match=r"needs the model on a CUDA device \(got cpu\).*w4a16-gemlite"):
        select_kernels(model, "real", "cpu")
    with pytest.raises(KernelError, match="offloaded evaluation"):
        select_kernels(model, "real", "cuda", offloaded=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_kernels(model, "auto", "cpu")["fake"] == 2
    assert len(caught) == 1 and "evaluating with fake quantization" in str(caught[0].message)
    assert all(isinstance(m, QuantLinear) for m in model)
    with pytest.raises(KernelError, match="unknown kernel mode 'fast'"):
        select_kernels(model, "fast", "cpu")


def test_kernel_selection_scheme_without_kernel():
    # checked before any layer is converted, so this runs without a GPU
    model = _model_with(QuantSpec(3, True, 16), QuantSpec(6, True, 0))
    with pytest.raises(KernelError, match=r"no real kernel for W int3-sym-g16 / A int6-sym-row; real kernels exist "
                                          r"for: .*w8a8-int8"):
        select_kernels(model, "real", "cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = select_kernels(model, "auto", "cuda")
    assert summary == {"mode": "auto", "real": {}, "fake": 2}
    assert "stay fake-quantized" in str(caught[0].message)


def test_cli_eval_batch_and_kernel_options(tiny_models, data_dir, tmp_path, capsys):
    from ptqlab.cli import main

    base = ["run", "--model", str(tiny_models["opt"]), "--method", "rtn", "--wbits", "4", "--wgroup", "32",
            "--eval", "ptb", "--seqlen", "32", "--max-eval-windows", "5", "--device", "cpu",
            "--data-dir", str(data_dir), "--no-progress"]
    out = tmp_path / "r.jsonl"
    assert main([*base, "--eval-batch", "2", "--output", str(out)]) == 0
    assert main([*base, "--eval-batch", "5", "--output", str(out)]) == 0
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert first["execution"]["eval_batch"] == 2
    assert first["ppl"]["ptb"] == pytest.approx(second["ppl"]["ptb"], rel=1e-6)
    capsys.readouterr()
    assert main([*base, "--kernel", "real"]) == 2
    err = capsys.readouterr().err
    assert "--kernel real needs the model on a CUDA device" in err and "w4a16-gemlite" in err


def test_real_int8_layer_layout_and_session_restore(tiny_models):
    """The int8 layer's integers times its scales are the weight; the session's restore puts the original back."""
    from ptqlab.kernels.real import RealLinear
    from ptqlab.models import get_adapter
    from ptqlab.restore import PristineWeights

    model, _ = load_model(tiny_models["opt"], torch.float32)
    pristine = PristineWeights(model, str(tiny_models["opt"]))
    attn = get_adapter(model).blocks[0].self_attn
    original = attn.q_proj
    want = original.weight.detach().clone()
    layer = QuantLinear.from_module(original, "blocks.0.self_attn.q_proj")
    _record_grid(layer, QuantSpec(8, True, 0))
    layer.act_spec = QuantSpec(8, True, 0)
    real = RealLinear(layer, "w8a8-int8")
    assert real.w_int8.dtype == torch.int8
    assert torch.equal((real.w_int8.double() * real.w_scale.double()[:, None]).float(), layer.weight.data)
    attn.q_proj = real
    pristine.restore(model)
    assert attn.q_proj is original and torch.equal(original.weight, want)


def test_input_cache_reuses_only_the_same_unchanged_tensor():
    from ptqlab.kernels.input_cache import InputCache

    cache, calls = InputCache(), []

    def compute(x):
        calls.append(1)
        return x * 2

    x = torch.randn(4, 8)
    a = cache.lookup(x, ("s",), lambda: compute(x))
    assert cache.lookup(x, ("s",), lambda: compute(x)) is a and len(calls) == 1  # q, k, v: once
    assert cache.lookup(x, ("other",), lambda: compute(x)) is not a and len(calls) == 2  # another spec
    cache.lookup(x.clone(), ("other",), lambda: compute(x))  # equal values, another tensor: recomputed
    assert len(calls) == 3
    y = torch.randn(4, 8)
    cache.lookup(y, ("s",), lambda: compute(y))
    y.add_(1)  # changed in place: its version moved
    cache.lookup(y, ("s",), lambda: compute(y))
    assert len(calls) == 5
    del y  # the input dies: the kept result goes with it
    assert cache._out is None
