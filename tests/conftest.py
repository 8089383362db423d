"""Shared fixtures: the evaluation data in ../shared/data and tiny offline models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite never needs the Hugging Face hub (no network here or in CI): tell its client so, before transformers
# is imported, so a hub id fails at once instead of probing or retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    value = os.environ.get("PTQLAB_DATA")
    path = Path(value) if value else REPO.parent / "shared" / "data"
    return path if (path / "wikitext2" / "wiki.test.raw").exists() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.fail("evaluation data not found: set PTQLAB_DATA or place shared/data beside the repo")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Tiny random models of each architecture (hidden 128 so that groups of 128 fit), made offline."""
    from ptqlab.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    text = data_dir / "ptb" / "ptb.valid.txt"
    return {arch: make_tiny(arch, root / arch, text, hidden=128, layers=2, heads=4)
            for arch in ("opt", "bloom", "llama", "gpt2")}
