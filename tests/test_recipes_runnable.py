"""Every shipped recipe can calibrate every testbed model it names: the calibration text holds the windows asked.

A study stops at the first run whose calibration the data cannot give (``DataError``), which for a shipped recipe
would come minutes into the study (the methods recipe once stopped at run 53 of 82, on testbed-bloom at 2048
tokens). This checks the same condition as ``data.calibration_windows`` for each distinct
(model, calibration source, nsamples, window) of each recipe, from the models' own tokenizers and configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ptqlab.data import calibration_windows
from ptqlab.experiment import window_lengths
from ptqlab.models import model_config
from ptqlab.study.recipe import load_recipe
from ptqlab.study.runner import run_spec
from ptqlab.testbed import TESTBED_MODELS, resolve_model_path

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


def _calibrations(recipe: Path) -> set[tuple[str, str, int, int]]:
    needs = set()
    for run in load_recipe(recipe).runs:
        spec = run.spec
        if spec["model"] not in TESTBED_MODELS or spec.get("method", "fp16") in ("fp16", "rtn"):
            continue  # models to be built, and runs with no calibration
        _, calib_seqlen = window_lengths(run_spec(spec), model_config(resolve_model_path(spec["model"])))
        needs.add((spec["model"], spec["calib"], spec["nsamples"], calib_seqlen))
    return needs


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_calibrations_are_available(recipe: Path) -> None:
    needs = _calibrations(recipe)
    for model, calib, nsamples, seqlen in sorted(needs):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
        windows, _ = calibration_windows(tokenizer, calib, nsamples, seqlen)
        assert tuple(windows.shape) == (nsamples, seqlen), (recipe.name, model)
