"""The pipeline's block moves on CUDA (issue 22, ptqlab.moves): a model in host memory quantized on the GPU
with the host-reuse moves ends with the very tensors of the plain ``block.to`` moves (weights, codes' grids,
LoRC factors), back in the host storage its blocks had; the CUDA cache, no longer emptied after every block,
does not grow from block to block; and a streamed run (whose evaluation visits use the same moves) still
writes the in-memory run's checkpoint byte for byte, which is also the plain moves' checkpoint."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from ptqlab import QuantConfig, QuantSpec
from ptqlab import moves as moves_module
from ptqlab.data import calibration_windows
from ptqlab.models import QuantLinear, get_adapter, load_model
from ptqlab.pipeline import quantize_model

MODEL = "testbed-opt"
CONFIG = QuantConfig(method="gptq", weight=QuantSpec(4, True, 128), lorc_rank=8)  # LoRC: Parameters made on the GPU


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[f"{name}.weight_scale"], out[f"{name}.weight_zero"] = m.weight_scale, m.weight_zero
    return out


def _quantize(model, calib, moves: str, monkeypatch) -> tuple[dict, dict, dict]:
    """``(state, block parameter data_ptr before, after)`` of a copy of ``model`` quantized on cuda."""
    m = copy.deepcopy(model)
    before = {k: p.data_ptr() for k, p in get_adapter(m).blocks.named_parameters()}
    monkeypatch.setattr(moves_module, "DEFAULT", moves)
    report = quantize_model(m, CONFIG, calib, "cuda", progress=False, batch_size=8)
    print(f"{moves}: move {report.timings['move']:.4f}s of {sum(report.timings.values()):.3f}s")
    assert all(p.device.type == "cpu" for p in m.parameters()), moves
    after = {k: p.data_ptr() for k, p in get_adapter(m).blocks.named_parameters()}
    return _state(m), before, after


def _differences(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("moves", ["host-reuse", "staged"])
def test_host_reuse_moves_give_the_plain_moves_tensors_in_the_old_storage(monkeypatch, moves):
    model, tokenizer = load_model(MODEL, dtype=torch.float16)
    calib, _ = calibration_windows(tokenizer, "testbed", 32, 512, seed=0)
    plain, _, _ = _quantize(model, calib, "plain", monkeypatch)
    reuse, before, after = _quantize(model, calib, moves, monkeypatch)
    assert {k: after[k] for k in before} == before  # every block Parameter back in its host tensor
    assert any(k.endswith("lorc_u") for k in after)
    diff = _differences(plain, reuse)
    if diff:  # is the pipeline itself run-to-run deterministic here? (says which of the two failed)
        again, _, _ = _quantize(model, calib, "plain", monkeypatch)
        pytest.fail(f"{moves} moves differ from plain in {diff[:5]} ({len(diff)} tensors); plain vs plain "
                    f"differ in {len(_differences(plain, again))}")


def test_the_cache_does_not_grow_from_block_to_block(monkeypatch):
    model, tokenizer = load_model(MODEL, dtype=torch.float16)
    calib, _ = calibration_windows(tokenizer, "testbed", 32, 512, seed=0)
    reserved = []
    after_block = moves_module.HostReuseMoves.after_block

    def record(self, device):
        after_block(self, device)
        reserved.append(torch.cuda.memory_reserved(device))

    monkeypatch.setattr(moves_module.HostReuseMoves, "after_block", record)
    monkeypatch.setattr(moves_module, "DEFAULT", "host-reuse")
    torch.cuda.empty_cache()
    quantize_model(model, CONFIG, calib, "cuda", progress=False, batch_size=8)
    print(f"reserved after each block (MiB): {[round(r / 2**20, 1) for r in reserved]}")
    assert len(reserved) == len(get_adapter(model).blocks)
    # from the second block on the same shapes find their cached blocks: at most a settling segment (the
    # allocator's splits differ from block to block: since session 30's GPTQ inverse one 22 MiB segment comes at
    # block 3 of testbed-opt on the H200, [104, 106, 106, 128, 128, 128] MiB in a fresh process), and none in
    # the second half of the blocks, so nothing grows with the depth of the model
    assert max(reserved[1:]) <= reserved[1] * 1.02 + 32 * 2**20, reserved
    half = len(reserved) // 2
    assert max(reserved[half:]) == reserved[half], reserved


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_streamed_and_plain_checkpoints_are_the_host_reuse_one(tmp_path, monkeypatch):
    from ptqlab.cli import main

    run = ["run", "--model", "testbed-opt-2m", "--method", "gptq", "--wbits", "4", "--wgroup", "64", "--nsamples",
           "16", "--seqlen", "128", "--eval", "heldout", "--max-eval-windows", "4", "--no-progress", "--device",
           "cuda", "--lorc-rank", "4", "--lorc-aware"]
    target, out = tmp_path / "q", tmp_path / "runs.jsonl"  # one path: the adapter and the record name it
    files = {}
    for label, moves, how in (("host-reuse", "host-reuse", "--offload"), ("plain", "plain", "--offload"),
                              ("staged", "staged", "--offload"), ("streamed", "staged", "--stream")):
        monkeypatch.setattr(moves_module, "DEFAULT", moves)
        assert main([*run, how, "--save", str(target), "--output", str(out)]) == 0, label
        files[label] = _files(target)
        shutil.rmtree(target)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for label in ("plain", "staged", "streamed"):
        assert sorted(files[label]) == sorted(files["host-reuse"]), label
        assert [n for n in files[label] if files[label][n] != files["host-reuse"][n]] == [], label
    assert all(r["ppl"] == records[0]["ppl"] for r in records), [r["ppl"] for r in records]
