"""One call of one ``w4a16-mma`` config, for a profiler (``ncu -k regex:w4_mma``): the kernel's own layout, random
codes and fp16 scales (symmetric, group 128), the config forced instead of tuned.

    ncu --section SpeedOfLight --section WarpStateStats -k regex:w4_mmap python bench/ncu_w4_mma.py \\
        --k 8192 --n 28672 --m 64 --config p,2,8,1
"""

from __future__ import annotations

import argparse

import torch

from ptqlab.kernels import w4_mma


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--config", default="p,2,8,1", help="body,R,warps,K shares")
    ap.add_argument("--calls", type=int, default=2, help="calls (the first warms up)")
    a = ap.parse_args(argv)
    body, *rest = a.config.split(",")
    cfg = (body, *[int(v) for v in rest])
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    packed = w4_mma.pack_int4_mma(torch.randint(0, 16, (a.n, a.k), device=dev, generator=g))
    scale = (torch.rand(a.k // 128, a.n, device=dev, generator=g) * 0.01 + 1e-3).half()
    x = torch.randn(a.m, a.k, device=dev, generator=g).half()
    w4_mma._TUNED[(w4_mma.token_tiles(a.m), a.n, a.k, 128, True, dev.index or 0, 0)] = cfg
    for _ in range(a.calls):
        y = w4_mma.w4a16_mma(x, packed, scale, None, 128)
    torch.cuda.synchronize()
    print(cfg, tuple(y.shape), float(y.float().abs().mean()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
