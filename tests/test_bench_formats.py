"""bench/formats.py (the GPU comparison of integer and float formats) on its CPU path: one tiny config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_formats_bench_quick_path_runs_and_writes_jsonl(tmp_path):
    out = tmp_path / "formats.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / "formats.py"), "--quick", "--device", "cpu",
           "--models", "testbed-opt-2m,testbed-opt-60m,not-a-testbed", "--out", str(out)]
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PTQLAB_TESTBED_CACHE": str(tmp_path / "no-cache"),
           "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    skipped = {r["model"]: r["skipped"] for r in lines if "skipped" in r}
    assert skipped == {"testbed-opt-60m": "not built in $PTQLAB_TESTBED_CACHE",
                       "not-a-testbed": "not a testbed family member"}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["model"], r["name"]) for r in rows] == [("testbed-opt-2m", "fp16 W16A16"),
                                                       ("testbed-opt-2m", "gptq W4A16 nvfp4-g16")]
    fp16, nvfp4 = rows
    assert fp16["bits_per_weight"] == 16 and 4.5 <= nvfp4["bits_per_weight"] < 4.51
    assert nvfp4["config"]["wfmt"] == "nvfp4" and nvfp4["ppl"]["heldout"] > fp16["ppl"]["heldout"] > 1
