"""FP8, MXFP4 and NVFP4 on the GPU in fp16 and bf16: the fake quantizers against the float64 reference on CUDA
(compressed-tensors' Triton E2M1 rounding and torch's CUDA float8 cast are the paths taken there), and every
method measured, saved, reloaded and measured again with the same perplexity."""

from __future__ import annotations

import pytest
import torch

from ptqlab.config import from_flat
from ptqlab.experiment import ModelSession, run
from ptqlab.export.evaluate_saved import evaluate_saved
from ptqlab.quantizers import QuantSpec, fake_quantize, weight_codes, weight_qparams

from test_formats import ref_fake_quantize  # the CPU suite's float64 reference (tests/test_formats.py)

MODEL, SEQLEN, NSAMPLES, EVAL_BATCH = "testbed-opt", 512, 32, 8
SPECS = [QuantSpec(fmt="fp8"), QuantSpec(fmt="fp8", group_size=-1), QuantSpec(fmt="mxfp4"), QuantSpec(fmt="nvfp4")]
DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fake_quantize_on_cuda_equals_the_float64_reference(spec, dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(16, 256, generator=g) * torch.logspace(-3, 0, 256)).to(dtype)
    w[0, :64] = 0
    w[1, 7] = 20.0
    ref = ref_fake_quantize(w.float(), spec).float().to(dtype)  # the quantizer decodes in float32
    got = fake_quantize(w.cuda(), spec)
    assert got.dtype == dtype and torch.equal(got.cpu(), ref)
    scale, zero = weight_qparams(w.cuda(), spec)
    assert torch.equal(weight_codes(got, scale, zero, spec).cpu(),
                       weight_codes(ref, *weight_qparams(w, spec), spec))
    x = (torch.randn(2, 8, 256, generator=g) * 3).to(dtype)
    ref_x = ref_fake_quantize(x.float(), spec, per_token=True).float().to(dtype)
    assert torch.equal(fake_quantize(x.cuda(), spec, activation=True).cpu(), ref_x)


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def session(request):
    return ModelSession(MODEL, "cuda", request.param, progress=False)


CASES = [
    {"wfmt": "fp8", "afmt": "fp8"}, {"wfmt": "fp8", "wgroup": -1, "afmt": "fp8", "agroup": -1},
    {"wfmt": "mxfp4"}, {"wfmt": "nvfp4"}, {"wfmt": "mxfp4", "afmt": "mxfp4"},
    {"method": "gptq", "wfmt": "fp8", "afmt": "fp8"}, {"method": "gptq", "wfmt": "mxfp4"},
    {"method": "gptq", "wfmt": "nvfp4"}, {"method": "gptq", "wfmt": "nvfp4", "lorc_rank": 8},
    {"method": "zq-local", "wfmt": "nvfp4", "zq_steps": 20}, {"method": "zq-global", "wfmt": "mxfp4", "zq_steps": 20},
]


@pytest.mark.parametrize("flat", CASES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_float_formats_save_and_reload_with_their_ppl(session, flat, tmp_path):
    spec = from_flat({"model": MODEL, "eval": "heldout", "seqlen": SEQLEN, "calib": "testbed", "nsamples": NSAMPLES,
                      "dtype": session.dtype_name, **flat})
    out = tmp_path / "saved"
    record = run(spec, session, progress=False, eval_batch=EVAL_BATCH, save=str(out))
    reloaded = evaluate_saved(str(out), ("heldout",), device="cuda", dtype=session.dtype_name, progress=False,
                              eval_batch=EVAL_BATCH)
    assert reloaded["ppl"]["heldout"] == record["ppl"]["heldout"], (record["name"], session.dtype)
    assert reloaded["bits_per_weight"] == record["bits_per_weight"]
