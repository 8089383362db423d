"""The tensor cores' rate through ``mma.sync`` (what ``w4a16-mma`` and ``w4a8-mma`` issue) beside cuBLAS's
(wgmma on Hopper) on the same GPU: the compute bound of the mma.sync kernels at many tokens (issue 20).

    python bench/bench_mma_peak.py --out $OUT/mma_peak.jsonl

``bench/csrc/mma_peak.cu``: every warp runs rounds of 8 independent MMAs on register operands (no memory traffic),
so its time is the MMA pipe's throughput; FP16 ``m16n8k16`` with float32 sums, int8 ``m16n8k32`` with int32 sums.
Beside it, in the same run: ``torch.matmul`` fp16 and ``torch._int_mm`` int8 on large square matrices.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import tempfile
from pathlib import Path

import torch

from ptqlab.kernels import w4_mma

SOURCE = Path(__file__).parent / "csrc" / "mma_peak.cu"
CHAINS = 8  # mma_peak.cu's CHAINS
#: multiply-adds of one MMA instruction (m * n * k)
MACS = {"mma_f16_f32": 16 * 8 * 16, "mma_s8_s32": 16 * 8 * 32}


def _cubin(arch: str) -> bytes:
    nvcc = w4_mma._nvcc()
    if nvcc is None:
        raise SystemExit("no nvcc: set PTQLAB_NVCC or CUDA_HOME")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mma_peak.cubin"
        subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-O3", "-o", str(out), str(SOURCE)], check=True)
        return out.read_bytes()


def _time_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=4096, help="rounds of 8 MMAs a warp")
    ap.add_argument("--blocks-per-sm", type=int, default=8)
    ap.add_argument("--size", type=int, default=8192, help="the square GEMMs' side for cuBLAS")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    major, minor = torch.cuda.get_device_capability()
    driver = w4_mma._Driver(_cubin(f"sm_{major}{minor}"))
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    seed = torch.randint(0, 2**16, (32,), dtype=torch.int32, device=dev)
    records = []
    for name, macs in MACS.items():
        for threads in (128, 256, 512):
            blocks = sms * a.blocks_per_sm
            out = torch.empty(blocks * threads, dtype=torch.float32, device=dev)
            args = [ctypes.c_void_p(seed.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int(a.iters)]
            ms = _time_ms(lambda: driver.launch(dev.index or 0, name, blocks, threads, args), 5)
            ops = 2 * macs * CHAINS * a.iters * blocks * threads // 32
            records.append({"kernel": name, "threads": threads, "blocks": blocks, "ms": ms,
                            "tflops": ops / ms / 1e9})
    s = a.size
    x, w = torch.randn(s, s, device=dev, dtype=torch.float16), torch.randn(s, s, device=dev, dtype=torch.float16)
    ms = _time_ms(lambda: torch.matmul(x, w), 10)
    records.append({"kernel": "cublas_fp16_matmul", "size": s, "ms": ms, "tflops": 2 * s**3 / ms / 1e9})
    xi = torch.randint(-128, 128, (s, s), device=dev, dtype=torch.int8)
    wi = torch.randint(-128, 128, (s, s), device=dev, dtype=torch.int8)
    ms = _time_ms(lambda: torch._int_mm(xi, wi), 10)
    records.append({"kernel": "torch_int_mm_int8", "size": s, "ms": ms, "tflops": 2 * s**3 / ms / 1e9})
    gpu = torch.cuda.get_device_name(dev)
    for r in records:
        r["gpu"] = gpu
        print(json.dumps(r))
    if a.out is not None:
        with a.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
