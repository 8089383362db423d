"""On the GPU, in fp16 and bf16: SmoothQuant and AWQ models save and reload with their PPL; the rotation alone
keeps the model's PPL to the model dtype's rounding and computes the online Hadamard on CUDA as on the CPU."""

from __future__ import annotations

import pytest
import torch

from ptqlab.config import from_flat
from ptqlab.experiment import ModelSession, run
from ptqlab.export.evaluate_saved import evaluate_saved
from ptqlab.kernels.hadamard import hadamard_matrix, hadamard_transform

MODEL, SEQLEN, NSAMPLES, EVAL_BATCH = "testbed-opt", 512, 32, 8


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def session(request):
    return ModelSession(MODEL, "cuda", request.param, progress=False)


def _spec(session, **flat):
    return from_flat({"model": MODEL, "eval": ["heldout"], "seqlen": SEQLEN, "calib": "testbed",
                      "nsamples": NSAMPLES, "dtype": session.dtype_name, **flat})


@pytest.mark.parametrize("flat", [
    {"method": "gptq", "wbits": 8, "abits": 8, "transform": "smoothquant"},
    {"method": "rtn", "wbits": 4, "wgroup": 128, "transform": "awq"},
    {"method": "gptq", "wbits": 3, "wgroup": 128, "transform": "awq"},
])
def test_scaled_model_saves_and_reloads_with_its_ppl(session, flat, tmp_path):
    out = tmp_path / "saved"
    record = run(_spec(session, **flat), session, progress=False, eval_batch=EVAL_BATCH, save=str(out))
    reloaded = evaluate_saved(str(out), ("heldout",), device="cuda", dtype=session.dtype_name, progress=False,
                              eval_batch=EVAL_BATCH)
    assert reloaded["ppl"]["heldout"] == record["ppl"]["heldout"], record["name"]


def test_rotation_alone_keeps_the_ppl(session):
    base = run(_spec(session, method="fp16"), session, progress=False, eval_batch=EVAL_BATCH)["ppl"]["heldout"]
    rotated = run(_spec(session, method="fp16", transform="rotate"), session, progress=False,
                  eval_batch=EVAL_BATCH)["ppl"]["heldout"]
    assert rotated == pytest.approx(base, rel=5e-3 if session.dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 1024, 768])
def test_online_hadamard_on_cuda_equals_the_float64_product(dtype, n):
    x = torch.randn(37, n, device="cuda").to(dtype)
    ref = (x.double() @ hadamard_matrix(n).cuda()).to(dtype)
    got = hadamard_transform(x)
    assert got.dtype == dtype
    assert torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
