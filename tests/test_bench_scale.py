"""bench/bench_scale.py on a tiny shape on the CPU: every row has its phases, floors, memory and extrapolation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_scale  # noqa: E402


def test_scale_bench_runs_on_a_tiny_shape(tmp_path):
    assert bench_scale.main(["--shape", "tiny-opt", "--methods", "rtn,gptq+lorc-aware", "--layers", "1",
                             "--nsamples", "2", "--seqlen", "16", "--calib-batch", "2", "--device", "cpu",
                             "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "scale.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["rtn", "gptq+lorc-aware"]
    rtn, gptq = rows
    assert "error" not in rtn and "error" not in gptq, rows
    assert set(gptq["phases_s"]) >= {"capture", "hessian", "solve", "lorc", "propagate", "move", "log", "other"}
    # the phases cover the quantize_model call: only the call itself is left outside them
    assert 0 <= gptq["unaccounted_s"] < 0.01 + 0.02 * gptq["quantize_s"] and gptq["cleanup_s"] >= 0
    assert set(gptq["floor_per_layer_s"]) == {"hessian", "propagate", "solve", "lorc"}
    assert all(v >= 0 for v in gptq["floor_per_layer_s"].values())
    # the floors count what the shape implies: the Hessian phase's FLOPs include one forward of all tokens
    shape = bench_scale.SHAPES["tiny-opt"]
    params = sum(o * i for _, o, i, _ in bench_scale.block_linears(shape))
    assert gptq["floor_per_layer"]["hessian"]["flops"] > 2 * params * 2 * 16
    assert gptq["extrapolated_full_model_s"] >= gptq["quantize_s"] and gptq["layers_full"] == shape.layers
    assert gptq["peak_host_rss_gib"] > 0 and gptq["peak_gpu_gib"] is None
    assert "capture" not in rtn["phases_s"]  # RTN calibrates nothing
    assert json.loads((tmp_path / "rates.json").read_text())["bf16_flops"] > 0


def test_scale_bench_refuses_unknown_shapes(tmp_path):
    with pytest.raises(SystemExit):
        bench_scale.main(["--shape", "opt-7b", "--out", str(tmp_path)])
