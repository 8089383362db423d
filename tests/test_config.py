"""One description of a run: the config's option table drives the CLI, the recipes and the records.

Also the method registry, the layer filter, the session's in-place restore, data-content study keys,
the deprecated flags, the offline defaults and the clear errors a new user meets first.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import warnings

import pytest
import torch

from ptqlab import LayerFilter, QuantConfig, QuantSpec, RunSpec
from ptqlab.cli import build_parser, main
from ptqlab.config import OPTIONS, from_flat
from ptqlab.methods import METHODS, Method, WeightResult, register, rtn_quantize
from ptqlab.quantizers import QuantizationError, weight_qparams
from ptqlab.study.recipe import DEFAULTS, VALIDATORS, parse_assignments, parse_recipe_text, run_key

EXECUTION_ONLY = {"model", "device", "no_progress", "offload", "calib_batch", "calib_offload", "output", "save",
                  "overwrite", "no_verify", "save_format", "stream", "dist_timeout",
                  "data_dir", "eval_batch", "kernel",  # how a run executes (recorded under "execution")
                  "command", "func"}


def _run_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


def _run_parser_actions() -> dict:
    return {a.dest: a for a in _run_parser()._actions if a.dest != "help"}


def test_cli_recipe_and_config_options_correspond_one_to_one():
    run = _run_parser()
    cli_keys = set(_run_parser_actions()) - EXECUTION_ONLY
    assert cli_keys == set(OPTIONS) == set(VALIDATORS) == set(DEFAULTS)
    spec = RunSpec(model="m")
    for key, option in OPTIONS.items():
        field_default = option.get(spec) if key != "calib" else "auto"
        assert run.get_default(key) == DEFAULTS[key] == option.default == field_default, key
    # the drift the issue found: ZQ-Global's batch is 8 everywhere
    assert DEFAULTS["zq_batch"] == run.get_default("zq_batch") == QuantConfig().zq.batch_size == 8


def test_flat_round_trip_and_canonical_form():
    spec = from_flat({"model": "m", "method": "gptq", "wbits": 3, "wgroup": 128, "abits": 8, "act_sym": False,
                      "lorc_rank": 4, "act_order": True, "calib": "ptb", "eval": "wikitext2,ptb"})
    assert spec.config.act == QuantSpec(8, False, 0) and spec.config.gptq.act_order and spec.eval == ("wikitext2", "ptb")
    flat = spec.to_flat()
    assert from_flat(flat) == spec
    assert "zq_steps" not in flat and "blocksize" in flat  # GPTQ reads its own options only
    rtn = from_flat({"model": "m", "method": "rtn", "wbits": 4, "calib": "ptb", "zq_steps": 7}).to_flat()
    assert "calib" not in rtn and "zq_steps" not in rtn and "percdamp" not in rtn
    assert from_flat({"model": "m", "wbits": 4}).to_flat() == rtn  # spellings that cannot differ give one dict
    with pytest.raises(QuantizationError, match="unknown option 'wbit'"):
        from_flat({"model": "m", "wbit": 4})
    with pytest.raises(QuantizationError, match="wbits: bad value 9"):
        from_flat({"model": "m", "wbits": 9})


def test_auto_calibration_is_the_testbed_text_for_testbed_models():
    assert RunSpec("testbed-opt").calib == "testbed"
    assert RunSpec("facebook/opt-125m").calib == "c4"
    assert RunSpec("testbed-bloom", calib="ptb").calib == "ptb"


def test_same_run_through_cli_and_one_cell_study_gives_the_same_record_config(tiny_models, data_dir, tmp_path):
    model = str(tiny_models["opt"])
    common = ["--model", model, "--eval", "ptb", "--seqlen", "64", "--max-eval-windows", "2", "--device", "cpu",
              "--data-dir", str(data_dir)]
    out = tmp_path / "run.jsonl"
    calib = str(data_dir / "ptb" / "ptb.valid.txt")
    assert main(["run", *common, "--method", "gptq", "--wbits", "4", "--wgroup", "32", "--calib", calib,
                 "--nsamples", "2", "--no-progress", "--output", str(out)]) == 0
    cli_config = json.loads(out.read_text())["config"]
    db = tmp_path / "s.db"
    assert main(["study", "--grid", "method=gptq wbits=4 wgroup=32", "--model", model, "--db", str(db),
                 "--set", "eval=ptb", "--set", "seqlen=64", "--set", "max_eval_windows=2", "--set", f"calib={calib}",
                 "--set", "nsamples=2", "--device", "cpu", "--data-dir", str(data_dir)]) == 0
    rows = sqlite3.connect(db).execute("SELECT config_json FROM runs WHERE spec_json LIKE '%gptq%'").fetchall()
    assert len(rows) == 1 and json.loads(rows[0][0]) == cli_config


# ---------------------------------------------------------------- registry


def test_cli_choices_and_needs_calibration_come_from_the_registry():
    assert set(METHODS) == {"fp16", "rtn", "gptq", "zq-local", "zq-global"}
    assert all(name in OPTIONS["method"].help for name in METHODS)
    assert [QuantConfig(m, QuantSpec(4) if m != "fp16" else QuantSpec()).needs_calibration for m in METHODS] == \
        [METHODS[m].needs_calibration for m in METHODS]


def test_a_registered_method_is_usable_everywhere(tiny_models):
    """Adding a method is one registration: the config accepts it and the pipeline calls its solve."""
    calls = []

    def halve_then_rtn(W, H, config, name):  # a toy algorithm (RTN of W/2), just to see it is called
        calls.append(name)
        return WeightResult(rtn_quantize(W / 2, config.weight), *weight_qparams(W / 2, config.weight))

    register(Method("toy-half", "test method", needs_calibration=False, solve_layer=halve_then_rtn))
    try:
        from ptqlab import quantize_
        from ptqlab.models import load_model

        model, _ = load_model(tiny_models["opt"], torch.float32)
        flat = parse_assignments("method=toy-half wbits=4", "--grid", as_axes=False)
        report = quantize_(model, from_flat({"model": "x", **flat}).config)
        assert len(calls) == 6 * 2  # no calibration, so no shared Hessians: every linear of both blocks
        assert report.bits_per_weight < 5
        assert "toy-half" in OPTIONS["method"].check("toy-half")
    finally:
        del METHODS["toy-half"]


# ---------------------------------------------------------------- layer filter


def test_layer_filter_parses_and_selects():
    assert str(LayerFilter.parse("all")) == "all" and LayerFilter().everything
    f = LayerFilter.parse("layer:3:self_attn.q_proj")
    assert f.selects(3, "self_attn.q_proj") and not f.selects(2, "self_attn.q_proj") and not f.selects(3, "fc1")
    assert LayerFilter.parse("module:fc1").selects(7, "fc1") and LayerFilter.parse("block:2").selects(2, "fc2")
    for bad in ("blocks:1", "block:x", "layer:3", "all:fc1", "module:"):
        with pytest.raises(QuantizationError):
            LayerFilter.parse(bad)
    with pytest.raises(QuantizationError, match="needs --layers all"):
        QuantConfig("rtn", QuantSpec(4), quantize_head=True, layers=LayerFilter.parse("block:0"))


# ---------------------------------------------------------------- the session restores, it does not copy


def test_session_restores_the_pristine_model_after_runs(tiny_models, data_dir):
    from ptqlab.experiment import ModelSession, run
    from ptqlab.models import QuantLinear, load_model

    model_dir = str(tiny_models["opt"])
    calib = str(data_dir / "ptb" / "ptb.valid.txt")
    session = ModelSession(model_dir, "cpu", "float32", str(data_dir), progress=False)
    assert not session.pristine.copies, "every block linear found in the safetensors file"
    reference = {k: v.clone() for k, v in load_model(model_dir, torch.float32)[0].state_dict().items()}
    first = None
    configs = [QuantConfig("gptq", QuantSpec(3, True, 32), lorc_rank=2, quantize_head=True),
               QuantConfig("zq-global", QuantSpec(3), QuantSpec(8)),
               QuantConfig("rtn", QuantSpec(4), layers=LayerFilter.parse("module:fc1"))]
    for config in configs:
        spec = RunSpec(model_dir, config, eval=("ptb",), seqlen=64, calib=calib, nsamples=2, max_eval_windows=2,
                       dtype="float32")
        record = run(spec, session, progress=False)
        first = first or record["ppl"]
        model = session.fresh_model()
        assert not any(isinstance(m, QuantLinear) for m in model.modules())
        state = model.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), "weights not restored exactly"
        assert model.config.tie_word_embeddings == load_model(model_dir, torch.float32)[0].config.tie_word_embeddings
    # the first config again on the restored model gives the same numbers
    again = run(RunSpec(model_dir, configs[0], eval=("ptb",), seqlen=64, calib=calib, nsamples=2, max_eval_windows=2,
                        dtype="float32"), session, progress=False)
    assert again["ppl"] == first


# ---------------------------------------------------------------- study keys follow the data's contents


def test_study_keys_change_when_the_data_changes(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text " * 50)
    recipe = f"models: [m]\nsettings: {{calib: {calib}, eval: [heldout]}}\naxes: {{method: [gptq], wbits: [4]}}\n"
    before = {r.key for r in parse_recipe_text(recipe).runs}
    assert before == {r.key for r in parse_recipe_text(recipe).runs}
    calib.write_text("edited calibration text " * 50)
    after = {r.key for r in parse_recipe_text(recipe).runs}
    assert len(before - after) == 1  # the GPTQ run is new; the FP16 baseline reads no calibration text
    spec = next(r.spec for r in parse_recipe_text(recipe).runs if r.spec["method"] == "gptq")
    assert run_key(spec) != run_key({**spec, "eval": ["ptb"]})


# ---------------------------------------------------------------- flags a person can read


def test_activation_symmetry_flags_read_as_they_say():
    actions = _run_parser_actions()
    run = _run_parser()
    assert run.parse_args(["--act-asym"]).act_sym is False and run.parse_args([]).act_sym is True
    with pytest.warns(FutureWarning, match="--aasym is deprecated.*--act-asym"):
        assert run.parse_args(["--aasym"]).act_sym is False
    with pytest.warns(FutureWarning, match="--asym is deprecated"):
        assert run.parse_args(["--asym"]).act_sym is True
    assert "act_sym" in actions
    with pytest.warns(FutureWarning, match="key 'asym' is deprecated"):
        plan = parse_recipe_text("models: [m]\naxes: {abits: [8], asym: [false]}\n")
    assert [r.spec["act_sym"] for r in plan.runs if r.spec["abits"] == 8] == [False]


# ---------------------------------------------------------------- offline defaults and first errors


def test_run_on_the_testbed_calibrates_on_its_own_text_by_default(tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(["run", "--model", "testbed-opt", "--method", "gptq", "--wbits", "4", "--nsamples", "2",
                 "--seqlen", "64", "--eval", "heldout", "--max-eval-windows", "1", "--device", "cpu", "--no-progress",
                 "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["config"]["calib"] == "testbed" and "calibration.txt" in record["data_sources"]["calibration"]


def test_demo_without_any_data_runs_on_what_ships(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):  # no hub either
        if name == "datasets":
            raise ImportError("no datasets here")
        return real_import(name, *args, **kwargs)

    monkeypatch.delenv("PTQLAB_DATA", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    assert main(["demo", "--seqlen", "64", "--max-eval-windows", "1", "--nsamples", "2", "--device", "cpu",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "skipped wikitext2, ptb: not found here" in out and "--data-dir" in out
    assert "heldout" in out.split("skipped", 1)[1]


def test_report_on_a_file_that_is_not_a_study_database(tmp_path, capsys):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a database\n" * 10)
    assert main(["report", str(bogus)]) == 2
    assert "is not a ptqlab study database" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--model", "{empty}"], "no model in"),
    (["--method", "gptq", "--wbits", "4", "--calib", "/missing/calib.txt"], "calibration file /missing/calib.txt does not exist"),
    (["--wbits", "4", "--lorc-rank", "100000"], "--lorc-rank 100000 is too large"),
])
def test_first_mistakes_are_clear_errors(extra, message, tiny_models, data_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    extra = [x.replace("{empty}", str(tmp_path / "empty")) for x in extra]
    args = ["run", "--model", str(tiny_models["opt"]), "--eval", "ptb", "--max-eval-windows", "1", "--seqlen", "64",
            "--data-dir", str(data_dir), "--no-progress", "--device", "cpu", *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
