"""Dataset loading (local copies), calibration windows and the perplexity protocol."""

from __future__ import annotations

import gzip
import json
import math
import warnings

import pytest
import torch

from ptqlab.data import DataError, calibration_windows, eval_tokens, load_text
from ptqlab.evaluate import perplexity
from ptqlab.models import load_model


def test_wikitext_local_copy_joined_like_gptq(data_dir):
    text = load_text("wikitext2", "eval", data_dir)
    assert text.source.startswith("local:")
    rows = (data_dir / "wikitext2" / "wiki.test.raw").read_text().replace("\r", "").split("\n")[:-1]
    assert len(rows) == 2891
    assert text.text == "\n\n".join(rows)
    assert "\r" not in text.text


def test_ptb_local_copy_joined_with_spaces(data_dir):
    text = load_text("ptb", "eval", data_dir)
    lines = (data_dir / "ptb" / "ptb.test.txt").read_text().splitlines()
    assert text.text == " ".join(line.strip() for line in lines)
    assert text.text.startswith("no it was n't black monday but while")


def test_missing_dataset_names_how_to_provide_it(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):  # simulate a machine without `datasets`/hub access
        if name == "datasets":
            raise ImportError("no datasets here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="--data-dir.*PTQLAB_DATA.*c4"):
        load_text("c4", "eval", tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        load_text("imagenet", "eval", tmp_path)


def test_bad_data_dir_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text("ptb", "eval", tmp_path / "missing")


def _fake_c4(tmp_path, name):
    path = tmp_path / "c4" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"document {i} " + "words and more words " * (30 + i)}) + "\n")
    return path


def test_c4_eval_segments_from_local_json(tiny_models, tmp_path):
    _fake_c4(tmp_path, "c4-validation.00000-of-00008.json.gz")
    _, tok = load_model(tiny_models["opt"], torch.float32)
    text = load_text("c4", "eval", tmp_path)
    assert isinstance(text.text, list) and len(text.text) == 20
    stream = eval_tokens(tok, text, seqlen=32, c4_segments=5)
    assert stream.shape == (5 * 32,)
    assert torch.equal(stream, eval_tokens(tok, text, seqlen=32, c4_segments=5)), "seeded like GPTQ"


def test_calibration_windows_are_seeded(tiny_models, data_dir):
    _, tok = load_model(tiny_models["opt"], torch.float32)
    path = str(data_dir / "ptb" / "ptb.valid.txt")
    a, src = calibration_windows(tok, path, 6, 40, seed=3)
    b, _ = calibration_windows(tok, path, 6, 40, seed=3)
    c, _ = calibration_windows(tok, path, 6, 40, seed=4)
    assert a.shape == (6, 40) and torch.equal(a, b) and not torch.equal(a, c)
    assert src == f"file:{path}"


def test_perplexity_matches_manual_computation(tiny_models, data_dir):
    model, tok = load_model(tiny_models["opt"], torch.float32)
    tokens = eval_tokens(tok, load_text("ptb", "eval", data_dir), 64)[: 64 * 5 + 17]
    got = perplexity(model, tokens, 64, progress=False)
    nll = []
    with torch.no_grad():
        for i in range(5):  # the 17-token tail is dropped
            ids = tokens[i * 64 : (i + 1) * 64][None]
            nll.append(model(ids, labels=ids).loss.item())  # HF shifts labels itself
    assert got == pytest.approx(math.exp(sum(nll) / 5), rel=1e-5)
    assert perplexity(model, tokens, 64, max_windows=2, progress=False) == pytest.approx(
        math.exp(sum(nll[:2]) / 2), rel=1e-5)


def test_calibrating_on_the_eval_split_warns(tiny_models, data_dir):
    from ptqlab import QuantConfig, QuantSpec
    from ptqlab.experiment import RunSpec, run

    spec = RunSpec(model=str(tiny_models["opt"]), config=QuantConfig("gptq", QuantSpec(4, True, 128)),
                   eval=("ptb",), seqlen=64, calib=str(data_dir / "ptb" / "ptb.test.txt"), nsamples=2,
                   max_eval_windows=2, dtype="float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(spec, data_dir=str(data_dir), progress=False)
    assert any("CALIBRATING ON THE EVALUATION SPLIT" in str(w.message) for w in caught)


@pytest.mark.parametrize("arch", ["opt", "bloom", "llama", "gpt2"])
def test_offloaded_perplexity_equals_in_memory(arch, tiny_models, data_dir):
    from ptqlab import QuantConfig, QuantSpec, quantize_
    from ptqlab.evaluate import perplexity_offloaded

    model, tok = load_model(tiny_models[arch], torch.float32)
    quantize_(model, QuantConfig("rtn", QuantSpec(4, True, 32), act=QuantSpec(8)))
    tokens = eval_tokens(tok, load_text("ptb", "eval", data_dir), 48)[: 48 * 5]
    want = perplexity(model, tokens, 48, progress=False)
    got = perplexity_offloaded(model, tokens, 48, "cpu", progress=False, batch_size=2)
    assert got == pytest.approx(want, rel=1e-4)
