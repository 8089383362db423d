"""The README's Python snippets run as written (each block after a ``<!-- snippet: NAME -->`` marker)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str) -> str:
    match = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no '{name}' snippet"
    return match.group(1)


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """The quantize -> save -> load snippet, run in a fresh folder; its namespace afterwards."""
    folder = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        namespace: dict = {}
        exec(compile(snippet("python-api"), "README.md:python-api", "exec"), namespace)  # noqa: S102
    return folder, namespace


def test_the_python_api_snippet_quantizes_saves_and_loads(api_run):
    from ptqlab.models import QuantLinear

    folder, ns = api_run
    assert (folder / "out-api" / "adapter" / "adapter_config.json").is_file()
    layers = [m for m in ns["model"].modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.lorc_u is not None and m.weight_spec.bits == 4 for m in layers)
    assert ns["entry"]["adapter"]["lorc_rank"] == 8
    assert ns["windows"].shape == (16, 512)


def test_the_transformers_snippet_loads_the_saved_model(api_run):
    """The snippet reads "out": the API snippet's GPTQ W4 g128 + LoRC8 folder, saved there. Both of its models
    give the logits of ptqlab's reload (fp32 folder, so fp32 models)."""
    folder, ns = api_run
    shutil.copytree(folder / "out-api", folder / "out")
    ids = torch.randint(4, 8000, (1, 64), generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        code = snippet("transformers")
        peft_code, _, helper_code = code.partition("from ptqlab.export import load_with_transformers")
        first: dict = {}
        exec(compile(peft_code, "README.md:transformers", "exec"), first)  # noqa: S102
        second: dict = {}
        exec(compile("from ptqlab.export import load_with_transformers" + helper_code, "README.md:transformers",  # noqa: S102
                     "exec"), second)
    with torch.no_grad():
        reference = ns["model"](input_ids=ids).logits
        for model in (first["model"], second["model"]):
            assert next(model.parameters()).dtype == torch.float32
            assert float((model(input_ids=ids).logits - reference).abs().max()) < 1e-5 * float(reference.abs().max())
