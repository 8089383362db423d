"""The command line end to end on tiny offline models."""

from __future__ import annotations

import json

import pytest
import torch

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
        (["--calib-batch", "0"], "--calib-batch must be at least 1 window"),
    ],
)
def test_bad_input_is_a_clear_error(extra, message, tiny_models, data_dir, capsys):
    code = main(["run", "--model", str(tiny_models["opt"]), "--eval", "ptb", "--max-eval-windows", "1",
                 "--seqlen", "64", "--data-dir", str(data_dir), "--no-progress", "--device", "cpu", *extra])
    assert code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- bad input, caught before the model loads


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model fails the test: the checks under test must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr("ptqlab.experiment.load_model", refuse)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("extra, message", [
    (["--eval-batch", "0"], "--eval-batch must be at least 1 window, got 0"),
    (["--calib-batch", "-1"], "--calib-batch must be at least 1 window"),
    (["--kernel", "real"], "--kernel real needs the model on a CUDA device (got cpu)"),
    (["--kernel", "fast"], "invalid choice: 'fast'"),
    (["--device", "gpu"], "'gpu': give cpu, cuda or cuda:N"),
    (["--dtype", "fp8"], "must be one of auto"),
    (["--seqlen", "100000"], "seqlen 100000 is beyond the maximum"),
    (["--method", "gptq", "--wbits", "4", "--calib-seqlen", "1"], "omit --calib-seqlen for the default (--seqlen)"),
    (["--eval", "wikitext2", "--data-dir", "{tmp}"], "dataset 'wikitext2' is not available"),
    (["--overwrite"], "--overwrite replaces the folder of --save; give --save DIR"),
    (["--wbits", "4", "--save", "{tmp}/out", "--kernel", "auto"], "save with --kernel fake"),
    (["--wbits", "4", "--save", "{model}"], "would replace the model folder"),
])
def test_every_option_is_checked_before_the_model_loads(extra, message, tiny_models, data_dir, tmp_path, capsys,
                                                        no_model_loading):
    extra = [x.replace("{tmp}", str(tmp_path)).replace("{model}", str(tiny_models["opt"])) for x in extra]
    code = main(["run", "--model", str(tiny_models["opt"]), "--eval", "ptb", "--max-eval-windows", "1",
                 "--seqlen", "64", "--data-dir", str(data_dir), "--no-progress", "--device", "cpu", *extra])
    assert code == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_seqlen_errors_say_how_to_get_the_default_in_the_words_of_each_place(capsys):
    from ptqlab.study.recipe import RecipeError, parse_assignments

    assert main(["run", "--seqlen", "0"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "must be an integer >= 2; omit --seqlen for the default (the model's maximum" in line
    assert "null" not in line
    with pytest.raises(RecipeError, match="null for the default"):  # a recipe / --set value can say null
        parse_assignments("seqlen=0", "--set", as_axes=False)


def test_too_many_calibration_windows_for_memory_fail_before_loading(monkeypatch, capsys, no_model_loading):
    from ptqlab.preflight import GIB

    monkeypatch.setattr("ptqlab.experiment.available_memory", lambda device: 8 * GIB)
    code = main(["run", "--model", "testbed-opt", "--method", "gptq", "--wbits", "4", "--nsamples", "100000",
                 "--eval", "heldout", "--device", "cpu", "--no-progress"])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "calibration needs about 97.7 GiB of host memory" in line and "100000 windows x 512 tokens" in line
    assert "8.0 GiB is free" in line and "(8192 windows fit)" in line
    for way in ("--nsamples", "--calib-seqlen", "--calib-offload", "--calib-batch"):
        assert way in line


def test_more_calibration_windows_than_the_text_holds(capsys):
    code = main(["run", "--model", "testbed-opt", "--method", "gptq", "--wbits", "4", "--nsamples", "1000",
                 "--eval", "heldout", "--max-eval-windows", "1", "--device", "cpu", "--no-progress"])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "has 76679 tokens: 149 windows of 512 tokens without overlap" in line
    assert "pass --nsamples 149 or fewer" in line


@pytest.mark.parametrize("content, message", [
    (b"caf\xe9 au lait\n" * 50, "is not UTF-8: byte 0xe9 at offset 3"),
    (b"", "is empty"),
    (b"  \n\n", "is empty (only whitespace)"),
    (b"a few words only\n", "too few for one window of 64 tokens (that needs at least 65)"),
])
def test_unusable_calibration_file_names_file_role_and_fix(content, message, tiny_models, data_dir, tmp_path,
                                                           capsys):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    code = main(["run", "--model", str(tiny_models["opt"]), "--method", "gptq", "--wbits", "4", "--calib", str(calib),
                 "--nsamples", "2", "--eval", "ptb", "--max-eval-windows", "1", "--seqlen", "64",
                 "--data-dir", str(data_dir), "--no-progress", "--device", "cpu"])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"calibration text {calib}" in line or f"calibration text file:{calib}" in line
    assert message in line
    if content.startswith(b"caf"):
        assert "re-encode it as UTF-8" in line


def test_save_onto_a_saved_model_needs_overwrite(tiny_models, data_dir, tmp_path, capsys):
    out = tmp_path / "saved"
    args = ["run", "--model", str(tiny_models["opt"]), "--wbits", "4", "--eval", "ptb", "--max-eval-windows", "1",
            "--seqlen", "64", "--data-dir", str(data_dir), "--no-progress", "--device", "cpu", "--save", str(out)]
    assert main(args) == 0
    first = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists and is not empty; pass --overwrite to replace it" in _one_error_line(capsys.readouterr().err)
    assert main([*args, "--overwrite"]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns != first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]  # nothing half-written beside it

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main([*args[:-1], str(other), "--overwrite"]) == 2
    assert "--overwrite replaces only a folder written by --save" in _one_error_line(capsys.readouterr().err)
    assert (other / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["run", "demo"])
def test_output_that_cannot_be_written_is_refused_first(command, tmp_path, capsys, no_model_loading):
    (tmp_path / "ro").mkdir()
    for output, message in [(tmp_path, "is a folder: give the path of a file"),
                            (tmp_path / "f.txt" / "r.jsonl", "is a file, so no file or folder can be created")]:
        (tmp_path / "f.txt").write_text("x")
        assert main([command, "--output", str(output), "--device", "cpu", "--no-progress"]) == 2
        assert message in _one_error_line(capsys.readouterr().err)


def test_output_that_fails_after_the_run_still_prints_the_result(tiny_models, data_dir, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setattr("ptqlab.cli.check_writable_file", lambda path, flag: None)  # as if it broke mid-run
    code = main(["run", "--model", str(tiny_models["opt"]), "--wbits", "4", "--eval", "ptb", "--max-eval-windows",
                 "1", "--seqlen", "64", "--data-dir", str(data_dir), "--no-progress", "--device", "cpu",
                 "--output", str(tmp_path)])
    assert code == 2
    captured = capsys.readouterr()
    assert "bits/w" in captured.out  # the table
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["config"]["wbits"] == 4 and "ptb" in record["ppl"]
    line = _one_error_line(captured.err)
    assert f"--output {tmp_path}: Is a directory; 1 record(s) printed above as JSON instead" in line


def test_misspelt_testbed_model_fails_at_once_with_the_nearest_names(capsys):
    import time

    t0 = time.perf_counter()
    assert main(["run", "--model", "testbed-op", "--device", "cpu"]) == 2
    assert time.perf_counter() - t0 < 10  # no hub retries
    line = _one_error_line(capsys.readouterr().err)
    assert "unknown testbed model 'testbed-op': did you mean testbed-opt" in line


def test_hub_model_offline_fails_at_once(monkeypatch, capsys, no_model_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", "--model", "nobody-here/no-such-model", "--eval", "heldout", "--device", "cpu"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "could not load model 'nobody-here/no-such-model'" in line and "HF_HUB_OFFLINE" in line


# ---------------------------------------------------------------- help


def test_every_flag_has_help_that_shows_its_default():
    """The rule: every option has help; one that takes a value and has a default other than None (or an
    empty list) shows it as "(default: X)"; a flag that sets what is already the default says "(default)"; a switch that
    is off by default says nothing about it."""
    import argparse

    from ptqlab.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for command, sub in subparsers.choices.items():
        defaults = {a.dest: a.default for a in sub._actions if a.option_strings}
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
                continue
            flag = f"{command} {action.option_strings[0]}"
            if not action.help:
                missing.append(f"{flag}: no help")
                continue
            if action.nargs == 0:  # a switch: store_true / store_false
                if action.const == defaults[action.dest] and "(default" not in action.help:
                    missing.append(f"{flag}: sets the default but does not say so")
                continue
            default = action.default
            if default is None or default is False or default == []:  # none, or an empty list to append to
                continue
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
            if f"(default: {shown})" not in action.help:
                missing.append(f"{flag}: default {shown!r} not shown in {action.help!r}")
    assert not missing, "\n".join(missing)


def test_a_zq_record_says_how_its_steps_ran(tiny_models, data_dir, tmp_path, monkeypatch):
    # ZQ's CUDA-graph and eager steps agree only to float rounding, so the record names which ran (here: eager,
    # the CPU); the switch itself is read per device
    from ptqlab.methods.zeroquant import cuda_graphs_enabled

    out = tmp_path / "r.jsonl"
    assert main(["run", "--model", str(tiny_models["opt"]), "--method", "zq-local", "--wbits", "4", "--zq-steps", "2",
                 "--calib", str(data_dir / "ptb" / "ptb.valid.txt"), "--nsamples", "2", "--seqlen", "32", "--eval", "ptb", "--max-eval-windows", "1",
                 "--data-dir", str(data_dir), "--device", "cpu", "--no-progress", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["execution"] == {"calib_batch": 8, "calib_offload": False, "zq_cuda_graphs": False}
    assert "zq_cuda_graphs" not in json.dumps(record["config"])  # not part of what the run is
    monkeypatch.delenv("PTQLAB_ZQ_GRAPHS", raising=False)
    assert cuda_graphs_enabled(torch.device("cuda")) and not cuda_graphs_enabled(torch.device("cpu"))
    monkeypatch.setenv("PTQLAB_ZQ_GRAPHS", "0")
    assert not cuda_graphs_enabled(torch.device("cuda"))
