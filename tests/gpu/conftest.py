"""The GPU suite: ``python -m pytest -m gpu tests/gpu`` on a CUDA machine (through the device tool here; CI has
no GPU, so every test in this folder is marked ``gpu`` and skipped without CUDA).

It needs no data folder: perplexities are measured on the testbed's own held-out text, which ships in the
package. Output of each run is kept in ``bench/results/gpu_tests_<gpu>.txt``.
"""

from __future__ import annotations

import os

import pytest
import torch

#: Triton's CPU interpreter (TRITON_INTERPRET=1, triton installed): modules that set INTERPRETER_OK run on CPU
#: tensors, on their small shapes (slow; a developer's check without a GPU, never CI's)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU (the GPU suite: pytest -m gpu)")
    for item in items:
        if "tests/gpu/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            interpretable = INTERPRET and getattr(item.module, "INTERPRETER_OK", False)
            if not torch.cuda.is_available() and not interpretable:
                item.add_marker(skip)
