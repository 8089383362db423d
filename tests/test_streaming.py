"""Streaming quantization (``ptqlab run --stream --save``): blocks read from the memory-mapped checkpoint one at a
time and written out as they finish; the checkpoint is the in-memory path's, byte for byte."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from ptqlab.cli import main

RUN = ["run", "--model", "testbed-opt-2m", "--method", "gptq", "--wbits", "4", "--wgroup", "64", "--nsamples", "16",
       "--seqlen", "128", "--eval", "heldout", "--max-eval-windows", "4", "--no-progress", "--device", "cpu",
       "--lorc-rank", "4", "--lorc-aware"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("model", ["testbed-opt-2m", "testbed-llama-2m"])  # learned positions; rotary, GQA, RMSNorm
def test_streamed_checkpoint_is_the_in_memory_one_byte_for_byte(model, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("PTQLAB_DATA", str(data_dir))
    target = tmp_path / "q"  # both runs save to the same path: the adapter and the record name it
    out = tmp_path / "runs.jsonl"
    run = [RUN[0], "--model", model, *RUN[3:]]
    assert main([*run, "--offload", "--save", str(target), "--output", str(out)]) == 0
    in_memory = _files(target)
    shutil.rmtree(target)
    assert main([*run, "--stream", "--save", str(target), "--output", str(out)]) == 0
    streamed = _files(target)
    assert sorted(in_memory) == sorted(streamed)
    assert "adapter/adapter_model.safetensors" in streamed  # LoRC factors kept through the stream
    for name in in_memory:
        assert in_memory[name] == streamed[name], name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.")]  # the block files are gone
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert first["ppl"] == second["ppl"] and first["window_nll"] == second["window_nll"]
    memory = second["memory"]
    assert memory["streamed"] and memory["peak_host_rss_gib"] > 0 and first["memory"]["peak_host_rss_gib"] > 0
    # never more than one block's tensors resident at once
    assert 0 < memory["peak_resident_block_bytes"] == memory["largest_block_bytes"]


def test_at_most_one_block_is_resident(tmp_path, data_dir, monkeypatch):
    """Count the blocks holding real tensors each time one is loaded: never more than the one being quantized."""
    from ptqlab.config import RunSpec
    from ptqlab.experiment import run
    from ptqlab.streaming import StreamedBlocks, StreamSession
    from ptqlab import QuantConfig, QuantSpec

    seen = []
    load = StreamedBlocks.load

    def counting(self, index, block):
        load(self, index, block)
        seen.append(sum(any(t.device.type != "meta" for t in b.parameters()) for b in self.adapter.blocks))

    monkeypatch.setattr(StreamedBlocks, "load", counting)
    session = StreamSession("testbed-opt-2m", "cpu", data_dir=str(data_dir), progress=False)
    assert all(p.device.type == "meta" for b in session.adapter.blocks for p in b.parameters())
    spec = RunSpec(model="testbed-opt-2m", config=QuantConfig(method="rtn", weight=QuantSpec(4, True, 64)),
                   eval=("heldout",), seqlen=128, max_eval_windows=2)
    record = run(spec, session, progress=False, save=str(tmp_path / "q"))
    assert seen == [1] * len(session.adapter.blocks)
    assert all(p.device.type == "meta" for b in session.adapter.blocks for n, p in b.named_parameters()
               if not n.endswith(("lorc_u", "lorc_v")))
    assert record["ppl"]["heldout"] > 1


def test_too_little_disk_is_refused_before_the_first_block(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("PTQLAB_DATA", str(data_dir))
    import ptqlab.streaming as streaming

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(streaming.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    loaded = []
    monkeypatch.setattr(streaming.StreamSession, "load_block", lambda self, i, b: loaded.append(i))
    assert main([*RUN, "--stream", "--save", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "--stream: writing" in err and "free on its filesystem" in err and "is free there" in err, err
    assert loaded == [] and not (tmp_path / "q").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra, message", [
    ([], "--stream writes each quantized block to the checkpoint as it goes: it needs --save DIR"),
    (["--save", "X", "--metrics", "ppl,kld"], "--stream cannot run with --metrics kld"),
    (["--save", "X", "--save-format", "compressed-tensors", "--kernel", "auto"], "--stream cannot run with --kernel auto"),
    (["--save", "X", "--speed"], "--stream cannot run with --speed"),
])
def test_stream_refuses_what_it_cannot_do(extra, message, tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("PTQLAB_DATA", str(data_dir))
    args = [a.replace("X", str(tmp_path / "q")) for a in extra]
    assert main([*RUN, "--stream", *args]) == 2
    assert message in capsys.readouterr().err


def test_safetensors_writer_matches_save_file(tmp_path):
    from safetensors.torch import save_file

    from ptqlab.streaming import write_safetensors

    tensors = {"b.weight_scale": torch.rand(3, 2).half(), "a.weight_packed": torch.randint(0, 9, (3, 1), dtype=torch.int32),
               "c.weight_shape": torch.tensor([3, 8]), "z": torch.rand(5), "y": torch.randint(0, 9, (3,), dtype=torch.uint8),
               "x": torch.rand(2).bfloat16(), "e8": torch.rand(2).to(torch.float8_e4m3fn), "empty": torch.ones(0, 4),
               "i8": torch.tensor([-1, 2], dtype=torch.int8)}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    write_safetensors({k: (v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()},
                      tmp_path / "b.safetensors", {"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
