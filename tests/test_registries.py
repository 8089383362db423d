"""Kernel backends and export formats are tables: what they list is what the CLI offers, and a new entry is usable."""

from __future__ import annotations

import pytest

from ptqlab.export import EXPORT_FORMATS, ExportFormat, format_of, get_format, register_format
from ptqlab.kernels.real import KERNEL_BACKENDS, KERNELS, KernelBackend, register_kernel, scheme_of
from ptqlab.models import QuantLinear
from ptqlab.quantizers import QuantSpec


def test_the_kernel_table_answers_scheme_of_in_order_of_preference():
    import torch

    layer = QuantLinear(torch.zeros(8, 256), None)
    layer.weight_spec = QuantSpec(4, True, 128)
    assert scheme_of(layer) == "w4a16-triton"  # the default preference
    assert scheme_of(layer, "tinygemm") == "w4a16-tinygemm"
    assert scheme_of(layer, "triton") == "w4a16-triton"
    assert scheme_of(layer, "gemlite") == "w4a16-gemlite"
    assert set(KERNELS) == set(KERNEL_BACKENDS)
    with pytest.raises(ValueError, match="registered twice"):
        register_kernel(KERNEL_BACKENDS["w8a8-int8"])


def test_a_registered_kernel_backend_is_chosen_for_the_specs_it_supports():
    import torch

    layer = QuantLinear(torch.zeros(8, 64), None)
    layer.weight_spec = QuantSpec(3, True, 32)  # no built-in real kernel for 3 bits
    assert scheme_of(layer) is None
    backend = KernelBackend("w3a16-test", "3-bit test", lambda w, a, pref: w.bits == 3 and not a.enabled,
                            lambda *a: None, lambda *a: None)
    register_kernel(backend)
    try:
        assert scheme_of(layer) == "w3a16-test"
    finally:
        del KERNEL_BACKENDS["w3a16-test"]


def test_export_formats_table_and_detection(tmp_path):
    assert "compressed-tensors" in EXPORT_FORMATS
    assert format_of(tmp_path) is None
    with pytest.raises(ValueError, match="unknown export format 'gguf'"):
        get_format("gguf")
    marker = tmp_path / "toy.fmt"
    marker.write_text("x")
    from pathlib import Path

    register_format(ExportFormat("toy", "a test format", lambda *a, **k: {}, lambda p: (Path(p) / "toy.fmt").exists(),
                                 lambda *a, **k: None))
    try:
        assert format_of(tmp_path).name == "toy"
        from ptqlab.cli import build_parser

        p = build_parser()  # the run command's --save-format choices come from the table
        args = p.parse_args(["run", "--save", str(tmp_path / "o"), "--save-format", "toy"])
        assert args.save_format == "toy"
    finally:
        del EXPORT_FORMATS["toy"]
