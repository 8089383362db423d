"""ptqlab's own low-bit kernels (Triton, and the CUDA W4A16 MMA kernel) against cuBLAS FP16, tinygemm and gemlite, per linear and in decoding (issue 20).

    python bench/bench_w4.py --out $OUT/w4.jsonl            # gemm part, then decode (OPT-6.7B shape, batch 1/16)

gemm:   per linear (K -> N on the five shapes of the issue), M tokens: median of CUDA-graph replays
        (triton.testing.do_bench_cudagraph) of FP16 F.linear and of each kernel; achieved bandwidth (bytes the
        kernel must move: its weight buffers + fp16 input and output) and the memory floor at the measured copy
        bandwidth; real-vs-fake error: the kernel's output against the fake-quant QuantLinear's (max abs, and
        norm-relative).  ``w4a16-triton`` dispatches (GEMV at 1 token, Triton GEMM up to w4_gemm.GEMM_MAX_M, unpack +
        cuBLAS above); ``w4a16-triton-gemm`` forces the Triton GEMM at every M > 1 and ``w4a16-triton-unpack`` the
        unpack + cuBLAS path (the two sides of the crossover).  ``+lorc8``: LoRC rank 8, added inside the kernel.
        ``w4a16-mma`` (``-asym``): the CUDA tensor-core kernel (ptqlab.kernels.w4_mma; its tuned config per row,
        "unpack" where the hand-off won the tuning), ``w4a16-mma-unpack`` its unpack + cuBLAS path at every M,
        ``w4a16-mma+lorc8`` with LoRC rank 8 (in its epilogue up to 16 tokens, an addmm after it beyond).
        ``w4a8-mma``: the CUDA int8 tensor-core W4A8 kernel (ptqlab.kernels.w4a8_mma) on the same layout, its
        input quantized per token by the Triton pass in each timed call (as ``w4a8-triton``); ``+lorc8``: LoRC rank 8
        as a side product after it.
decode: bench_decode.py's CUDA-graph greedy decoder with the ``triton`` preference (its W4A16 layers on the MMA
        kernel, its W4A8 layers on the CUDA W4A8 kernel; ``w4a16:triton-nomma`` / ``w4a16-lorc8:triton-nomma`` /
        ``w4a8:triton-nomma`` on the Triton kernels), FP16, and tinygemm
        W4A16.

Every kernel runs in a try: a failure is a record with "error", and the run goes on.  ``--budget-s``: past it,
the remaining cases are skipped (a record says which), so that one command stays inside its device slot.
Prints a markdown table of the gemm part at the end.  Random weights: speed only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time

import torch
import triton

from kernel_common import copy_bandwidth, emit, open_output, rtn_with_grid
from ptqlab.kernels import act_quant, w4_gemm, w4_mma, w4a8_mma
from ptqlab.kernels.real import RealLinear
from ptqlab.models import QuantLinear
from ptqlab.quantizers import QuantSpec

SHAPES = [(4096, 4096), (4096, 16384), (16384, 4096), (8192, 28672), (28672, 8192)]  # (K, N)
FP = QuantSpec()
A8 = QuantSpec(8, True, 0)
FP8 = QuantSpec(fmt="fp8")
KERNELS = {
    # name: (weight spec, activation spec, LoRC rank, backend)
    "w4a16-tinygemm": (QuantSpec(4, True, 128), FP, 0, "w4a16-tinygemm"),
    "w4a16-gemlite": (QuantSpec(4, True, 128), FP, 0, "w4a16-gemlite"),
    "w4a16-mma": (QuantSpec(4, True, 128), FP, 0, "w4a16-mma"),
    "w4a16-mma-asym": (QuantSpec(4, False, 128), FP, 0, "w4a16-mma"),
    "w4a16-mma-unpack": (QuantSpec(4, True, 128), FP, 0, "w4a16-mma"),
    "w4a16-mma+lorc8": (QuantSpec(4, True, 128), FP, 8, "w4a16-mma"),
    "w4a16-triton": (QuantSpec(4, True, 128), FP, 0, "w4a16-triton"),
    "w4a16-triton-asym": (QuantSpec(4, False, 128), FP, 0, "w4a16-triton"),
    "w4a16-triton-gemm": (QuantSpec(4, True, 128), FP, 0, "w4a16-triton"),
    "w4a16-triton-unpack": (QuantSpec(4, True, 128), FP, 0, "w4a16-triton"),
    "w4a16-triton+lorc8": (QuantSpec(4, True, 128), FP, 8, "w4a16-triton"),
    "w4a8-mma": (QuantSpec(4, True, 0), A8, 0, "w4a8-mma"),
    "w4a8-mma+lorc8": (QuantSpec(4, True, 0), A8, 8, "w4a8-mma"),
    "w4a8-triton": (QuantSpec(4, True, 0), A8, 0, "w4a8-triton"),
    "w4a8-triton+lorc8": (QuantSpec(4, True, 0), A8, 8, "w4a8-triton"),
    "w8a8-triton": (QuantSpec(8, True, 0), A8, 0, "w8a8-triton"),
    "w8a8-int8": (QuantSpec(8, True, 0), A8, 0, "w8a8-int8"),
    "w8a8-fp8": (FP8, FP8, 0, "w8a8-fp8"),
}
DEADLINE = [float("inf")]
DEV = torch.device("cuda")


def out_of_time() -> bool:
    return time.perf_counter() > DEADLINE[0]


def buffer_bytes(layer: torch.nn.Module) -> int:
    """Bytes of the weight a forward must read: the real layer's buffers (tinygemm: its small-M layout only)."""
    if isinstance(layer, QuantLinear):
        return layer.weight.numel() * 2
    if getattr(layer, "gemlite", None) is not None:
        return sum(t.numel() * t.element_size() for t in layer.gemlite.get_tensor_args()
                   if isinstance(t, torch.Tensor) and t.numel() > 1)
    skip = {"w_nibbles", "w_zero", "w_scale"} if layer.scheme == "w4a16-tinygemm" else set()
    total = sum(b.numel() * b.element_size() for n, b in layer.named_buffers() if n not in skip)
    for t in (layer.lorc_u, layer.lorc_v):
        total += 0 if t is None else t.numel() * t.element_size()
    return total


FORCED_MAX_M = {"w4a16-triton-gemm": 1 << 30, "w4a16-triton-unpack": 0, "w4a16-mma-unpack": 0}


@contextlib.contextmanager
def forced_path(name: str):
    """W4A16 through the Triton GEMM (``-gemm``) or unpack + cuBLAS (``-unpack``) at every M > 1."""
    module = w4_mma if name.startswith("w4a16-mma") else w4_gemm
    attr = "MMA_MAX_M" if module is w4_mma else "GEMM_MAX_M"
    old = getattr(module, attr)
    setattr(module, attr, FORCED_MAX_M.get(name, old))
    try:
        yield
    finally:
        setattr(module, attr, old)


@contextlib.contextmanager
def mma_disabled(disable: bool):
    """The ``triton`` preference without the CUDA W4A16 kernel (its W4A16 layers on the Triton kernels)."""
    w4_mma.unavailable()
    saved = dict(w4_mma._STATE)
    if disable:
        w4_mma._STATE["reason"] = "disabled by the bench (the Triton kernels' row)"
    try:
        yield
    finally:
        w4_mma._STATE.clear()
        w4_mma._STATE.update(saved)


def timed(fn) -> float:
    fn()  # autotune, compile, pick cuBLAS algorithms: outside the capture
    if DEV.type != "cuda":  # --cpu-check: the flow, not the time
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")


def gemm_part(ms: list[int], kernels: list[str], bw: float, rows: list[dict], shapes=SHAPES) -> None:
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)
    for k, n in shapes:
        if out_of_time():
            emit({"part": "gemm", "k": k, "n": n, "skipped": "out of time"})
            continue
        w = torch.randn(n, k, device=dev, generator=g, dtype=torch.float16) * 0.02
        b = torch.randn(n, device=dev, generator=g, dtype=torch.float16) * 0.1
        fakes, reals = {}, {}
        for name in kernels:
            wspec, aspec, rank, backend = KERNELS[name]
            t0 = time.perf_counter()
            try:
                q = QuantLinear(w, b, f"{k}x{n}")
                rtn_with_grid([q], wspec, aspec, lorc_rank=rank, svd=False)
                reals[name] = RealLinear(q, backend, keep_original=False)
                fakes[name] = q
            except Exception as err:  # noqa: BLE001
                emit({"part": "gemm", "k": k, "n": n, "kernel": name, "error": f"build: {err!r}"[:300]})
            print(f"  built {name} on {k}x{n} in {time.perf_counter() - t0:.1f}s", flush=True)
        for m in ms:
            if out_of_time():
                emit({"part": "gemm", "k": k, "n": n, "m": m, "skipped": "out of time"})
                continue
            x = torch.randn(m, k, device=dev, generator=g, dtype=torch.float16)
            io = 2 * m * (k + n)
            with torch.no_grad():
                fp16_ms = timed(lambda: torch.nn.functional.linear(x, w, b))
            base = {"part": "gemm", "k": k, "n": n, "m": m}
            row = {**base, "kernel": "fp16", "ms": fp16_ms, "floor_ms": (2 * k * n + io) / bw * 1e3,
                   "tb_s": (2 * k * n + io) / (fp16_ms * 1e-3) / 1e12}
            emit(row)
            rows.append(row)
            for name, layer in reals.items():
                if name in FORCED_MAX_M and m == 1 and "triton" in name:
                    continue  # M = 1 is the GEMV either way
                t0 = time.perf_counter()
                try:
                    with torch.no_grad(), forced_path(name):
                        def run(layer=layer):
                            act_quant.SHARED_INPUTS.clear()  # the same x every call: quantize it each time
                            return layer(x)
                        ms_ = timed(run)
                        got = run().float()
                        ref = fakes[name](x).float()
                except Exception as err:  # noqa: BLE001
                    emit({**base, "kernel": name, "error": f"{type(err).__name__}: {err}"[:300]})
                    continue
                nbytes = buffer_bytes(layer) + io
                row = {**base, "kernel": name, "ms": ms_, "vs_fp16": fp16_ms / ms_, "weight_bytes": buffer_bytes(layer),
                       "floor_ms": nbytes / bw * 1e3, "tb_s": nbytes / (ms_ * 1e-3) / 1e12,
                       "of_floor": nbytes / bw / (ms_ * 1e-3),
                       "max_abs_err_vs_fake": float((got - ref).abs().max()),
                       "rel_err_vs_fake": float((got - ref).norm() / ref.norm()),
                       "wall_s": round(time.perf_counter() - t0, 2)}
                if name.startswith("w4a16-triton"):
                    max_m = FORCED_MAX_M.get(name, w4_gemm.GEMM_MAX_M)
                    row["triton_path"] = "gemv" if m == 1 else "gemm" if m <= max_m else "unpack+cublas"
                if name.startswith("w4a16-mma"):
                    max_m = FORCED_MAX_M.get(name, w4_mma.MMA_MAX_M)
                    row["mma_path"] = "mma" if m <= max_m else "unpack+cublas"
                    nt = w4_mma.token_tiles(m)
                    key_rank = KERNELS[name][2] if nt <= w4_mma.LORC_MAX_NT else 0  # (LoRC's own tuning keys)
                    tuned = [v for key, v in w4_mma._TUNED.items() if key[:3] == (nt, n, k) and key[-1] == key_rank]
                    row["config"] = str(tuned[-1]) if tuned and m <= max_m else ""  # (body, R, warps, S)
                if name.startswith("w4a8-mma"):
                    nt = w4_mma.token_tiles(m)
                    tuned = [v for key, v in w4a8_mma._TUNED.items() if key[:3] == (nt, n, k)]
                    row["config"] = str(tuned[-1]) if tuned and m <= w4a8_mma.MMA_MAX_M else "unpack+int8-gemm"
                if "triton" in name and row.get("triton_path") != "unpack+cublas":  # the autotuned config used last
                    kernel = w4_gemm._gemv_kernel if m == 1 else w4_gemm._gemm_kernel
                    row["config"] = str(getattr(kernel, "best_config", ""))[:200]
                emit(row)
                rows.append(row)
        del fakes, reals, w
        gc.collect()
        torch.cuda.empty_cache()


def table(rows: list[dict], kernels: list[str]) -> str:
    """Markdown: µs (FP16 time / kernel time, share of the memory floor) per shape and M."""
    cols = ["fp16"] + [k for k in kernels if any(r.get("kernel") == k for r in rows)]
    out = ["| K→N | M | " + " | ".join(cols) + " |", "| --- | ---: |" + " --- |" * len(cols)]
    cells: dict[tuple, dict[str, str]] = {}
    for r in rows:
        key = (r["k"], r["n"], r["m"])
        us = r["ms"] * 1e3
        if r["kernel"] == "fp16":
            text = f"{us:.1f} ({r['floor_ms'] * 1e3 / us * 100:.0f}% fl)" if us else "-"
        else:
            text = f"{us:.1f} ({r['vs_fp16']:.2f}x, {r['of_floor'] * 100:.0f}% fl)"
        cells.setdefault(key, {})[r["kernel"]] = text
    for (k, n, m), c in cells.items():
        out.append(f"| {k}→{n} | {m} | " + " | ".join(c.get(col, "-") for col in cols) + " |")
    errs = ["", "| kernel | max rel err vs fake | max abs err vs fake |", "| --- | ---: | ---: |"]
    for col in cols[1:]:
        e = [r for r in rows if r["kernel"] == col]
        errs.append(f"| {col} | {max(r['rel_err_vs_fake'] for r in e):.2e} | "
                    f"{max(r['max_abs_err_vs_fake'] for r in e):.2e} |")
    return "\n".join(out + errs)


def decode_part(shape: str, batches: list[int], schemes: list[str], prompt: int, new: int, bw: float,
                decoders: tuple[str, ...] = ("fused",)) -> None:
    from bench_decode import bench_scheme
    from kernel_common import build_opt, wrap_model

    model = build_opt(shape, torch.device("cuda"))
    layers = wrap_model(model)
    originals = [layer.weight.data.clone() for layer in layers]
    for item in schemes:
        scheme, _, backend = item.partition(":")
        # "triton-nomma": the triton preference with W4A16 on the Triton kernels (the CUDA kernel's alternative)
        no_mma, backend = backend == "triton-nomma", "triton" if backend == "triton-nomma" else backend
        if out_of_time():
            emit({"part": "decode", "scheme": item, "skipped": "out of time"})
            continue
        t0 = time.perf_counter()
        try:
            with mma_disabled(no_mma):
                bench_scheme(model, layers, originals, shape, scheme, batches, prompt, new, bw, backend or "triton",
                             decoders)
        except Exception as err:  # noqa: BLE001
            emit({"part": "decode", "shape": shape, "scheme": item, "error": f"{type(err).__name__}: {err}"[:300]})
        print(f"  decode {item}: {time.perf_counter() - t0:.1f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="gemm,decode")
    ap.add_argument("--ms", default="1,4,16,32,64,256,2048")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--decode-shape", default="opt-6.7b")
    ap.add_argument("--decode-schemes", default="fp16,w4a16:triton,w4a16:triton-nomma,w4a16-lorc8:triton,"
                                                "w4a16-lorc8:triton-nomma,w4a8:triton,"
                                                "w8a8:triton,w8a8-fp8:triton,w4a16:tinygemm")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new", type=int, default=64, help="decoded tokens per timed run")
    ap.add_argument("--decoders", default="fused", help="fused and/or plain: the decoder's fusions on or off")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip what is left after this many seconds")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu-check", action="store_true",
                    help="developer check of the flow without a GPU (TRITON_INTERPRET=1, tiny shapes, no timing)")
    a = ap.parse_args(argv)
    shapes = SHAPES
    if a.cpu_check:
        import kernel_common

        DEV = torch.device("cpu")
        globals()["DEV"] = DEV
        kernel_common.torch.cuda.get_device_name = lambda: "cpu-check"
        shapes, a.parts = [(256, 48), (128, 32)], "gemm"
    elif not torch.cuda.is_available():
        print("bench_w4.py needs a CUDA GPU", file=sys.stderr)
        return 2
    DEADLINE[0] = time.perf_counter() + a.budget_s
    open_output(a.out)
    bw = copy_bandwidth() if not a.cpu_check else 1e11
    emit({"part": "setup", "copy_bandwidth_tb_s": bw / 1e12, "torch": torch.__version__, "triton": triton.__version__,
          "gemm_max_m": w4_gemm.GEMM_MAX_M})
    kernels = a.kernels.split(",")
    with contextlib.suppress(ImportError):
        import gemlite  # noqa: F401
    if "gemlite" not in sys.modules and "w4a16-gemlite" in kernels:
        kernels.remove("w4a16-gemlite")
        emit({"part": "gemm", "kernel": "w4a16-gemlite", "skipped": "gemlite not importable"})
    rows: list[dict] = []
    t0 = time.perf_counter()
    if "gemm" in a.parts:
        gemm_part([int(m) for m in a.ms.split(",")], kernels, bw, rows, shapes)
        print(f"gemm part: {time.perf_counter() - t0:.0f}s", flush=True)
    if "decode" in a.parts:
        decode_part(a.decode_shape, [int(b) for b in a.batches.split(",")], a.decode_schemes.split(","), 128, a.new,
                    bw, tuple(a.decoders.split(",")))
    if rows:
        print("\n" + table(rows, kernels), flush=True)
    print(f"total {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
