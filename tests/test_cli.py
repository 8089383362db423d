"""The command line end to end on tiny offline models."""

from __future__ import annotations

import json

import pytest

from ptqlab.cli import main


@pytest.mark.parametrize("arch", ["opt", "bloom"])
def test_run_w4a8_rtn_g128_writes_a_record(arch, tiny_models, data_dir, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    args = ["run", "--model", str(tiny_models[arch]), "--method", "rtn", "--wbits", "4", "--wgroup", "128",
            "--abits", "8", "--eval", "wikitext2,ptb", "--seqlen", "128", "--max-eval-windows", "3",
            "--device", "cpu", "--data-dir", str(data_dir), "--output", str(out), "--no-progress"]
    assert main(args) == 0
    assert main(args) == 0  # appends
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    r = records[0]
    c = r["config"]
    assert (c["method"], c["wbits"], c["wsym"], c["wgroup"]) == ("rtn", 4, True, 128)
    assert (c["abits"], c["act_sym"], c["agroup"]) == (8, True, 0)
    assert "calib" not in c and "percdamp" not in c  # options RTN does not read are not part of its config
    assert c["seqlen"] == 128 and c["model"] == str(tiny_models[arch])
    assert r["eval_protocol"]["tokenization"].startswith("tokenizer defaults")
    assert set(r["ppl"]) == {"wikitext2", "ptb"} and all(v > 1 for v in r["ppl"].values())
    assert r["bits_per_weight"] == pytest.approx(4 + 16 / 128)
    assert r["time_s"] > 0
    assert set(r["versions"]) >= {"ptqlab", "torch", "transformers", "device"}
    assert r["execution"] == {"calib_batch": 8, "calib_offload": False}
    assert r["data_sources"]["wikitext2"].startswith("local:")
    assert r["ppl"] == records[1]["ppl"], "deterministic"
    assert "wikitext2" in capsys.readouterr().out


def test_make_tiny_then_run(tmp_path, data_dir):
    assert main(["make-tiny", "--arch", "llama", "--out", str(tmp_path / "m"), "--hidden", "64"]) == 0
    assert main(["run", "--model", str(tmp_path / "m"), "--method", "gptq", "--wbits", "3", "--wgroup", "32",
                 "--calib", str(data_dir / "ptb" / "ptb.valid.txt"), "--nsamples", "2", "--seqlen", "32",
                 "--eval", "ptb", "--max-eval-windows", "2", "--data-dir", str(data_dir), "--no-progress",
                 "--device", "cpu", "--calib-batch", "1", "--calib-offload", "--output", str(tmp_path / "r.jsonl")]) == 0
    record = json.loads((tmp_path / "r.jsonl").read_text())
    assert record["execution"] == {"calib_batch": 1, "calib_offload": True}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--wbits", "4", "--wgroup", "100"], "group size 100 does not divide"),
        (["--wbits", "9"], "must be an integer in 2..8"),
        (["--method", "gptq"], "give --wbits between 2 and 8"),
        (["--method", "gptq", "--wbits", "4", "--nsamples", "0", "--calib", "ptb"], "must be an integer >= 1"),
        (["--seqlen", "100000"], "beyond the maximum"),
        (["--calib-batch", "0"], "calibration batch must be at least 1"),
    ],
)
def test_bad_input_is_a_clear_error(extra, message, tiny_models, data_dir, capsys):
    code = main(["run", "--model", str(tiny_models["opt"]), "--eval", "ptb", "--max-eval-windows", "1",
                 "--seqlen", "64", "--data-dir", str(data_dir), "--no-progress", "--device", "cpu", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
