"""bench/bench_marlin.py's patch of Marlin's source (the build and the kernel run on the GPU only; Marlin itself is a
checkout the bench is pointed at, not part of ptqlab)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_marlin  # noqa: E402

SNIPPET = ('__device__ inline void cp_async4_stream(void* smem_ptr, const void* glob_ptr) {\n'
           '  const int BYTES = 16;\n'
           '  uint32_t smem = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));\n'
           '  asm volatile(\n'
           '    "{\\n"\n'
           + bench_marlin.HINTED_COPY +
           '    "}\\n" :: "r"(smem), "l"(glob_ptr), "n"(BYTES)\n'
           '  );\n'
           '}\n'
           'int marlin_cuda(const void* A) { return 0; }\n')


def test_the_patch_drops_the_cache_hint_and_adds_a_c_entry():
    out = bench_marlin.patched_source(SNIPPET)
    assert "createpolicy" not in out and "L2::cache_hint" not in out
    assert 'cp.async.cg.shared.global [%0], [%1], %2;' in out
    assert 'extern "C" int ptqlab_marlin_mul(' in out and out.count("cp.async") == 1


def test_another_source_is_refused_rather_than_patched_wrongly():
    with pytest.raises(ValueError, match="not the IST-DASLab/marlin kernel source"):
        bench_marlin.patched_source(SNIPPET.replace("createpolicy", "createpolicy.x"))
    with pytest.raises(ValueError, match="not the IST-DASLab/marlin kernel source"):
        bench_marlin.patched_source(SNIPPET.replace("int marlin_cuda(", "int other("))
