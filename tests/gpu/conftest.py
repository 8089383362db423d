"""The GPU suite: ``python -m pytest -m gpu tests/gpu`` on a CUDA machine (through the device tool here; CI has
no GPU, so every test in this folder is marked ``gpu`` and skipped without CUDA).

It needs no data folder: perplexities are measured on the testbed's own held-out text, which ships in the
package. Output of each run is kept in ``bench/results/gpu_tests_<gpu>.txt``.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU (the GPU suite: pytest -m gpu)")
    for item in items:
        if "tests/gpu/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
