"""bench/bench_stream.py on the tiny-opt shape on the CPU: the random sharded checkpoint reads back through
transformers, the streamed run's row has its times, memory and bytes, and the saved folder reloads in ptqlab."""

from __future__ import annotations

import json
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_stream  # noqa: E402

from ptqlab.cli import main as ptqlab_main  # noqa: E402

RUN = ["--shape", "tiny-opt", "--method", "rtn", "--eval", "heldout", "--nsamples", "4", "--seqlen", "32",
       "--max-eval-windows", "2", "--device", "cpu", "--shard-mb", "1"]


def test_stream_bench_on_a_tiny_shape(tmp_path, data_dir, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("PTQLAB_DATA", str(data_dir))
    work, out = tmp_path / "work", tmp_path / "out"
    assert bench_stream.main([*RUN, "--workdir", str(work), "--keep", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in (out / "stream.jsonl").read_text().splitlines()]
    assert "error" not in row, row
    ckpt = row["checkpoint"]
    folder = work / "random-tiny-opt"
    # sharded as the hub lays it out (1 MiB shards of a 4 MiB model), every tensor in the index
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert ckpt["shards"] == len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == ckpt["tensor_bytes"] == 2 * ckpt["params"]
    assert ckpt["bytes"] == sum(p.stat().st_size for p in folder.iterdir()) > ckpt["tensor_bytes"]
    assert ckpt["write_s"] > 0 and ckpt["write_peak_host_rss_gib"] > 0
    # transformers reads it as written: every stored tensor, the tied head as the embeddings
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state) - {"lm_head.weight"}
    for name, file in index["weight_map"].items():
        with safe_open(str(folder / file), framework="pt") as f:
            assert torch.equal(f.get_tensor(name), state[name]), name
    assert torch.equal(model.lm_head.weight, state["model.decoder.embed_tokens.weight"])
    w = state["model.decoder.layers.0.fc1.weight"].float()
    assert 0.015 < w.std() < 0.025 and torch.equal(state["model.decoder.layers.0.fc1.bias"], torch.zeros(512).half())
    # the streamed run's row
    assert row["exit_code"] == 0 and row["stream_wall_s"] > 0 and row["ptqlab_time_s"] > 0
    assert row["peak_host_rss_gib"] >= row["host_rss_at_start_gib"] > 0 and row["peak_host_rss_above_start_gib"] >= 0
    assert set(row["peak_rss_split_gib"]) >= {"RssAnon", "RssFile"} and row["peak_rss_split_gib"]["RssAnon"] > 0
    assert row["peak_gpu_gib"] is None and row["disk_high_water_gib"] >= 0
    saved = work / "q-rtn"
    assert row["saved_bytes"] == sum(p.stat().st_size for p in saved.rglob("*") if p.is_file()) > 0
    memory = row["ptqlab_memory"]
    assert memory["streamed"] and 0 < memory["peak_resident_block_bytes"] == memory["largest_block_bytes"]
    assert not [p for p in work.iterdir() if p.name.startswith(".q-rtn.")]  # ptqlab removed its block files
    # the saved folder reloads through ptqlab's loader and evaluates to the streamed run's perplexity
    records = tmp_path / "saved.jsonl"
    assert ptqlab_main(["run", "--model", str(saved), "--eval", "heldout", "--seqlen", "32", "--max-eval-windows",
                        "2", "--device", "cpu", "--no-progress", "--output", str(records)]) == 0
    reloaded = json.loads(records.read_text())
    assert reloaded["ppl"]["heldout"] == pytest.approx(row["ppl"]["heldout"], rel=1e-4)


def test_stream_bench_removes_its_checkpoint_unless_kept(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("PTQLAB_DATA", str(data_dir))
    work = tmp_path / "work"
    monkeypatch.setattr(bench_stream, "stream_one", lambda ckpt, info, a, method, workdir: {"method": method})
    assert bench_stream.main([*RUN, "--workdir", str(work), "--out", str(tmp_path / "out")]) == 0
    assert list(work.iterdir()) == []


def test_stream_bench_refuses_bad_input_before_writing(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        bench_stream.main(["--shape", "opt-7b", "--out", str(tmp_path / "o")])
    assert "--shape opt-7b: unknown" in capsys.readouterr().err
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(bench_stream.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 2**30, 2**30))
    with pytest.raises(SystemExit):
        bench_stream.main(["--shape", "opt-6.7b", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert "checkpoint needs 12.4 GiB, 1.0 GiB free" in capsys.readouterr().err
    assert list((tmp_path / "w").iterdir()) == []
