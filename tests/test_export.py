"""Deployable quantized models: packing, compressed-tensors folders, the LoRC adapter, reload, interoperability."""

from __future__ import annotations

import json
import shutil
import math
import struct
from pathlib import Path

import pytest
import torch

from ptqlab import LayerFilter, QuantConfig, QuantSpec, quantize_
from ptqlab.cli import main
from ptqlab.experiment import ModelSession, RunSpec, run
from ptqlab.export import (ExportError, LoadError, load_quantized, load_with_transformers, save_quantized,
                           stored_bits_per_weight)
from ptqlab.export.checkpoint import compress_layer, format_for, scheme_for
from ptqlab.export.evaluate_saved import evaluate_saved
from ptqlab.export.load import _quant_linear
from ptqlab.evaluate import perplexity
from ptqlab.export.pack import pack_codes, pack_zero_points, unpack_codes, unpack_zero_points
from ptqlab.models import QuantLinear, load_model
from ptqlab.quantizers import dequantize, quantize
from ptqlab.testbed import CALIBRATION_TEXT

# Short protocol: 4 windows of 128 tokens of the testbed's held-out text, 4 calibration windows.
SEQLEN, WINDOWS, NSAMPLES = 128, 4, 4
W4G128 = QuantSpec(4, True, 128)
A8 = QuantSpec(8, True, 0)


# ---------------------------------------------------------------- packing


def _reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Dense little-endian bit stream per row: unsigned code j at bits [j*bits, (j+1)*bits) of the row's int32
    words (compressed-tensors shifts its signed codes by 2**(bits-1) before packing: ptqlab's codes, as they are)."""
    rows, cols = codes.shape
    words = math.ceil(cols * bits / 32)
    out = torch.zeros(rows, words, dtype=torch.int32)
    for r in range(rows):
        acc = 0
        for j, c in enumerate(codes[r].tolist()):
            acc |= c << (j * bits)
        for w in range(words):
            out[r, w] = struct.unpack("<i", struct.pack("<I", (acc >> (32 * w)) & 0xFFFFFFFF))[0]
    return out


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 33), (5, 96)])
def test_pack_matches_a_bit_stream_reference_and_round_trips(bits, shape):
    g = torch.Generator().manual_seed(bits * 100 + shape[1])
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)
    codes[0, 0] = 0  # the edges of the range
    codes[-1, -1] = 2**bits - 1
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, _reference_pack(codes, bits))
    assert torch.equal(unpack_codes(packed, bits, shape), codes)
    zeros = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)
    packed_z = pack_zero_points(zeros, bits)  # packed along rows
    assert torch.equal(packed_z, _reference_pack(zeros.t().contiguous(), bits).t())
    assert torch.equal(unpack_zero_points(packed_z, bits, shape), zeros)


def _quantized_layer(out_f: int, in_f: int, spec: QuantSpec, act: QuantSpec = QuantSpec(), seed: int = 0):
    """A QuantLinear holding RTN codes of a random weight, with its grid (the pipeline's contract), and the codes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[0, :3] = torch.tensor([0.0, 0.3, -0.3])  # an outlier row and an exact zero
    q = quantize(w, spec)
    layer = QuantLinear(dequantize(q), torch.randn(out_f, generator=g), "layer")
    groups = in_f // spec.group_size if spec.group_size > 0 else 1
    layer.weight_scale = q.scale.reshape(-1, 1).expand(out_f, 1).contiguous() if spec.group_size == -1 else \
        q.scale.reshape(out_f, groups)
    layer.weight_zero = q.zero.reshape(-1, 1).expand(out_f, 1).contiguous() if spec.group_size == -1 else \
        q.zero.reshape(out_f, groups)
    layer.weight_spec, layer.act_spec = spec, act
    return layer, q


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [0, 32, -1])
def test_layer_round_trip_through_the_format_is_exact(bits, symmetric, group):
    """compressed-tensors' compressor writes ptqlab's codes; ptqlab's reader gives back codes, zero points and
    the weight decoded with the stored (fp16) scales, for odd row counts and every granularity."""
    spec = QuantSpec(bits, symmetric, group)
    act = A8 if bits == 8 and group == 0 else QuantSpec()  # int-quantized; other 8-bit cases pack
    layer, q = _quantized_layer(37, 96, spec, act, seed=bits)
    tensors = compress_layer("layer", layer)
    fmt = format_for(spec, act)
    linear = torch.nn.Linear(96, 37)
    loaded = _quant_linear("layer", linear, scheme_for(spec, act, ["Linear"]), fmt,
                           {f"layer.{k}": (v, Path("x")) for k, v in tensors.items()}, Path("config.json"), "x",
                           torch.float32)
    groups = loaded.weight_scale.shape[1]
    step = 96 // groups
    codes = torch.round(loaded.weight / loaded.weight_scale.repeat_interleave(step, 1)
                        + loaded.weight_zero.repeat_interleave(step, 1))
    assert torch.equal(codes.to(torch.uint8), q.codes)
    assert torch.equal(loaded.weight_zero, layer.weight_zero)
    stored_scale = layer.weight_scale.half().float()
    assert torch.equal(loaded.weight_scale, stored_scale)
    z, s = layer.weight_zero.repeat_interleave(step, 1), stored_scale.repeat_interleave(step, 1)
    expected = (q.codes.float() - z) * s
    assert torch.equal(loaded.weight, expected)
    assert loaded.weight_spec == spec and loaded.act_spec == act
    assert torch.allclose(loaded.weight, layer.weight, rtol=2e-3, atol=0)  # only the fp16 rounding of the scales


def test_weight_off_its_grid_is_refused():
    layer, _ = _quantized_layer(8, 64, QuantSpec(4, True, 32))
    layer.weight.data[3, 5] += 0.4 * layer.weight_scale[3, 0]
    with pytest.raises(ExportError, match=r"layer: weight \[3, 5\].*not on the grid"):
        compress_layer("layer", layer)


# ---------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def sessions():
    torch.manual_seed(0)
    return {m: ModelSession(m, "cpu", "float32", progress=False) for m in ("testbed-opt", "testbed-bloom")}


def _spec(model: str, config: QuantConfig) -> RunSpec:
    return RunSpec(model=model, config=config, eval=("heldout",), seqlen=SEQLEN, calib=str(CALIBRATION_TEXT),
                   nsamples=NSAMPLES, max_eval_windows=WINDOWS, dtype="float32")


CONFIGS = {
    "rtn": QuantConfig(method="rtn", weight=W4G128),
    "w8a8": QuantConfig(method="rtn", weight=QuantSpec(8, True, 0), act=A8),
}
# One block only (CI time: GPTQ's column loop on all six blocks is minutes on 2 CPU cores); the saved model then
# mixes quantized and full-precision linears. The whole-model round trip is measured in ptqlab/export/README.md.
GPTQ_LORC = {m: QuantConfig(method="gptq", weight=W4G128, lorc_rank=8, layers=LayerFilter.parse(f"block:{b}"))
             for m, b in (("testbed-opt", 1), ("testbed-bloom", 2))}


@pytest.mark.parametrize("model", ["testbed-opt", "testbed-bloom"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_run_save_then_reload_gives_the_recorded_ppl(model, name, sessions, tmp_path):
    out = tmp_path / "saved"
    record = run(_spec(model, CONFIGS[name]), sessions[model], progress=False, save=str(out))
    reloaded = evaluate_saved(str(out), ("heldout",), max_eval_windows=WINDOWS, progress=False)
    assert reloaded["config"]["seqlen"] == SEQLEN  # the saved run's window, from the ptqlab entry
    assert reloaded["ppl_at_save"] == record["ppl"]
    assert reloaded["ppl"]["heldout"] == record["ppl"]["heldout"]  # the same model, to the last bit
    saved = json.loads((out / "config.json").read_text())
    assert saved["ptqlab"]["record"]["config"]["method"] == CONFIGS[name].method
    expected_format = "int-quantized" if name == "w8a8" else "pack-quantized"
    assert saved["quantization_config"]["format"] == expected_format
    assert not (out / "adapter").exists()
    assert record["stored_bits_per_weight"] == pytest.approx(saved["ptqlab"]["storage"]["stored_bits_per_weight"])


def _heldout_ppl(model, session) -> float:
    tokens, _ = session.eval_tokens("heldout", SEQLEN)
    return perplexity(model, tokens, SEQLEN, "cpu", WINDOWS, progress=False)


@pytest.fixture(scope="module", params=["testbed-opt", "testbed-bloom"])
def gptq_lorc(request, tmp_path_factory, sessions):
    """A testbed model quantized GPTQ W4 g128 + LoRC 8 in memory, saved, with its PPLs with and without LoRC."""
    session = sessions[request.param]
    model, _ = load_model(request.param, torch.float32)
    windows, _ = session.calibration(str(CALIBRATION_TEXT), NSAMPLES, SEQLEN, 0)
    quantize_(model, GPTQ_LORC[request.param], windows, progress=False)
    out = tmp_path_factory.mktemp("export") / request.param
    stats = save_quantized(model, session.tokenizer, out)
    with_lorc = _heldout_ppl(model, session)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    factors = [(m.lorc_u, m.lorc_v) for m in layers]
    for m in layers:
        m.set_lorc(None, None)
    without = _heldout_ppl(model, session)
    for m, (u, v) in zip(layers, factors):
        m.set_lorc(u, v)
    return {"model": model, "out": out, "stats": stats, "ppl": with_lorc, "ppl_gptq": without, "session": session}


def test_gptq_and_lorc_reload_with_the_ppl_measured(gptq_lorc):
    """The base alone is the GPTQ model, base + adapter the GPTQ+LoRC model: both reload at their PPL."""
    loaded, _, _ = load_quantized(gptq_lorc["out"])
    assert _heldout_ppl(loaded, gptq_lorc["session"]) == gptq_lorc["ppl"]
    base, _, _ = load_quantized(gptq_lorc["out"], adapter=False)
    assert _heldout_ppl(base, gptq_lorc["session"]) == gptq_lorc["ppl_gptq"]
    assert gptq_lorc["ppl"] != gptq_lorc["ppl_gptq"]  # the adapter is there and changes the model


def _safetensors_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor, from the file's own header (not through ptqlab)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
    assert 8 + n + sum(sizes.values()) == len(raw)  # nothing else in the file
    return sizes


def test_stored_bits_per_weight_is_what_the_files_hold(gptq_lorc):
    model, out, stats = gptq_lorc["model"], gptq_lorc["out"], gptq_lorc["stats"]
    base = _safetensors_bytes(out / "model.safetensors")
    adapter = _safetensors_bytes(out / "adapter" / "adapter_model.safetensors")
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    weight_bytes = sum(b for k, b in base.items() if k.rpartition(".")[0] in quantized and ".weight" in k)
    params = sum(m.weight.numel() for n, m in model.named_modules() if n in quantized)
    assert stats["quantized_linear_bytes"] == weight_bytes
    assert stats["adapter_bytes"] == sum(adapter.values())
    assert stats["stored_bits_per_weight"] == pytest.approx(8 * (weight_bytes + sum(adapter.values())) / params)
    assert stored_bits_per_weight(model) == pytest.approx(stats["stored_bits_per_weight"])  # from shapes alone
    # W4 g128: 4 bits + a scale per 128 weights; int32 words hold 8 codes each exactly here
    scale_bits = {"float16": 16, "float32": 32}[stats["scale_dtype"]]
    assert 8 * weight_bytes / params == pytest.approx(4 + scale_bits / 128, abs=1e-3)
    assert weight_bytes <= 0.3 * 2 * params


def test_transformers_and_peft_load_the_saved_folder(gptq_lorc):
    """transformers (through compressed-tensors) runs the base with ptqlab's weights, both ways it reads the
    folder; PEFT adds LoRC exactly, on the dense load and on the default (compressed) load once decompressed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, out = gptq_lorc["model"], gptq_lorc["out"]
    ids = torch.randint(4, 8000, (1, 64), generator=torch.Generator().manual_seed(0))
    base_ptqlab, _, _ = load_quantized(out, adapter=False)
    compressed = AutoModelForCausalLM.from_pretrained(out)  # config.json says float32: the dtype measured in
    assert compressed.dtype == torch.float32
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        hf_base = compressed(input_ids=ids).logits  # decompresses on this first forward
        assert torch.equal(hf_base, base_ptqlab(input_ids=ids).logits)
        # the README's recipes, as written there
        dense = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
        with_lorc = PeftModel.from_pretrained(dense, str(out / "adapter"))(input_ids=ids).logits
        tol = 1e-5 * float(reference.abs().max())
        assert float((with_lorc - reference).abs().max()) < tol  # fp32 factors: only the LoRA op order differs
        for dequantize in (True, False):
            helper = load_with_transformers(out, dequantize=dequantize)
            assert float((helper(input_ids=ids).logits - reference).abs().max()) < tol
    assert float((hf_base - reference).abs().max()) > 100 * tol  # LoRC matters: the checks above are not vacuous


def test_peft_on_the_compressed_load_needs_it_decompressed(gptq_lorc):
    """The failure the README warns about, so that the recipe it gives instead stays needed (or is dropped)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    compressed = AutoModelForCausalLM.from_pretrained(gptq_lorc["out"])
    with pytest.raises(AttributeError, match="has no attribute 'weight'"):
        PeftModel.from_pretrained(compressed, str(gptq_lorc["out"] / "adapter"))


@pytest.fixture(scope="module")
def w8a8_folder(sessions, tmp_path_factory):
    out = tmp_path_factory.mktemp("w8a8") / "out"
    run(_spec("testbed-opt", CONFIGS["w8a8"]), sessions["testbed-opt"], progress=False, save=str(out))
    return out


def test_transformers_keeps_activation_quantization_only_on_the_compressed_load(w8a8_folder, sessions):
    """dequantize=True measures a W8A8 model as W8A16 with the transformers installed here (a warning says so;
    5.17 on an H200 kept the activations); the default helper load keeps the activation quantization
    (on compressed-tensors' grid, so not ptqlab's W8A8 figure either)."""
    ptqlab_w8a8, _, _ = load_quantized(w8a8_folder)
    session = sessions["testbed-opt"]
    with pytest.warns(UserWarning, match="can drop the saved activation quantization"):
        dense = load_with_transformers(w8a8_folder, dequantize=True)
    kept = load_with_transformers(w8a8_folder)
    w8a8 = _heldout_ppl(ptqlab_w8a8, session)
    for layer in ptqlab_w8a8.modules():
        if isinstance(layer, QuantLinear):
            layer.act_spec = QuantSpec()
    w8a16 = _heldout_ppl(ptqlab_w8a8, session)
    assert _heldout_ppl(dense, session) == pytest.approx(w8a16, rel=1e-6)
    with_acts = _heldout_ppl(kept, session)
    # activations quantized (on compressed-tensors' grid, so not ptqlab's W8A8 figure either)
    assert abs(with_acts / w8a16 - 1) > 1e-3 and with_acts != w8a8


def test_asymmetric_packed_weights_through_transformers(sessions, tmp_path):
    """What transformers reads of asymmetric pack-quantized folders: the dense load gives ptqlab's logits exactly;
    the compressed load is recorded as it behaves with the installed versions (transformers 5.x allocates one
    zero point per row, not the packed rows, and refuses the checkpoint on the CPU here)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "asym"
    config = QuantConfig(method="rtn", weight=QuantSpec(4, False, 128))
    run(_spec("testbed-opt", config), sessions["testbed-opt"], progress=False, save=str(out))
    ptqlab_model, _, _ = load_quantized(out)
    ids = torch.randint(4, 8000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = ptqlab_model(input_ids=ids).logits
        assert torch.equal(load_with_transformers(out)(input_ids=ids).logits, reference)
        try:
            compressed = AutoModelForCausalLM.from_pretrained(out)
        except RuntimeError as err:
            assert "mismatch" in str(err).lower()
            pytest.xfail("transformers' compressed load refuses asymmetric packed zero points (size mismatch)")
        assert torch.equal(compressed(input_ids=ids).logits, reference)


def test_run_save_and_run_model_dir_from_the_command_line(tmp_path, capsys):
    out, jsonl = tmp_path / "out", tmp_path / "r.jsonl"
    common = ["--eval", "heldout", "--seqlen", str(SEQLEN), "--max-eval-windows", str(WINDOWS), "--no-progress",
              "--device", "cpu", "--output", str(jsonl)]
    assert main(["run", "--model", "testbed-bloom", "--method", "rtn", "--wbits", "3", "--wgroup", "64", "--wasym",
                 "--save", str(out), *common]) == 0
    assert main(["run", "--model", str(out), *common]) == 0
    saved, loaded = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert loaded["ppl"]["heldout"] == pytest.approx(saved["ppl"]["heldout"], rel=1e-3)
    assert "when saved" in capsys.readouterr().out
    assert main(["run", "--model", str(out), "--wbits", "4", *common]) == 2  # already quantized
    assert "already quantized" in capsys.readouterr().err
    assert main(["run", "--model", "testbed-bloom", "--wbits", "4", "--save", str(out), *common]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err  # refused before quantizing
    assert main(["run", "--model", "testbed-bloom", "--abits", "8", "--save", str(tmp_path / "x"), *common]) == 2
    assert "no quantized model to save" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input


def test_saving_an_unquantized_or_unsupported_model_is_a_clear_error(tmp_path, sessions):
    model, tok = load_model("testbed-opt", torch.float32)
    with pytest.raises(ExportError, match="no quantized weights"):
        save_quantized(model, tok, tmp_path / "a")
    quantize_(model, QuantConfig(method="rtn", act=A8))
    with pytest.raises(ExportError, match=r"W16A8.*no integer activation-only scheme"):
        save_quantized(model, tok, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert stored_bits_per_weight(model) is None


def test_an_interrupted_save_leaves_nothing(gptq_lorc, tmp_path):
    model = gptq_lorc["model"]

    class Tokenizer:
        def save_pretrained(self, path):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, Tokenizer(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        save_quantized(model, None, tmp_path / "full")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_broken_folders_are_clear_errors_naming_the_file(gptq_lorc, tmp_path):
    out = gptq_lorc["out"]
    missing = _copy(out, tmp_path / "missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(LoadError, match=r"missing/model\.safetensors: file missing"):
        load_quantized(missing)

    truncated = _copy(out, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"truncated/model\.safetensors: its sha256 is not the one recorded"):
        load_quantized(truncated)
    with pytest.raises(LoadError, match=r"truncated/model\.safetensors: not a readable safetensors file"):
        load_quantized(truncated, verify=False)

    for field, value, message in [("group_size", 64, r"weight_scale has shape"),
                                  ("num_bits", 3, r"packed codes of shape"),
                                  ("symmetric", False, r"no tensor '.*weight_zero_point'")]:
        wrong = _copy(out, tmp_path / f"wrong-{field}")
        config = json.loads((wrong / "config.json").read_text())
        config["quantization_config"]["config_groups"]["group_0"]["weights"][field] = value
        (wrong / "config.json").write_text(json.dumps(config))
        with pytest.raises(LoadError, match=rf"wrong-{field}/(model\.safetensors|config\.json).*{message}"):
            load_quantized(wrong)  # config.json holds the digests: editing it is not caught by them

    bad_adapter = _copy(out, tmp_path / "adapter-rank")
    config = json.loads((bad_adapter / "adapter" / "adapter_config.json").read_text())
    config["r"] = 4
    (bad_adapter / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"adapter/adapter_config\.json: its sha256 is not the one recorded"):
        load_quantized(bad_adapter)
    with pytest.raises(LoadError, match=r"adapter_model\.safetensors.*rank 8/8 but adapter_config\.json says 4"):
        load_quantized(bad_adapter, verify=False)


def test_a_flipped_byte_or_a_lost_adapter_is_caught_on_load(gptq_lorc, tmp_path):
    """Each file is checked against the sha256 recorded at save time; a LoRC record without its adapter is an
    error rather than another model under the same name."""
    out = gptq_lorc["out"]
    flipped = _copy(out, tmp_path / "flipped")
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's bytes: the file still parses
    (flipped / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LoadError, match=r"flipped/model\.safetensors: its sha256 is not the one recorded"):
        load_quantized(flipped)
    load_quantized(flipped, verify=False)  # the opt-out: it parses, and loads a (different) model

    no_adapter = _copy(out, tmp_path / "no-adapter")
    shutil.rmtree(no_adapter / "adapter")
    with pytest.raises(LoadError, match=r"no-adapter/adapter/adapter_config\.json: file missing, but the folder "
                                        r"was saved with LoRC rank 8"):
        load_quantized(no_adapter)
    with pytest.raises(LoadError, match=r"file missing, but the folder was saved with LoRC"):
        load_quantized(no_adapter, verify=False)
    base, _, _ = load_quantized(no_adapter, adapter=False)  # asked for: the base alone
    assert all(m.lorc_u is None for m in base.modules() if isinstance(m, QuantLinear))


def test_saving_the_same_model_twice_writes_the_same_bytes(gptq_lorc, tmp_path):
    """A save is reproducible: sorted adapter targets, the folder's absolute path as the adapter's base, no
    wall-clock times in the saved record."""
    session = gptq_lorc["session"]
    record = {"name": "x", "ppl": {"heldout": 1.0}, "time_s": 1.0, "timings": {"quantize": 1.0}, "layers": []}
    first = tmp_path / "first"
    save_quantized(gptq_lorc["model"], session.tokenizer, first, record)
    files = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    save_quantized(gptq_lorc["model"], session.tokenizer, first, {**record, "time_s": 2.0}, overwrite=True)
    again = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert again == files
    adapter = json.loads((first / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == sorted(adapter["target_modules"])
    assert adapter["base_model_name_or_path"] == str(first.resolve())
    saved = json.loads((first / "config.json").read_text())["ptqlab"]["record"]
    assert "time_s" not in saved and "timings" not in saved and saved["ppl"] == {"heldout": 1.0}


def test_a_folder_saved_without_a_record_reports_its_bits_per_weight(gptq_lorc):
    """Folders from the Python API (no record) or other tools: bits/w from the loaded tensors, not nan."""
    from ptqlab.pipeline import model_bits_per_weight

    record = evaluate_saved(str(gptq_lorc["out"]), ("heldout",), max_eval_windows=1, progress=False)
    loaded, _, entry = load_quantized(gptq_lorc["out"])
    assert "record" not in entry
    assert math.isfinite(record["bits_per_weight"])
    assert record["bits_per_weight"] == model_bits_per_weight(loaded)
    # one block of six quantized at W4 g128 + fp16 LoRC factors, the rest counted at 16 bits
    assert 4.125 < record["bits_per_weight"] < 16
