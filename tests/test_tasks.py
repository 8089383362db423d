"""Task accuracy through lm-evaluation-harness (ptqlab.tasks) on the shipped task built from the testbed's
held-out text (tests/data/tasks, scripts/make_next_sentence_task.py): end to end on the quantized model in
memory and on a saved folder, against a dense recomputation of the accuracy, and the errors before any model
work."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from ptqlab.cli import main
from ptqlab.config import QuantConfig, RunSpec
from ptqlab.experiment import ModelSession, run
from ptqlab.quantizers import QuantSpec

pytest.importorskip("lm_eval")

TASKS = Path(__file__).resolve().parent / "data" / "tasks"
TASK = "testbed_next_sentence"
LIMIT = 40


def _docs(n: int) -> list[dict]:
    lines = (TASKS / f"{TASK}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


@torch.no_grad()
def dense_accuracy(model, tokenizer, docs: list[dict]) -> float:
    """The task's acc recomputed without lm-eval: per document, the summed log-probability of each choice's
    tokens after the context (lm-eval's split: the context's tokens, then the rest of context + " " + choice;
    the tokenizer's default special tokens, OPT's leading </s>, as lm-eval's HFLM adds them)."""
    right = 0
    for doc in docs:
        ctx = tokenizer(doc["context"]).input_ids
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["context"] + " " + choice).input_ids
            cont = whole[len(ctx):]
            ids = torch.tensor([ctx + cont])
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            scores.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return right / len(docs)


def test_shipped_task_is_what_the_script_makes():
    import importlib.util

    from ptqlab.testbed import HELDOUT_TEXT

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_next_sentence_task.py"
    module_spec = importlib.util.spec_from_file_location("make_next_sentence_task", script)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    make_docs = module.make_docs

    docs = make_docs(HELDOUT_TEXT.read_text(encoding="utf-8"), 200, 8, 4, 0)
    assert docs == _docs(200)
    assert all(len(d["choices"]) == 4 and len({len(c.split()) for c in d["choices"]}) == 1 for d in docs)


def test_quantized_model_in_memory_scored_end_to_end(tmp_path):
    session = ModelSession("testbed-opt", "cpu", progress=False)
    records = {}
    for wbits in (16, 3):
        weight = QuantSpec(3, True, 128)
        config = QuantConfig(method="fp16") if wbits == 16 else QuantConfig(method="rtn", weight=weight)
        spec = RunSpec(model="testbed-opt", config=config, eval=("heldout",), max_eval_windows=1, tasks=(TASK,),
                       limit=LIMIT, tasks_dir=str(TASKS))
        records[wbits] = run(spec, session, progress=False)
        # the model lm-eval scored is the run's (quantized, in memory): the same accuracy recomputed on it
        assert records[wbits]["tasks"][TASK]["acc"] == dense_accuracy(session.model, session.tokenizer, _docs(LIMIT))
    fp16 = records[16]["tasks"][TASK]
    assert set(fp16) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"} and fp16["samples"] == LIMIT
    assert fp16["acc"] > 0.4  # chance is 0.25: the trained testbed knows its corpus
    assert records[16]["config"]["tasks"] == [TASK] and records[16]["config"]["limit"] == LIMIT
    assert records[16]["versions"]["lm_eval"]


def test_cli_and_saved_folder(tmp_path):
    out = tmp_path / "r.jsonl"
    saved = tmp_path / "w4"
    common = ["--eval", "heldout", "--max-eval-windows", "1", "--no-progress", "--device", "cpu", "--output", str(out)]
    assert main(["run", "--model", "testbed-opt", "--wbits", "4", "--wgroup", "128", "--save", str(saved),
                 "--tasks", TASK, "--tasks-dir", str(TASKS), "--limit", "8", "--metrics", "ppl,kld", *common]) == 0
    assert main(["run", "--model", str(saved), "--tasks", TASK, "--tasks-dir", str(TASKS), "--limit", "8",
                 "--metrics", "kld", *common]) == 0
    quantized, loaded = [json.loads(line) for line in out.read_text().splitlines()]
    assert loaded["tasks"][TASK]["acc"] == quantized["tasks"][TASK]["acc"]
    assert loaded["kld"]["heldout"]["mean"] == pytest.approx(quantized["kld"]["heldout"]["mean"], rel=1e-4)
    assert loaded["kld"]["heldout"]["mean"] > 0


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr("ptqlab.experiment.load_model", refuse)


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_errors_before_any_model_work(tmp_path, capsys, monkeypatch, no_model_loading):
    args = ["run", "--model", "testbed-opt", "--eval", "heldout", "--device", "cpu", "--no-progress"]
    # a task file whose data file is missing
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(TASKS / f"{TASK}.yaml", broken)
    assert main([*args, "--tasks", TASK, "--tasks-dir", str(broken)]) == 2
    line = _error(capsys)
    assert f"task '{TASK}'" in line and f"data file {TASK}.jsonl does not exist" in line
    # a folder that is not there, a folder without task files
    assert main([*args, "--tasks", TASK, "--tasks-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in _error(capsys)
    (tmp_path / "empty").mkdir()
    assert main([*args, "--tasks", TASK, "--tasks-dir", str(tmp_path / "empty")]) == 2
    assert "holds no task YAML files" in _error(capsys)
    # a bad task name: lm-eval's own tasks and the folder's are searched, close names suggested
    assert main([*args, "--tasks", "testbed_next_sentense", "--tasks-dir", str(TASKS)]) == 2
    line = _error(capsys)
    assert "unknown task 'testbed_next_sentense'" in line and "did you mean testbed_next_sentence" in line
    # no lm-eval
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main([*args, "--tasks", TASK, "--tasks-dir", str(TASKS)]) == 2
    assert "needs lm-evaluation-harness" in _error(capsys)
