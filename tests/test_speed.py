"""``--speed``: the clear errors before any work, the byte counts, the run table, and the study report's speed
table, CSV columns and plot on a store written through its own API (the timing itself needs CUDA graphs:
tests/gpu/test_gpu_speed.py)."""

from __future__ import annotations

import argparse
import csv
import io

import pytest
import torch

from ptqlab.cli import main, print_table
from ptqlab.config import OPTIONS, RunSpec, from_flat
from ptqlab.experiment import check_speed
from ptqlab.models import model_config
from ptqlab.speed import SpeedError, StaticOPTDecoder, decode_read_bytes, measure_speed, resident_bytes
from ptqlab.study.cli import check_plan_execution
from ptqlab.study.recipe import parse_grid
from ptqlab.study.report import load_results, render_csv, report
from ptqlab.study.store import Store


def _spec(**flat) -> RunSpec:
    return from_flat({"model": "testbed-opt", "eval": ["heldout"], "speed": True, **flat})


# ---------------------------------------------------------------- bad input, before any work


def test_speed_is_one_option_left_out_of_old_keys():
    assert OPTIONS["speed"].flag == "--speed" and OPTIONS["speed"].default is False
    assert "speed" not in from_flat({"model": "m"}).to_flat()  # off: old records and study keys unchanged
    assert from_flat({"model": "m", "speed": True}).to_flat()["speed"] is True


@pytest.mark.parametrize("flat,device,kernel,offload,message", [
    ({"method": "rtn", "wbits": 4}, "cpu", "real", None, "--speed times decoding on a CUDA GPU (got --device cpu)"),
    ({"method": "fp16"}, "cpu", "fake", None, "--speed times decoding on a CUDA GPU"),
    ({"method": "rtn", "wbits": 4}, "cuda", "fake", None, "needs --kernel real (got --kernel fake"),
    ({"method": "rtn", "wbits": 8, "abits": 8}, "cuda", "auto", None, "needs --kernel real (got --kernel auto"),
    ({"method": "fp16"}, "cuda", "fake", True, "--speed times the whole model on the GPU: drop --offload"),
])
def test_speed_refused_where_it_cannot_time(flat, device, kernel, offload, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_speed(_spec(**flat), device, kernel, offload)


def test_speed_accepted_for_real_kernels_and_the_fp16_run():
    check_speed(_spec(method="rtn", wbits=4, wgroup=128), "cuda", "real", None, model_config("testbed-opt"))
    check_speed(_spec(method="fp16"), "cuda", "fake")  # the baseline is timed as it is
    check_speed(_spec(method="fp16"), "cuda:1", "real")
    check_speed(from_flat({"model": "m", "method": "rtn"}), "cpu", "fake")  # no --speed: nothing to check


def test_speed_refuses_a_family_without_a_static_decoder():
    with pytest.raises(SpeedError, match="testbed-bloom is a bloom model; decode speed is measured for opt"):
        check_speed(_spec(model="testbed-bloom", method="fp16"), "cuda", "fake", None, model_config("testbed-bloom"))


def _cli_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_cli_run_with_speed_on_a_cpu_fails_before_loading(capsys, monkeypatch):
    import ptqlab.experiment

    def never(*a, **k):  # the model must not be loaded: the check comes first
        raise AssertionError("the run started")

    monkeypatch.setattr(ptqlab.experiment.ModelSession, "__init__", never)
    err = _cli_error(["run", "--model", "testbed-opt", "--method", "rtn", "--wbits", "4", "--eval", "heldout",
                      "--speed", "--device", "cpu", "--no-progress"], capsys)
    assert "--speed times decoding on a CUDA GPU (got --device cpu)" in err
    assert "Traceback" not in err


def test_speed_on_a_saved_folder_is_refused(tmp_path, capsys, monkeypatch):
    import ptqlab.export

    monkeypatch.setattr(ptqlab.export, "format_of", lambda path: "compressed-tensors")  # a saved folder
    err = _cli_error(["run", "--model", str(tmp_path), "--speed", "--device", "cpu"], capsys)
    assert "--speed times a run's model in memory; a saved folder" in err


def test_study_with_speed_on_a_cpu_queues_nothing(tmp_path, capsys):
    db = tmp_path / "s.db"
    err = _cli_error(["study", "--grid", "method=rtn wbits=4", "--model", "testbed-opt", "--set", "eval=heldout",
                      "--set", "speed=true", "--db", str(db), "--device", "cpu"], capsys)
    assert "--speed times decoding on a CUDA GPU" in err
    assert not db.exists()


def test_study_plan_with_speed_needs_the_real_kernel():
    plan = parse_grid("method=rtn wbits=4", ["testbed-opt"], {"eval": ["heldout"], "speed": True})
    specs = [r.spec for r in plan.runs]
    assert [s.get("speed") for s in specs] == [True, True]  # the FP16 baseline is timed too
    a = argparse.Namespace(device="cuda", executor="local", kernel="fake")
    with pytest.raises(ValueError, match="rtn W4A16 int4-sym-row needs --kernel real"):
        check_plan_execution(specs, a)
    check_plan_execution(specs, argparse.Namespace(device="cuda", executor="local", kernel="real"))


# ---------------------------------------------------------------- what is measured, on the CPU


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=100,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    return OPTForCausalLM(cfg).eval()


def test_byte_counts_count_each_storage_once():
    model = _tiny_opt()
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight  # tied: one storage
    expected = sum({p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}.values())
    expected += sum(b.numel() * b.element_size() for b in model.buffers())
    assert resident_bytes(model, torch.device("cpu")) == expected
    assert decode_read_bytes(model) == expected
    assert resident_bytes(model, torch.device("meta")) == 0  # only what is on that device

    class Packed:  # what a kernel library's layer object holds (gemlite): tensors in a plain object
        def __init__(self) -> None:
            self.w = torch.zeros(10, dtype=torch.int32)

    layer = model.model.decoder.layers[0].fc1
    layer.packed_w = torch.zeros(7, dtype=torch.uint8)  # a plain tensor attribute (real kernels' packed weights)
    layer.lib = Packed()
    assert resident_bytes(model, torch.device("cpu")) == expected + 7 + 40


def test_measure_speed_refuses_a_model_off_the_gpu():
    with pytest.raises(SpeedError, match="needs the model on a CUDA device"):
        measure_speed(_tiny_opt(), 64)


def test_the_decoder_is_registered_for_opt():
    from ptqlab.speed import STATIC_DECODERS

    assert STATIC_DECODERS["opt"] is StaticOPTDecoder


def test_run_table_shows_the_speed_columns():
    record = {"name": "W4A16 g128 rtn", "bits_per_weight": 4.25, "ppl": {"heldout": 20.0}, "time_s": 3.0,
              "speed": {"decode_tok_s_b1": 812.4, "decode_tok_s_b16": 12001.0, "prefill_tok_s": 90000.0,
                        "decode_peak_gpu_gib": 0.1234, "weight_bytes": 3 * 2**20}}
    buf = io.StringIO()
    print_table([record, {**record, "name": "untimed", "speed": {}}], buf)
    head, _, timed, untimed = buf.getvalue().splitlines()
    for column in ("decode tok/s b1", "decode tok/s b16", "prefill tok/s", "decode peak GiB", "weight MiB"):
        assert column in head
    assert "812" in timed and "12001" in timed and "90000" in timed and "0.123" in timed and "3.0" in timed
    assert "812" not in untimed
    buf = io.StringIO()
    print_table([{**record, "speed": {}}], buf)
    assert "tok/s" not in buf.getvalue()


# ---------------------------------------------------------------- the study report


SPEED = {  # (method, wbits): (mean PPL, decode b1, decode b16, prefill, weight bytes)
    ("fp16", 16): (20.0, 400.0, 6000.0, 80000.0, 14 * 2**20),
    ("rtn", 4): (21.0, 1000.0, 9000.0, 60000.0, 5 * 2**20),
    ("rtn", 8): (20.1, 600.0, 7000.0, 70000.0, 8 * 2**20),
}


def _timed_study(db, speed: bool = True) -> None:
    """A study whose runs are finished through the store's own API with the records a timed run writes."""
    plan = parse_grid("method=rtn wbits=4,8 wgroup=128", ["testbed-opt"],
                      {"eval": ["heldout"], "max_eval_windows": 2, "speed": speed})
    with Store(db) as store:
        store.add_runs(plan.runs)
        while (claim := store.claim("w")) is not None:
            ppl, b1, b16, pre, wb = SPEED[(claim.spec["method"], claim.spec["wbits"])]
            record = {"config": claim.spec, "config_hash": "h", "ppl": {"heldout": ppl}, "time_s": 1.0,
                      "bits_per_weight": 16.0 if claim.spec["method"] == "fp16" else claim.spec["wbits"] + 0.25,
                      "timings": {}, "versions": {}}
            if speed:
                record["speed"] = {"decode_tok_s_b1": b1, "decode_tok_s_b16": b16, "prefill_tok_s": pre,
                                   "weight_bytes": wb, "decode_peak_gpu_gib": 0.05, "prompt_tokens": 128,
                                   "new_tokens": 64, "prefill_tokens": 512, "repeats": 5}
            assert store.finish(claim, record)


def _table(text: str, title: str) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("#") and title in line)
    rows = []
    for line in lines[i + 1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[0], rows[2:]


def test_report_shows_speed_and_speedups_over_the_fp16_run(tmp_path):
    db = tmp_path / "timed.db"
    _timed_study(db)
    md = report(str(db))
    header, rows = _table(md, "testbed-opt: speed")
    by = {r[1]: dict(zip(header, r)) for r in rows}
    assert [r[1] for r in rows] == ["W16A16", "W4A16 g128", "W8A16 g128"]  # FP16 first, then fewest bits
    assert by["W4A16 g128"]["decode tok/s b1"] == "1000" and by["W4A16 g128"]["x FP16 b1"] == "2.50x"
    assert by["W4A16 g128"]["x FP16 b16"] == "1.50x" and by["W4A16 g128"]["x FP16 prefill"] == "0.75x"
    assert by["W8A16 g128"]["x FP16 b1"] == "1.50x" and by["W16A16"]["x FP16 b1"] == "1.00x"
    assert by["W4A16 g128"]["weight MiB"] == "5.0" and by["W4A16 g128"]["mean PPL"] == "21.000"
    assert "timed" in md  # the context says the runs were timed
    rows = list(csv.DictReader(io.StringIO(render_csv(load_results(str(db))))))
    w4 = next(r for r in rows if r["wbits"] == "4")
    assert float(w4["decode_tok_s_b16"]) == 9000.0 and float(w4["speedup_decode_tok_s_b1"]) == 2.5
    assert float(w4["weight_bytes"]) == 5 * 2**20


def test_report_without_speed_has_no_speed_table(tmp_path):
    db = tmp_path / "untimed.db"
    _timed_study(db, speed=False)
    md = report(str(db))
    assert ": speed" not in md and "tok/s" not in md
    assert "decode_tok_s_b1" not in render_csv(load_results(str(db)))


def test_speed_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from ptqlab.study.plots import make_plots

    db = tmp_path / "timed.db"
    _timed_study(db)
    paths = make_plots(load_results(str(db)), tmp_path / "plots")
    names = {p.name for p in paths}
    assert {"testbed-opt_ppl_vs_speed.png", "testbed-opt_ppl_vs_speed.svg"} <= names
    assert (tmp_path / "plots" / "testbed-opt_ppl_vs_speed.png").stat().st_size > 1000
    svg = (tmp_path / "plots" / "testbed-opt_ppl_vs_speed.svg").read_text()
    assert "decode tokens/s, batch 16" in svg and "model bytes on the GPU" in svg
