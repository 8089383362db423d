"""Marlin (IST-DASLab/marlin, FP16 x INT4 g128) against cuBLAS FP16 and ptqlab's ``w4a16-mma``, per linear, for
measurement only (issue 20 asks for Marlin side by side; ptqlab does not ship or depend on it).

    # on a machine with internet: git clone https://github.com/IST-DASLab/marlin third_party/marlin (ignored)
    python bench/bench_marlin.py --marlin-src third_party/marlin --out $OUT/marlin.jsonl

Why it did not run before: on the H200's nvcc 13.0 Marlin's original build stops at its first call with "illegal
instruction". The cause is a ptxas miscompile (IST-DASLab/marlin issue 44), reproduced here offline with the
nvcc 13.0.88 wheel: in ``Marlin<256,1,8,8,4,8>`` (one 16-row block of tokens, group 128: the few-token path)
the ``LDGSTS`` of ``cp_async4_stream`` read the L2-policy descriptor ``desc[UR1]`` that no instruction writes
(``createpolicy`` dropped); the other nine instantiations, and all ten with nvcc 13.5, define theirs. The build
below replaces that one cache-hinted ``cp.async`` with the plain ``cp.async.cg`` (the weight's L2 evict-first hint
is lost, nothing else), and adds an ``extern "C"`` entry so that the library loads with ctypes (no build against
torch's headers). Marlin's own ``Layer.pack`` (imported from the checkout) lays out the weight.

Each shape and M: the same 4-bit codes and fp16 scales (symmetric, group 128) in both kernels; median of CUDA-graph
replays; max error of each against the float64 product of the dequantized weight. Records: JSON lines.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

#: the cache-hinted copy of the weight that nvcc 13.0's ptxas miscompiles on sm_90, and what replaces it
HINTED_COPY = ('    "   .reg .b64 p;\\n"\n'
               '    "   createpolicy.fractional.L2::evict_first.b64 p, 1.0;"\n'
               '    "   cp.async.cg.shared.global.L2::cache_hint [%0], [%1], %2, p;\\n"\n')
PLAIN_COPY = '    "   cp.async.cg.shared.global [%0], [%1], %2;\\n"\n'
ENTRY = '''
extern "C" int ptqlab_marlin_mul(const void* A, const void* B, void* C, void* s, int m, int n, int k,
                                 void* workspace, int groupsize, int dev, void* stream) {
  return marlin_cuda(A, B, C, s, m, n, k, workspace, groupsize, dev, (cudaStream_t)stream);
}
'''
SHAPES = [(4096, 4096), (4096, 16384), (16384, 4096), (8192, 28672), (28672, 8192)]


def patched_source(source: str) -> str:
    """Marlin's kernel source with the plain copy for the weight and the C entry point (raises if the source is
    not the one this was written against)."""
    if source.count(HINTED_COPY) != 1 or "int marlin_cuda(" not in source:
        raise ValueError("not the IST-DASLab/marlin kernel source this bench patches (cp_async4_stream's cache-"
                         "hinted copy or marlin_cuda() not found)")
    return source.replace(HINTED_COPY, PLAIN_COPY) + ENTRY


def build(src: Path, arch: str, cache: Path) -> ctypes.CDLL:
    """The patched Marlin as a shared library for ``arch`` (cached by the source's hash)."""
    source = patched_source((src / "marlin" / "marlin_cuda_kernel.cu").read_text())
    target = cache / f"marlin-{hashlib.sha256(source.encode()).hexdigest()[:16]}-{arch}.so"
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        nvcc = os.environ.get("PTQLAB_NVCC") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cu, out = Path(tmp) / "marlin.cu", Path(tmp) / "marlin.so"
            cu.write_text(source)
            done = subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-O3", f"-arch={arch}",
                                   "--expt-relaxed-constexpr", "-o", str(out), str(cu)],
                                  capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc failed ({done.returncode}): {done.stderr.strip()[-800:]}")
            os.replace(out, target)
    lib = ctypes.CDLL(str(target))
    lib.ptqlab_marlin_mul.restype = ctypes.c_int
    lib.ptqlab_marlin_mul.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_int,
                                                                                  ctypes.c_int, ctypes.c_void_p]
    return lib


def marlin_module(src: Path) -> types.ModuleType:
    """The checkout's ``marlin`` package for its ``Layer.pack`` (its compiled extension stubbed: not built here)."""
    sys.modules.setdefault("marlin_cuda", types.ModuleType("marlin_cuda"))
    spec = importlib.util.spec_from_file_location("marlin_src", src / "marlin" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same_weight_both_layouts(k: int, n: int, dev: torch.device, marlin: types.ModuleType, g: torch.Generator):
    """Random 4-bit codes and fp16 scales (symmetric, group 128): the fp16 weight ``(code - 8) * s``, Marlin's
    packed layer and ptqlab's ``w4a16-mma`` layer of the same numbers."""
    from ptqlab.kernels.real import RealLinear
    from ptqlab.models import QuantLinear
    from ptqlab.quantizers import QuantSpec

    codes = torch.randint(0, 16, (n, k), device=dev, generator=g)
    scale = (torch.rand(n, k // 128, device=dev, generator=g) * 0.01 + 1e-3).half()  # [N, groups]
    w = (codes - 8).half() * scale.repeat_interleave(128, 1)  # exactly (code - 8) * s in fp16
    linear = torch.nn.Linear(k, n, bias=False).half().to(dev)
    linear.weight.data.copy_(w)
    layer = marlin.Layer(k, n, groupsize=128).to(dev)
    layer.pack(linear, scale)
    q = QuantLinear(w.clone(), None, f"{k}x{n}")
    q.weight_spec = QuantSpec(4, True, 128)
    q.set_weight_qparams(scale.float(), torch.full(scale.shape, 8.0))
    return w, layer, RealLinear(q, "w4a16-mma", keep_original=False)


def graph_ms(fn, reps: int = 20) -> float:
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--marlin-src", default=os.environ.get("PTQLAB_MARLIN_SRC", "third_party/marlin"))
    ap.add_argument("--ms", default="1,16,32,64,128")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_marlin.py needs a CUDA GPU", file=sys.stderr)
        return 2
    src = Path(a.marlin_src)
    if not (src / "marlin" / "marlin_cuda_kernel.cu").is_file():
        print(f"no IST-DASLab/marlin checkout at {src} (--marlin-src)", file=sys.stderr)
        return 2
    from kernel_common import emit, open_output
    from ptqlab.kernels import w4_mma

    open_output(a.out)
    major, minor = torch.cuda.get_device_capability()
    lib = build(src, f"sm_{major}{minor}", Path(os.environ.get("PTQLAB_KERNEL_CACHE", "/tmp/ptqlab-kernels")))
    marlin = marlin_module(src)
    dev = torch.device("cuda")
    for k, n in SHAPES:
        g = torch.Generator(device=dev).manual_seed(k + n)
        w, layer, mma = same_weight_both_layouts(k, n, dev, marlin, g)
        workspace = torch.zeros(n // 128 * 16, dtype=torch.int32, device=dev)
        for m in [int(v) for v in a.ms.split(",")]:
            x = torch.randn(m, k, device=dev, generator=g).half()
            y = torch.empty(m, n, dtype=torch.half, device=dev)

            def run_marlin():
                rc = lib.ptqlab_marlin_mul(x.data_ptr(), layer.B.data_ptr(), y.data_ptr(), layer.s.data_ptr(), m, n,
                                           k, workspace.data_ptr(), 128, dev.index or 0,
                                           torch.cuda.current_stream().cuda_stream)
                if rc != 0:
                    raise RuntimeError(f"marlin_cuda returned {rc}")

            ref = x.double() @ w.double().t()
            with torch.no_grad():
                runs = {"fp16": lambda: torch.nn.functional.linear(x, w), "marlin": run_marlin,
                        "w4a16-mma": lambda: mma(x)}
                fp16_ms = None
                for name, fn in runs.items():
                    row = {"part": "marlin", "k": k, "n": n, "m": m, "kernel": name}
                    try:
                        got = fn()
                        got = (y if name == "marlin" else got).double()
                        torch.cuda.synchronize()
                        ms = graph_ms(fn)
                        fp16_ms = ms if name == "fp16" else fp16_ms
                        row.update(ms=ms, vs_fp16=fp16_ms / ms if fp16_ms else None,
                                   rel_err=float((got - ref).norm() / ref.norm()),
                                   max_abs_err=float((got - ref).abs().max()))
                        if name == "w4a16-mma":
                            tuned = [c for key, c in w4_mma._TUNED.items() if key[:3] == (w4_mma.token_tiles(m), n, k)]
                            row["config"] = str(tuned[-1]) if tuned else ""
                    except Exception as err:  # noqa: BLE001 (a record says what failed; the run goes on)
                        row["error"] = f"{type(err).__name__}: {err}"[:300]
                    emit(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
