"""Block moves (ptqlab.moves): a block's results come back into the host tensors it left, with the values the
plain ``block.to`` moves give; on the CPU nothing changes. The CUDA path itself:
tests/gpu/test_gpu_pipeline_moves.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ptqlab import QuantConfig, QuantSpec
from ptqlab import moves as moves_module
from ptqlab.data import calibration_windows
from ptqlab.models import QuantLinear, get_adapter, load_model
from ptqlab.moves import HostReuseMoves, block_moves
from ptqlab.pipeline import quantize_model


def _block(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(37, 129), nn.LayerNorm(129), nn.Linear(129, 5, bias=False)).to(dtype)


def _emulate_device(block: nn.Module) -> None:
    """What the device does to a block: every tensor in memory of its own, and the method's new values."""
    for p in block.parameters():
        p.data = (p.data * 3 - 1).clone()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_results_come_back_into_the_host_tensors_they_left(dtype):
    block = _block(dtype)
    params = list(block.parameters())
    ptrs = [p.data_ptr() for p in params]
    expected = [p.detach() * 3 - 1 for p in params]
    moves = HostReuseMoves()
    moves.keep(block)
    _emulate_device(block)
    assert all(p.data_ptr() != ptr for p, ptr in zip(params, ptrs))  # the emulation did move them
    moves.to_host(block)
    assert list(block.parameters()) == params  # the same Parameters, as block.to keeps them
    for p, ptr, want in zip(params, ptrs, expected):
        assert p.device.type == "cpu" and p.dtype == dtype and p.data_ptr() == ptr
        assert torch.equal(p.data, want)


def test_tensors_it_cannot_reuse_keep_the_plain_result():
    """A new Parameter (LoRC factors), one whose shape changed and two viewing one storage: as block.to."""
    block = _block(torch.float32)
    lin, norm = block[0], block[1]
    shared = torch.randn(2 * 129)
    norm.weight.data, norm.bias.data = shared[:129], shared[100:229]  # overlapping views: writing one changes both
    shared_before = shared.clone()
    reusable = {"0.weight": lin.weight.data_ptr(), "2.weight": block[2].weight.data_ptr()}
    moves = HostReuseMoves()
    moves.keep(block)
    _emulate_device(block)
    lin.bias.data = torch.randn(7)  # the work replaced a tensor by one of another shape
    block[2].lorc_u = nn.Parameter(torch.randn(5, 2), requires_grad=False)  # and created one
    new = {name: (p.data_ptr(), p.detach().clone()) for name, p in block.named_parameters()}
    moves.to_host(block)
    for name, p in block.named_parameters():
        if name in reusable:
            assert p.data_ptr() == reusable[name], name  # back in its host tensor
        else:
            assert p.data_ptr() == new[name][0], name  # left in the tensor the work made
        assert torch.equal(p.data, new[name][1]), name
    assert torch.equal(shared, shared_before)  # the aliased host storage was not written


def test_on_the_cpu_nothing_is_kept_or_copied():
    block = _block(torch.float32)
    moves = HostReuseMoves()
    moves.to_device(block, torch.device("cpu"))
    assert moves._host == {}
    _emulate_device(block)  # on the CPU the work's own tensors stay, as block.to("cpu") leaves them
    new = [p.data_ptr() for p in block.parameters()]
    moves.to_host(block)
    assert [p.data_ptr() for p in block.parameters()] == new


def test_unknown_moves_are_refused():
    with pytest.raises(ValueError, match="unknown block moves 'teleport'; known: host-reuse, plain, staged"):
        block_moves("teleport")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[f"{name}.weight_scale"], out[f"{name}.weight_zero"] = m.weight_scale, m.weight_zero
    return out


def test_quantize_model_on_the_cpu_is_the_plain_moves_result(data_dir, monkeypatch):
    """GPTQ W4 g64 with LoRC on testbed-opt-2m: the same tensors as with the plain moves, on the CPU, in the
    host storage the blocks had before (on the CPU quantization writes in place either way)."""
    model, tokenizer = load_model("testbed-opt-2m", dtype=torch.float32)
    calib, _ = calibration_windows(tokenizer, str(data_dir / "ptb" / "ptb.valid.txt"), 4, 64, seed=1)
    config = QuantConfig(method="gptq", weight=QuantSpec(4, True, 64), lorc_rank=4)
    results = {}
    for name in ("plain", "host-reuse", "staged"):
        m = copy.deepcopy(model)
        ptrs = {k: p.data_ptr() for k, p in get_adapter(m).blocks.named_parameters()}
        monkeypatch.setattr(moves_module, "DEFAULT", name)
        report = quantize_model(m, config, calib, "cpu", progress=False, batch_size=2)
        assert report.timings["move"] >= 0
        blocks = dict(get_adapter(m).blocks.named_parameters())
        assert all(p.device.type == "cpu" for p in m.parameters())
        assert {k: blocks[k].data_ptr() for k in ptrs} == ptrs
        assert any(k.endswith("lorc_u") for k in blocks)
        results[name] = _state(m)
    for name in ("host-reuse", "staged"):
        assert results["plain"].keys() == results[name].keys()
        for k, v in results["plain"].items():
            assert torch.equal(v, results[name][k]), (name, k)
