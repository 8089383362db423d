"""FP8 (E4M3), MXFP4 and NVFP4: grids, scale choice, methods, bad input, export and reload (ptqlab/formats.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptqlab.config import QuantConfig, from_flat
from ptqlab.experiment import ModelSession, check_execution, run
from ptqlab.export import load_quantized, load_with_transformers
from ptqlab.export.evaluate_saved import evaluate_saved
from ptqlab.formats import round_e2m1, round_e4m3
from ptqlab.methods import gptq_quantize, zq_local_quantize
from ptqlab.models import QuantLinear
from ptqlab.quantizers import (QuantizationError, QuantSpec, dequantize, fake_quantize, quantize,
                               storage_bits_per_weight, weight_codes, weight_qparams)

FP8, MX, NV = QuantSpec(fmt="fp8"), QuantSpec(fmt="mxfp4"), QuantSpec(fmt="nvfp4")


# ---------------------------------------------------------------- float64 references (independent of ptqlab)


def _grid(exp_bits: int, man_bits: int, bias: int, drop_top: int) -> list[float]:
    """Non-negative values of a small float format from its bit fields (subnormals at exponent 0), sorted; the
    top ``drop_top`` codes are NaN encodings (E4M3fn's S.1111.111)."""
    values = []
    for e in range(2**exp_bits):
        for m in range(2**man_bits):
            frac = m / 2**man_bits
            values.append(frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias))
    return values[: len(values) - drop_top]


E4M3 = _grid(4, 3, 7, 1)  # max 448
E2M1 = _grid(2, 1, 1, 0)  # 0, 0.5, ..., 6
assert E4M3[-1] == 448 and E2M1 == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def ref_round(y: float, grid: list[float]) -> float:
    """Nearest grid value, ties to the even code (consecutive codes alternate mantissa parity), saturating."""
    if math.isnan(y):
        return math.nan
    a = min(abs(y), grid[-1])
    best = min(range(len(grid)), key=lambda k: (abs(a - grid[k]), k % 2))
    return math.copysign(grid[best], y) if grid[best] else 0.0


def ref_round_tensor(y: torch.Tensor, grid: list[float]) -> torch.Tensor:
    return torch.tensor([ref_round(v, grid) for v in y.double().flatten().tolist()], dtype=torch.float64)


def ref_scale(group: list[float], fmt: str, tensor_amax: float) -> float:
    """The float64 scale rule of each format for one group (compressed-tensors' choices, ptqlab/formats.py)."""
    amax = max(abs(v) for v in group)
    if fmt == "nvfp4":  # zero blocks too: the smallest E4M3 block scale
        g = 2.0 ** math.floor(math.log2(448 * 6 / tensor_amax))
        return max(ref_round(g * amax / 6, E4M3), 2.0**-9) / g
    if amax == 0:
        return 1.0
    if fmt == "fp8":
        return float(torch.tensor(amax / 448, dtype=torch.float32))  # stored as float32
    if fmt == "mxfp4":
        e = math.floor(math.log2(amax))
        if amax / 2**e >= 1.75:  # round_to_power_2 with E2M1's one mantissa bit
            e += 1
        return 2.0 ** (e - 2)


def ref_fake_quantize(x: torch.Tensor, spec: QuantSpec, per_token: bool = False) -> torch.Tensor:
    """The reference of a whole fake quantization: scale choice per group, then the grid's rounding of the
    float32 quotient (the quantizer's defined arithmetic), decoded in float64."""
    grid = E4M3 if spec.fmt == "fp8" else E2M1
    rows = x.reshape(-1, x.shape[-1]).double()
    if spec.group_size == -1:
        rows_g = [[rows.flatten().tolist()]]
    else:
        g = spec.group_size or rows.shape[1]
        rows_g = [[r[i:i + g].tolist() for i in range(0, len(r), g)] for r in rows]
    tensor_amax = float(rows.abs().max())
    out = []
    for row in rows_g:
        t_amax = max(abs(v) for grp in row for v in grp) if per_token else tensor_amax
        for grp in row:
            s = ref_scale(grp, spec.fmt, t_amax if t_amax > 0 else 1.0)
            s32 = torch.tensor(s, dtype=torch.float32)
            q = ref_round_tensor(torch.tensor(grp, dtype=torch.float32) / s32, grid)
            out.extend((q * s).tolist())
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


# ---------------------------------------------------------------- element grids


def _edge_values(grid: list[float]) -> list[float]:
    mids = [(a + b) / 2 for a, b in zip(grid, grid[1:])]  # every tie
    near = [m + d for m in mids for d in (-1e-3 * m, 1e-3 * m)]
    return [0.0, -0.0, *grid, *mids, *near, grid[-1] * 1.01, grid[-1] * 100, math.inf, -math.inf, math.nan,
            *(-v for v in mids)]


@pytest.mark.parametrize("round_fn,grid", [(round_e4m3, E4M3), (round_e2m1, E2M1)], ids=["e4m3", "e2m1"])
def test_grid_rounding_edges_equal_the_reference(round_fn, grid):
    """Ties to even at every midpoint, subnormals, zero, saturation beyond the max, +-inf saturating, NaN kept."""
    y = torch.tensor(_edge_values(grid), dtype=torch.float32)
    got, ref = round_fn(y).double(), ref_round_tensor(y, grid)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.equal(got[ok], ref[ok])
    assert round_fn(torch.tensor([math.inf]))[0] == grid[-1] and round_fn(torch.tensor([-math.inf]))[0] == -grid[-1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-600, 600, allow_nan=False, width=32), min_size=1, max_size=40))
def test_grid_rounding_random_equal_the_reference(values):
    y = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(round_e4m3(y).double(), ref_round_tensor(y, E4M3))
    small = y / 64
    assert torch.equal(round_e2m1(small).double(), ref_round_tensor(small, E2M1))


# ---------------------------------------------------------------- fake quantization and scale choice


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 0, cols).roll(seed)  # groups of very different ranges
    w[0, :cols // 2] = 0  # all-zero groups (scale 1)
    w[1, 3] = 9.0  # an outlier
    w[2, :16] = torch.tensor([2.0**-20] * 16)  # a tiny group: E4M3 subnormal nvfp4 block scales
    return w


@pytest.mark.parametrize("spec", [FP8, QuantSpec(fmt="fp8", group_size=-1), MX, NV], ids=str)
@pytest.mark.parametrize("shape,seed", [((5, 64), 0), ((3, 96), 1), ((4, 32), 2)])
def test_fake_quantize_equals_the_float64_reference(spec, shape, seed):
    if shape[1] % max(spec.group_size, 1):
        pytest.skip("group does not divide")
    w = _weight(*shape, seed)
    got = fake_quantize(w, spec)
    assert got.dtype == w.dtype and torch.equal(got.double(), ref_fake_quantize(w, spec).float().double())
    assert torch.equal(fake_quantize(got, spec), got) or spec.fmt == "nvfp4"  # idempotent where scales are


@pytest.mark.parametrize("spec", [FP8, MX, NV], ids=str)
def test_activations_per_token_equal_the_reference(spec):
    """Activations: one scale per token (fp8), per block (mx/nv); nvfp4's second scale per token."""
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3)) * torch.tensor([1.0, 50.0, 1e-3])[None, :, None]
    got = fake_quantize(x, spec, activation=True)
    assert torch.equal(got.double(), ref_fake_quantize(x, spec, per_token=True).float().double())


def test_scales_match_compressed_tensors():
    """The scale rules are compressed-tensors' own: MX scales from generate_mx_scales, fp8's from calculate_qparams,
    and the nvfp4 grid decodes as its fake_quantize with (E4M3 scale, global scale) decodes."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4)) * torch.logspace(-2, 1, 64)
    amax = w.reshape(8, 2, 32).abs().amax(-1)
    mx_scale, _ = weight_qparams(w, MX)
    assert torch.equal(mx_scale, 2.0 ** (generate_mx_scales(amax) - 127))
    fp8_scale, _ = weight_qparams(w, FP8)
    args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
    ct_scale, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    assert torch.allclose(fp8_scale, ct_scale, rtol=2e-7, atol=0)
    ct_fp8 = ct_fake(w, fp8_scale, None, args)
    assert torch.equal(ct_fp8, fake_quantize(w, FP8))
    nv_scale, _ = weight_qparams(w, NV)
    from ptqlab.export.float_formats import split_nvfp4_scales

    local, g = split_nvfp4_scales(nv_scale)
    nv_args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True)
    assert torch.equal(ct_fake(w, local, None, nv_args, global_scale=g), fake_quantize(w, NV))


def test_real_quantization_codes_round_trip():
    w = _weight(4, 64, 5)
    for spec in (FP8, MX, NV):
        q = quantize(w, spec)
        assert torch.equal(dequantize(q), fake_quantize(w, spec))
        scale, zero = weight_qparams(w, spec)
        assert torch.equal(weight_codes(fake_quantize(w, spec), scale, zero, spec), q.codes)
        for dtype in (torch.float16, torch.bfloat16):  # codes recovered from the weight in the model dtype
            stored = fake_quantize(w.to(dtype), spec)
            s, z = weight_qparams(w.to(dtype), spec)
            assert torch.equal(weight_codes(stored, s, z, spec), quantize(w.to(dtype), spec).codes)


def test_non_finite_inputs_are_refused():
    x = torch.ones(2, 32)
    x[1, 5] = float("nan")
    for spec in (FP8, MX, NV):
        with pytest.raises(QuantizationError, match="non-finite"):
            fake_quantize(x, spec)


def test_bits_per_weight_count_every_scale():
    assert storage_bits_per_weight(FP8, 256, 64) == 8 + 16 / 256
    assert storage_bits_per_weight(QuantSpec(fmt="fp8", group_size=-1), 256, 64) == 8 + 16 / (256 * 64)
    assert storage_bits_per_weight(MX, 256, 64) == 4 + 8 / 32
    assert storage_bits_per_weight(NV, 256, 64) == 4 + 8 / 16 + 32 / (256 * 64)


# ---------------------------------------------------------------- specs, flags and bad input


def test_spec_defaults_and_names():
    assert (FP8.bits, FP8.group_size, MX.bits, MX.group_size, NV.bits, NV.group_size) == (8, 0, 4, 32, 4, 16)
    spec = from_flat({"model": "m", "wfmt": "nvfp4", "method": "gptq", "afmt": "fp8"})
    assert spec.config.weight == NV and spec.config.act == FP8
    assert spec.config.name() == "gptq W4A8 nvfp4-g16 act-fp8-e4m3-row"
    flat = spec.to_flat()
    assert (flat["wfmt"], flat["wbits"], flat["wgroup"], flat["afmt"], flat["abits"]) == ("nvfp4", 4, 16, "fp8", 8)
    assert from_flat(flat) == spec
    assert "wfmt" not in from_flat({"model": "m", "wbits": 4}).to_flat()  # int records and study keys unchanged


@pytest.mark.parametrize("flat,match", [
    ({"wfmt": "nvfp4", "wgroup": 128}, r"^--wfmt nvfp4 --wgroup 128: nvfp4 allows group size 16"),
    ({"wfmt": "mxfp4", "wgroup": 64}, r"^--wfmt mxfp4 --wgroup 64: mxfp4 allows group size 32"),
    ({"wfmt": "fp8", "wbits": 4}, r"^--wfmt fp8 --wbits 4: fp8 stores 8-bit values: bits must be 8"),
    ({"wfmt": "fp8", "wgroup": 128}, r"^--wfmt fp8 --wgroup 128: fp8 allows group size 0 \(per row/token\), -1"),
    ({"wfmt": "fp8", "wsym": False}, r"^--wfmt fp8 --wasym: fp8 .*cannot be asymmetric"),
    ({"afmt": "nvfp4", "agroup": 32, "wbits": 4}, r"^--afmt nvfp4 --agroup 32: nvfp4 allows group size 16"),
    ({"wfmt": "fp4"}, r"wfmt: bad value 'fp4': must be one of int, fp8, mxfp4, nvfp4"),
])
def test_bad_format_specs_are_clear_errors(flat, match):
    with pytest.raises(QuantizationError, match=match):
        from_flat({"model": "m", **flat})


def test_cli_names_the_flag_before_loading_anything(capsys):
    from ptqlab.cli import main

    assert main(["run", "--model", "no-such-model", "--wfmt", "nvfp4", "--wgroup", "128", "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert "--wfmt nvfp4" in err and "--wgroup 128" in err and "16" in err and "no-such-model" not in err


@pytest.mark.parametrize("flat,kwargs,match", [
    ({"wfmt": "fp8"}, {"kernel": "real", "device": "cuda"}, r"--kernel real: no real kernel runs --wfmt fp8"),
    ({"wfmt": "mxfp4", "afmt": "fp8"}, {"kernel": "real", "device": "cuda"},
     r"--kernel real: no real kernel runs --wfmt mxfp4 / --afmt fp8 by default"),
    ({"wfmt": "nvfp4", "afmt": "nvfp4"}, {"save": "SAVE"}, r"--save: .*--abits 16, not nvfp4-g16 activations"),
    ({"wfmt": "nvfp4", "afmt": "fp8"}, {"save": "SAVE"}, r"--save: .*nvfp4 weights are saved with --abits 16"),
    ({"wbits": 4, "afmt": "fp8"}, {"save": "SAVE"}, r"--save: .*integer weights with fp8 activations"),
    ({"wfmt": "fp8", "afmt": "int", "abits": 8}, {"save": "SAVE"}, r"--wfmt fp8 weights are saved with --abits 16, "
                                                                     r"--afmt fp8"),
])
def test_kernels_and_export_refuse_what_they_cannot_carry(flat, kwargs, match, tmp_path):
    spec = from_flat({"model": "testbed-opt-2m", **flat})
    kwargs = {k: str(tmp_path / "out") if v == "SAVE" else v for k, v in kwargs.items()}
    device = kwargs.pop("device", "cpu")
    with pytest.raises(ValueError, match=match):
        check_execution(spec, device, **kwargs)


def test_fp8_weights_and_activations_have_a_real_kernel():
    # W8A8 FP8 per channel / per token runs torch._scaled_mm in the triton family, the default; the tinygemm
    # family has none, and FP8 weight-only none at all: refused before the run, saying which one exists
    from ptqlab.kernels.real import kernel_for

    fp8 = QuantSpec(fmt="fp8")
    assert kernel_for(fp8, fp8) == kernel_for(fp8, fp8, "triton") == "w8a8-fp8"
    assert kernel_for(fp8, fp8, "tinygemm") is None
    check_execution(from_flat({"model": "testbed-opt-2m", "wfmt": "fp8", "afmt": "fp8"}), "cuda", kernel="real")
    with pytest.raises(ValueError, match="only FP8 weights per channel with FP8 activations per token have one"):
        check_execution(from_flat({"model": "testbed-opt-2m", "wfmt": "fp8"}), "cuda", kernel="real")


def test_recipe_cells_take_the_format_bits():
    from ptqlab.study.recipe import canonical_run, precision_label

    spec, _ = canonical_run({"model": "testbed-opt", "method": "gptq", "wfmt": "nvfp4"})
    assert (spec["wbits"], spec["wgroup"], spec["wfmt"]) == (4, 16, "nvfp4")
    assert precision_label(spec) == "W4A16 w:nvfp4 g16"
    fp16, _ = canonical_run({"model": "testbed-opt", "method": "fp16", "wfmt": "fp8"})
    assert fp16["method"] == "fp16" and fp16["wbits"] == 16 and "wfmt" not in fp16
    w8a8, _ = canonical_run({"model": "testbed-opt", "wfmt": "fp8", "afmt": "fp8"})
    assert precision_label(w8a8) == "W8A8 w:fp8 a:fp8"


# ---------------------------------------------------------------- methods on the format's grid


def _hessian(cols: int, seed: int) -> torch.Tensor:
    x = torch.randn(512, cols, generator=torch.Generator().manual_seed(seed)) @ torch.randn(cols, cols) * 0.3
    return 2 * x.t() @ x / x.shape[0]


@pytest.mark.parametrize("spec", [FP8, QuantSpec(fmt="fp8", group_size=-1), MX, NV], ids=str)
def test_gptq_and_zq_local_stay_on_the_format_grid_and_beat_rtn(spec):
    from ptqlab.methods.zeroquant import local_objective

    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(6)) * 0.1
    H = _hessian(64, 7)
    rtn = fake_quantize(w, spec)
    res = gptq_quantize(w, H, spec, blocksize=32)
    zq = zq_local_quantize(w, H, spec, steps=30)
    for q, scale in ((res.weight, res.scale), (zq.weight, zq.scale)):
        scale = scale.expand(w.shape[0], -1)
        values = weight_codes(q, scale, torch.zeros_like(scale), spec)
        step = w.shape[1] // scale.shape[1]
        assert torch.equal(values * scale.repeat_interleave(step, 1), q)  # on the grid of its recorded scales
        assert torch.equal(get_round(spec)(values), values)
    assert local_objective(w, res.weight, H) < local_objective(w, rtn, H)
    assert local_objective(w, zq.weight, H) <= local_objective(w, rtn, H)
    with pytest.raises(QuantizationError, match="Triton GPTQ kernel rounds to integer grids"):
        gptq_quantize(w, H, spec, use_triton=True)


def get_round(spec: QuantSpec):
    return round_e4m3 if spec.fmt == "fp8" else round_e2m1


# ---------------------------------------------------------------- the testbed: quality, save and reload

SEQLEN, WINDOWS = 128, 8  # quality comparisons
SAVE_SEQLEN, SAVE_WINDOWS = 64, 4  # save -> reload: equality, not quality


@pytest.fixture(scope="module")
def small():
    return ModelSession("testbed-opt-2m", "cpu", "float32", progress=False)


def _run(session, out=None, seqlen=SEQLEN, windows=WINDOWS, **flat):
    spec = from_flat({"model": session.name, "eval": "heldout", "seqlen": seqlen, "max_eval_windows": windows,
                      "nsamples": 8, "dtype": session.dtype_name, **flat})
    return run(spec, session, progress=False, save=None if out is None else str(out))


# FP8 E4M3 weights lose almost nothing, so there GPTQ and RTN differ by float noise, in either direction depending
# on the machine's BLAS (on the CI machine of session 31 GPTQ came out 5.6e-5 above RTN, 135.960 vs 135.952): a
# tolerance of 1e-4 relative for it; the 4-bit formats, where GPTQ's compensation matters, stay strict.
@pytest.mark.parametrize(("wfmt", "slack"), [("fp8", 1e-4), ("mxfp4", 0.0), ("nvfp4", 0.0)])
def test_gptq_never_worse_than_rtn_in_the_same_format(small, wfmt, slack):
    rtn = _run(small, wfmt=wfmt)
    gptq = _run(small, method="gptq", wfmt=wfmt)
    assert gptq["ppl"]["heldout"] <= rtn["ppl"]["heldout"] * (1 + slack), (gptq["ppl"], rtn["ppl"])


def test_fp8_w8a8_within_two_percent_of_fp16_on_testbed_opt():
    session = ModelSession("testbed-opt", "cpu", "float32", progress=False)
    fp16 = _run(session, method="fp16")
    fp8 = _run(session, wfmt="fp8", afmt="fp8")
    assert fp8["name"] == "rtn W8A8 fp8-e4m3-row act-fp8-e4m3-row"
    assert abs(fp8["ppl"]["heldout"] / fp16["ppl"]["heldout"] - 1) < 0.02
    assert fp8["ppl"]["heldout"] != fp16["ppl"]["heldout"]  # quantized at all


SAVED = {
    "fp8-w8a8": {"wfmt": "fp8", "afmt": "fp8"},
    "fp8-tensor-w8a8": {"wfmt": "fp8", "wgroup": -1, "afmt": "fp8", "agroup": -1},
    "mxfp4-w4a4": {"wfmt": "mxfp4", "afmt": "mxfp4"},
    "mxfp4": {"wfmt": "mxfp4"},
    "gptq-nvfp4": {"method": "gptq", "wfmt": "nvfp4"},
    "nvfp4-lorc4": {"wfmt": "nvfp4", "lorc_rank": 4},
    "zq-global-mxfp4": {"method": "zq-global", "wfmt": "mxfp4", "zq_steps": 3},
}


@pytest.fixture(scope="module")
def saved(small, tmp_path_factory):
    """Each format saved once by ``run --save`` (record, folder), for the reload and transformers tests."""
    root = tmp_path_factory.mktemp("formats")
    return {name: (_run(small, root / name, SAVE_SEQLEN, SAVE_WINDOWS, **flat), root / name)
            for name, flat in SAVED.items()}


@pytest.mark.parametrize("name", SAVED)
def test_save_reload_gives_the_recorded_ppl(saved, name):
    record, out = saved[name]
    loaded = evaluate_saved(str(out), ("heldout",), max_eval_windows=SAVE_WINDOWS, progress=False)
    assert loaded["ppl"] == record["ppl"]
    assert loaded["stored_bits_per_weight"] == record["stored_bits_per_weight"]
    elements = {"fp8": 8, "mxfp4": 4.25, "nvfp4": 4.5}[SAVED[name]["wfmt"]]
    lorc = 0.5 if SAVED[name].get("lorc_rank") else 0  # rank 4 x 8 bits on 128-wide layers
    assert elements <= record["bits_per_weight"] < elements + 0.1 + lorc


def test_transformers_reads_the_float_folders(saved):
    """Weight-only: the dense load (the helper's default) gives ptqlab's logits bit for bit in fp32. W8A8 fp8 on
    the compressed load: compressed-tensors' forward takes a 2-D input (OPT's fc1/fc2 flatten the tokens) as one
    tensor, so its logits are ptqlab's with those two layers' activations per tensor, exactly; per tensor
    everywhere, they are ptqlab's as they are."""
    import dataclasses

    ids = torch.randint(4, 4000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name in ("mxfp4", "gptq-nvfp4", "fp8-tensor-w8a8"):
            ours, _, _ = load_quantized(saved[name][1], adapter=False)
            assert torch.equal(load_with_transformers(saved[name][1])(input_ids=ids).logits,
                               ours(input_ids=ids).logits), name
        out = saved["fp8-w8a8"][1]
        ours, _, _ = load_quantized(out)
        per_token = ours(input_ids=ids).logits
        hf = load_with_transformers(out)(input_ids=ids).logits
        for name, layer in ours.named_modules():
            if isinstance(layer, QuantLinear) and name.endswith(("fc1", "fc2")):
                layer.act_spec = dataclasses.replace(layer.act_spec, group_size=-1)
        assert torch.equal(hf, ours(input_ids=ids).logits) and not torch.equal(hf, per_token)


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason="compressed-tensors 0.20 decompresses FP4 weights to "
                   "bf16 whatever the model dtype: the compressed load of an fp32 FP4 folder fails in its matmul")
def test_fp4_compressed_load_in_fp32(saved):
    load_with_transformers(saved["mxfp4"][1], dequantize=False)(input_ids=torch.ones(1, 8, dtype=torch.long))


def test_fp4_compressed_load_in_bf16_equals_ptqlab(tmp_path):
    """In bf16 transformers' compressed load runs FP4 folders, NVFP4 weights and MXFP4 W4A4 (its activations
    quantized by compressed-tensors' dynamic MX forward), with ptqlab's logits exactly."""
    session = ModelSession("testbed-opt-2m", "cpu", "bfloat16", progress=False)
    ids = torch.randint(4, 4000, (1, 64), generator=torch.Generator().manual_seed(1))
    for i, flat in enumerate(({"wfmt": "nvfp4"}, {"wfmt": "mxfp4", "afmt": "mxfp4"})):
        _run(session, tmp_path / str(i), SAVE_SEQLEN, 1, **flat)
        ours, _, _ = load_quantized(tmp_path / str(i), dtype=torch.bfloat16)
        with torch.no_grad():
            hf = load_with_transformers(tmp_path / str(i), dequantize=False)(input_ids=ids).logits
            assert torch.equal(hf, ours(input_ids=ids).logits), flat
