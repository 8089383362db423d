"""The trained testbed models that ship with ptqlab (see MODEL_CARD.md)."""

from __future__ import annotations

from pathlib import Path

TESTBED_DIR = Path(__file__).resolve().parent
TESTBED_MODELS = {"testbed-opt": TESTBED_DIR / "opt", "testbed-bloom": TESTBED_DIR / "bloom"}
CALIBRATION_TEXT = TESTBED_DIR / "calibration.txt"  # training-corpus text: the testbed's calibration set
HELDOUT_TEXT = TESTBED_DIR / "heldout.txt"  # held-out corpus text: the testbed's in-domain evaluation set


def is_testbed_model(name: str) -> bool:
    return name in TESTBED_MODELS


def resolve_model_path(name: str) -> str:
    """Map ``testbed-opt`` / ``testbed-bloom`` to their folder; anything else is returned as given."""
    if name in TESTBED_MODELS:
        path = TESTBED_MODELS[name]
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"the shipped testbed model '{name}' is missing at {path}")
        return str(path)
    return name
