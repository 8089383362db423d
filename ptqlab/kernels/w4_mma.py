"""W4A16 on the tensor cores from 1 to 128 tokens: ptqlab's CUDA kernel (``csrc/w4_mma.cu``), built at first use.

Why CUDA: the Triton W4A16 kernels (:mod:`ptqlab.kernels.w4_gemm`) move the packed weight at 26-41% of the H200's
bandwidth at one token and reach 0.5-1.3x FP16 at 16-64 tokens (bench/README.md, session 29): each weight costs
about six float32 instructions (shift, mask, convert, subtract, multiply-add), and Triton offers no control of
the MMA's register fragments, so its tensor-core GEMM routes the unpacked tile through shared memory.  This kernel
stores the weight in the MMA's own fragment order (:func:`pack_int4_mma`), so one 16-byte load a lane is the
A operand of four ``mma.sync.m16n8k16`` steps, and dequantizes two weights an instruction (a ``lop3`` makes
the fp16 pair ``1024 + code``, one ``sub.f16x2`` the exact ``code - zero``, one ``mul.f16x2`` the fp16 weight
from the stored fp16 scale, bit for bit what :func:`dequant_mma` and the Triton unpack write; the "p" body at 1-16
tokens multiplies each k-tile's float32 sums of the exact ``code - zero`` by the scale instead: :func:`post_scaled`).
The few tokens are the MMA's 8-wide side: at one token 7/8 of each MMA is wasted, which costs nothing while the
weight's bytes are the bound.

Three bodies, tuned per (tokens bucket, shape, group, grid) on the first eager call from CUDA-graph replays of
every config (:data:`CONFIGS`): "k", a block's warps split K and read their few inputs from L1/L2 (1-16 tokens);
"x", its warps take different rows over the same K and share each input slice through shared memory (17-128
tokens); "p" (and "p2", the same with two blocks an SM), every operand of a k-tile copied to shared memory by
``cp.async`` stages ahead (1-128 tokens; dynamic shared memory: :func:`pipe_shared_bytes`).  From 17 tokens on, the
weight unpacked once + cuBLAS (:data:`UNPACK`) is a candidate too, so a key takes the hand-off where it wins.
Measured on an H200 (bench/README.md, session 35, five OPT/Llama shapes): 1.3-3.1x cuBLAS FP16 at one token,
1.0-2.0x at 16, 0.6-1.5x at 32, 0.35-0.96x at 64, 0.44-0.67x at 128; Marlin in the same run 1.0-2.8x, 0.9-2.4x,
0.55-2.0x, 0.4-1.4x, 0.6-0.9x. Session 38 (the "p" body's copies spread, post-scaling): 6.7-44.3 µs at one token
(1.39-2.74x that run's FP16), 4.5% less time in geometric mean over 1 / 8 / 16 tokens than session 35's kernel.

Built with the CUDA toolkit's ``nvcc`` (``$PTQLAB_NVCC``, ``$CUDA_HOME/bin/nvcc`` or the ``PATH``) into a cubin
for the GPU's architecture, cached under ``$PTQLAB_KERNEL_CACHE`` (default ``~/.cache/ptqlab/kernels``), loaded and
launched through the CUDA driver API (``ctypes``; no compiled Python extension, so no build against torch's
headers and ABI).  Where it cannot be built (no toolkit, a GPU before Ampere, ``PTQLAB_W4_MMA=0``),
:func:`unavailable` says why and the ``triton`` preference runs the Triton kernels instead.

LoRC: from 1 to 16 tokens the "k" body adds ``(x V^T) U^T`` in the same launch (rank <= :data:`LORC_MAX_RANK`):
:func:`lorc_blocks` extra blocks in front of the grid compute ``t = x V^T`` once (``V`` as one or two more 16-row
MMA operands) into a small global workspace, and each block applies ``U`` to it as it writes its outputs (the
CUDA source's header); from 17 tokens on, or at a larger rank, the product is added after the kernel (``addmm``).

Limits: fp16 activations (bf16 models run the Triton kernels), ``N`` divisible by 16, ``K`` by 64, groups of a
multiple of 64 columns or one per row.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "w4_mma.cu"
#: up to this many tokens the MMA kernel; above, the weight unpacked once (same layout) and cuBLAS
MMA_MAX_M = 128
#: (token tiles NT) -> the configs tried, ``(body, R, warps, S)``; the first is the default where no tuning can
#: run (inside a CUDA-graph capture). ``body`` "k": a block's warps split K and read their inputs from L1/L2
#: (few tokens); "x": its warps take different row tiles over the same K and share each input slice through
#: shared memory (many tokens, where the inputs are most of the loads); "p" / "p2": as "x", with every operand
#: of a k-tile staged in shared memory by cp.async, stages ahead (any token count). R: row tiles a warp ("x", "p")
#: or block ("k"); S: K shares across blocks (they fill the GPU when rows are few).
Config = tuple[str, int, int, int]
_K_SMALL = [(1, 8, 1), (1, 4, 1), (2, 4, 1), (2, 8, 1), (4, 4, 1), (1, 4, 2), (2, 4, 2), (4, 4, 2), (4, 8, 2)]
_K_MANY = [(1, 8, 1), (2, 8, 1), (2, 4, 1), (4, 4, 1), (4, 8, 1), (4, 4, 2), (4, 8, 2), (2, 8, 2), (4, 4, 4)]


def _x(rs: tuple[int, ...]) -> list[Config]:
    return [("x", r, w, s) for r in rs for w in (4, 8) for s in (1, 2, 4, 8)]


def _p(rs: tuple[int, ...]) -> list[Config]:
    """The pipelined body's configs for row tiles ``rs`` (tuned at every token count)."""
    return [("p", r, w, s) for r in rs for w in (4, 8) for s in (1, 2, 4, 8, 16)]


def _p2(r: int) -> list[Config]:
    """The "p2" configs: the "p" body with two blocks an SM (registers capped at 128), for row tiles ``r`` at the
    token tiles where "p" takes more (csrc/w4_mma.cu: ``W4_MMAP2``)."""
    return [("p2", r, w, s) for w in (4, 8) for s in (1, 2, 4, 8, 16)]


CONFIGS: dict[int, list[Config]] = {
    1: [("k", *c) for c in _K_SMALL] + _p((1, 2, 4)),
    2: [("k", *c) for c in _K_SMALL] + _x((1,)) + _p((1, 2, 4)),
    4: [("k", *c) for c in _K_MANY] + _x((1, 2)) + _p((1, 2, 4)),
    8: _x((1, 2)) + [("k", *c) for c in _K_MANY] + _p((1, 2, 4)) + _p2(2),
    16: _x((1,)) + [("k", 1, w, s) for w, s in ((8, 1), (4, 1), (8, 2), (4, 2), (4, 4))] + _p((1, 2)) + _p2(1),
}

#: csrc/w4_mma.cu's ``POST_SCALE_MAX_NT``: up to this many token tiles the "p" body post-scales (:func:`post_scaled`)
POST_SCALE_MAX_NT = 2


def post_scaled(cfg: Config, nt: int) -> bool:
    """Whether ``cfg`` at ``nt`` token tiles computes ``x . ((code - zero) * scale)`` with the fp16 scale applied to
    each k-tile's float32 sums (the "p" body up to :data:`POST_SCALE_MAX_NT`: 4 of the 13 instructions of a word's
    dequantization saved, session 38), rather than on the fp16-rounded weight :func:`dequant_mma` writes (every
    other config); the two differ by that rounding, at most 2^-11 of each product."""
    return cfg[0] in ("p", "p2") and nt <= POST_SCALE_MAX_NT


#: csrc/w4_mma.cu's ``PIPE_XROW``: halves a token row of the "p" body's staged input slice
PIPE_XROW = 72


def pipe_stages(nt: int) -> int:
    """k-tiles the "p" body keeps in flight (csrc/w4_mma.cu's ``pipe_stages``)."""
    return 3 if nt >= 16 else 4


def pipe_shared_bytes(nt: int, r: int, warps: int, sym: bool) -> int:
    """The "p" body's dynamic shared memory: its stages of input slice, weight tiles, scales (and zero points);
    the kernel traps if a launch gives it less (csrc/w4_mma.cu: the same formula)."""
    rows = 16 * r * warps
    return pipe_stages(nt) * (8 * nt * PIPE_XROW * 2 + warps * r * 512 + (1 if sym else 2) * rows * 2)


#: the largest LoRC rank the kernel's epilogue takes (two 16-row tiles of V); beyond, the product is an ``addmm``
LORC_MAX_RANK = 32
#: token tiles up to which LoRC runs inside the kernel (the "k" body's LoRC variants: csrc/w4_mma.cu)
LORC_MAX_NT = 2
#: at most this many blocks compute LoRC's t (csrc/w4_mma.cu's ``LORC_BLOCKS``)
LORC_BLOCKS = 64


def lorc_blocks(k: int, warps: int) -> int:
    """The blocks a LoRC launch adds in front of its grid to compute ``t = x V^T``: one 64-column tile of K a warp,
    at most :data:`LORC_BLOCKS` (csrc/w4_mma.cu's ``lorc_blocks``, the same formula)."""
    return min(LORC_BLOCKS, -(-(k // 64) // warps))


def lorc_configs(nt: int) -> list[Config]:
    """The configs with a LoRC variant for ``nt`` token tiles (the "k" body, row tiles 1, 2, 4); empty: none."""
    return [c for c in CONFIGS[nt] if c[0] == "k"] if nt <= LORC_MAX_NT else []


def token_tiles(m: int) -> int:
    """The kernel's token tiles for ``m`` tokens: 8 tokens each, a power of two (1, 2, 4, 8, 16)."""
    nt = 1
    while 8 * nt < m:
        nt *= 2
    return nt


# ---------------------------------------------------------------- layout (CPU and GPU, torch only)


def _tile_view(n: int, k: int) -> tuple[int, ...]:
    # W [N, K] -> [N/16, h (row half), g (row in half), K/64, t, s, u]:
    # row 16 tile + 8 h + g, column 64 c + 16 t + 4 s + u
    return (n // 16, 2, 8, k // 64, 4, 4, 4)


#: nibble position in a word of the code for (row half h, column u within the step): csrc/w4_mma.cu's header
_NIBBLE = torch.tensor([[0, 4, 2, 6], [1, 5, 3, 7]])


def check_shape(n: int, k: int) -> str | None:
    """Why ``[n, k]`` cannot take the MMA layout (None: it can)."""
    if n % 16 or k % 64:
        return f"the W4A16 MMA kernel needs out_features divisible by 16 and in_features by 64, got {n}x{k}"
    return None


def pack_int4_mma(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes 0..15 to the kernel's ``[N/16, K/64, 32, 4]`` int32 words (the CUDA source's header)."""
    n, k = codes.shape
    if (why := check_shape(n, k)) is not None:
        raise ValueError(why)
    c = codes.to(torch.int64).reshape(_tile_view(n, k))  # [T, h, g, C, t, s, u]
    shifts = (4 * _NIBBLE.to(codes.device)).view(1, 2, 1, 1, 1, 1, 4)
    words = (c << shifts).sum(dim=(1, 6))  # [T, g, C, t, s]: the 8 codes of a word, disjoint bits
    words = words.permute(0, 2, 1, 3, 4).reshape(n // 16, k // 64, 32, 4)  # lane = 4 g + t
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_int4_mma_reference(packed: torch.Tensor) -> torch.Tensor:
    """Torch inverse of :func:`pack_int4_mma`: ``[N, K]`` uint8 codes."""
    tn, chunks = packed.shape[:2]
    n, k = tn * 16, chunks * 64
    words = packed.to(torch.int64).reshape(tn, chunks, 8, 4, 4).permute(0, 2, 1, 3, 4)  # [T, g, C, t, s]
    shifts = (4 * _NIBBLE.to(packed.device)).view(1, 2, 1, 1, 1, 1, 4)
    codes = (words[:, None, :, :, :, :, None] >> shifts) & 15  # [T, h, g, C, t, s, u]
    return codes.reshape(n, k).to(torch.uint8)


# ---------------------------------------------------------------- build and load


class _Driver:
    """The CUDA driver API through ctypes: the cubin loaded once per device, kernels launched on torch's stream."""

    def __init__(self, cubin: bytes) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.cubin = cubin
        self.modules: dict[int, ctypes.c_void_p] = {}
        self.functions: dict[tuple[int, str], ctypes.c_void_p] = {}
        self.shared_limit: dict[tuple[int, str], int] = {}
        self.lock = threading.Lock()

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(rc, ctypes.byref(name))
            raise RuntimeError(f"CUDA driver: {what} failed: {(name.value or b'?').decode()} ({rc})")

    def function(self, device: int, name: str) -> ctypes.c_void_p:
        key = (device, name)
        fn = self.functions.get(key)
        if fn is None:
            with self.lock, torch.cuda.device(device):
                torch.cuda.current_stream()  # (the device's primary context is current from here on)
                if device not in self.modules:
                    mod = ctypes.c_void_p()
                    self._check(self.lib.cuModuleLoadData(ctypes.byref(mod), self.cubin), "loading the W4A16 cubin")
                    self.modules[device] = mod
                fn = ctypes.c_void_p()
                self._check(self.lib.cuModuleGetFunction(ctypes.byref(fn), self.modules[device], name.encode()),
                            f"finding kernel {name}")
                self.functions[key] = fn
        return fn

    def launch(self, device: int, name: str, grid: int, threads: int, args: list, grid_y: int = 1,
               shared: int = 0) -> None:
        """Launch ``name`` on torch's current stream; ``shared``: dynamic shared memory bytes (the kernel's limit
        is raised to it first, once per size: the default, 48 KiB, counts the kernel's static shared memory too, so
        a launch of exactly 48 KiB dynamic fails without it (H200, session 37))."""
        fn = self.function(device, name)
        if shared > 0 and self.shared_limit.get((device, name), 0) < shared:
            # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            self._check(self.lib.cuFuncSetAttribute(fn, 8, shared), f"allowing {shared} B of shared memory to {name}")
            self.shared_limit[(device, name)] = shared
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
        self._check(self.lib.cuLaunchKernel(fn, grid, grid_y, 1, threads, 1, 1, shared, stream, params, None),
                    f"launching {name}")


_STATE: dict[str, object] = {}


def _nvcc() -> str | None:
    if os.environ.get("PTQLAB_NVCC"):
        return os.environ["PTQLAB_NVCC"]
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001 (an unusual torch build: look on the PATH only)
        CUDA_HOME = None
    for home in (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").is_file():
            return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def _build(arch: str) -> bytes:
    """The cubin for ``arch`` (e.g. ``sm_90``), from the cache or compiled now (written atomically)."""
    source = SOURCE.read_bytes()
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("no CUDA toolkit (nvcc) found: set CUDA_HOME or PTQLAB_NVCC")
    cache = Path(os.environ.get("PTQLAB_KERNEL_CACHE", Path.home() / ".cache" / "ptqlab" / "kernels"))
    target = cache / f"w4_mma-{hashlib.sha256(source).hexdigest()[:16]}-{arch}.cubin"
    if target.is_file():
        return target.read_bytes()
    cache.mkdir(parents=True, exist_ok=True)
    warnings.warn(f"building ptqlab's W4A16 CUDA kernel for {arch} with {nvcc} (once; cached in {cache})",
                  stacklevel=3)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / "w4_mma.cubin"
        done = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-O3", "-o", str(out), str(SOURCE)],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        os.replace(out, target)  # a reader sees the whole cubin or none
    return target.read_bytes()


def unavailable() -> str | None:
    """Why the kernel cannot run here (None: it can; it is built on the first call and cached)."""
    if "reason" not in _STATE:
        _STATE["reason"] = _probe()
    return _STATE["reason"]  # type: ignore[return-value]


def _probe() -> str | None:
    if os.environ.get("PTQLAB_W4_MMA", "1") == "0":
        return "PTQLAB_W4_MMA=0"
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"compute capability {major}.{minor} (mma.sync m16n8k16 needs 8.0 or later)"
    try:
        driver = _Driver(_build(f"sm_{major}{minor}"))
        driver.function(torch.cuda.current_device(), "w4_mma_dequant")  # loads: a bad cubin fails here, not later
        _STATE["driver"] = driver
    except Exception as err:  # noqa: BLE001 (any failure here means: use the Triton kernels)
        warnings.warn(f"ptqlab's W4A16 CUDA kernel is not available ({err}); the Triton kernels run instead",
                      stacklevel=3)
        return str(err)
    return None


def _driver() -> _Driver:
    if (why := unavailable()) is not None:
        raise RuntimeError(f"the W4A16 MMA kernel is not available: {why}")
    return _STATE["driver"]  # type: ignore[return-value]


# ---------------------------------------------------------------- the two entry points

_TUNED: dict[tuple, Config] = {}
_WORKSPACE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_LORC_WORKSPACE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def reserve(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K workspace of ``device`` (float32 ``[MMA_MAX_M, N]`` and the row tiles' tickets), zero between
    calls (each call's last block zeroes what it used); grown here, at build time, before any CUDA-graph capture.
    LoRC's (``t = x V^T`` and its two counters: :func:`lorc_workspace`) is made here too."""
    ws, cnt = _WORKSPACE.get(device, (None, None))
    if ws is None or ws.numel() < MMA_MAX_M * n:
        ws = torch.zeros(MMA_MAX_M * n, dtype=torch.float32, device=device)
        cnt = torch.zeros(-(-n // 16), dtype=torch.int32, device=device)
        _WORKSPACE[device] = (ws, cnt)
    if device not in _LORC_WORKSPACE:
        _LORC_WORKSPACE[device] = (torch.zeros(LORC_MAX_RANK * 8 * LORC_MAX_NT, dtype=torch.float32, device=device),
                                   torch.zeros(2, dtype=torch.int32, device=device))
    return ws, cnt


def lorc_workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRC's workspace of ``device``: float32 ``t`` ``[32, 8 NT]`` and the counters (blocks done with their share
    of t, writers done reading it), zero between calls (the call's last writer zeroes them)."""
    return _LORC_WORKSPACE[device]


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _run(cfg: Config, nt: int, sym: bool, device: int, args: list, n: int, lorc: bool = False) -> None:
    body, r, warps, shares = cfg
    name = f"w4_mma{'' if body == 'k' else body}_nt{nt}_r{r}_{'sym' if sym else 'asym'}{'_lorc' if lorc else ''}"
    tiles_a_block = r if body == "k" else r * warps
    blocks = -(-(n // 16) // tiles_a_block)
    if lorc:  # t's blocks in front (args[10]: K)
        blocks += lorc_blocks(args[10].value, warps)
    shared = pipe_shared_bytes(nt, r, warps, sym) if body in ("p", "p2") else 0
    _driver().launch(device, name, blocks, 32 * warps, args, grid_y=shares, shared=shared)


def _graph_ms(fn, reps: int = 20) -> float:
    """Milliseconds a call, from a CUDA graph of ``reps`` calls replayed (no launch overhead: at a few µs a
    kernel, eager timing would measure Python's launch rate)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (3 * reps)


#: the hand-off a key can tune to from 17 tokens on: the weight unpacked once and cuBLAS (where that wins)
UNPACK: Config = ("unpack", 0, 0, 0)


def pick_fastest(cache: dict, key: tuple, configs: list[Config], run, graph_ms, hand_off=None) -> Config:
    """The fastest of ``configs`` for ``key`` (``run(cfg)`` launches one; ``hand_off``: ``(config, fn)`` timed
    beside them), from ``graph_ms`` timings on the call's own tensors, kept in ``cache``; while a CUDA graph is
    being captured the first config runs untimed and the next eager call tunes (shared by the W4A8 kernel)."""
    if key in cache:
        return cache[key]
    if torch.cuda.is_current_stream_capturing():
        return configs[0]
    times = {cfg: graph_ms(lambda cfg=cfg: run(cfg)) for cfg in configs}
    if hand_off is not None:
        times[hand_off[0]] = graph_ms(hand_off[1])
    cache[key] = min(times, key=times.get)
    return cache[key]


def _tune(key: tuple, nt: int, sym: bool, device: int, args: list, n: int, unpack, lorc: bool = False) -> Config:
    """The fastest config for this key (from 17 tokens on, :data:`UNPACK` among them: ``unpack()`` runs it),
    timed on the call's own tensors (not while a CUDA graph is being captured: there the default runs, and the
    next eager call tunes).  ``lorc``: the LoRC variants (:func:`lorc_configs`)."""
    configs = lorc_configs(nt) if lorc else CONFIGS[nt]
    return pick_fastest(_TUNED, key, configs, lambda cfg: _run(cfg, nt, sym, device, args, n, lorc), _graph_ms,
                        (UNPACK, unpack) if nt >= 4 and not lorc else None)


Lorc = tuple[torch.Tensor, torch.Tensor]


def _check_lorc(lorc: Lorc, n: int, k: int) -> Lorc:
    v, u = lorc
    if v.dtype != torch.float16 or u.dtype != torch.float16 or v.dim() != 2 or u.shape != (n, v.shape[0]) \
            or v.shape[1] != k:
        raise ValueError(f"w4a16_mma: LoRC's fp16 V [r, {k}] and U [{n}, r] expected, got {v.dtype} "
                         f"{tuple(v.shape)} and {u.dtype} {tuple(u.shape)}")
    v, u = v.contiguous(), u.contiguous()
    return (v if v.data_ptr() % 16 == 0 else v.clone()), u  # (the kernel reads V's rows 16 bytes at a time)


def w4a16_mma(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
              bias: torch.Tensor | None = None, perm: torch.Tensor | None = None,
              lorc: Lorc | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T + bias`` for ``M <= MMA_MAX_M`` fp16 tokens, ``W = (code - zero) * scale`` packed by
    :func:`pack_int4_mma`; ``scale``/``zero`` fp16 ``[G, N]`` (``zero`` None: symmetric, 8), ``group`` = K / G (a
    multiple of 64).  ``perm``: act-order columns stored sorted by group, ``W[:, perm]`` (as
    :func:`ptqlab.kernels.w4_gemm.w4a16_gemm`).  ``lorc``: LoRC's fp16 ``(V [r, K], U [N, r])`` (``V``'s columns
    in the packed weight's order), ``+ (x V^T) U^T``: in the kernel's epilogue up to 16 tokens and rank 32, else
    an ``addmm`` after it."""
    m, k = x.shape
    n = packed.shape[0] * 16
    if x.dtype != torch.float16 or m > MMA_MAX_M or m < 1 or packed.shape[1] * 64 != k:
        raise ValueError(f"w4a16_mma: fp16 x [1..{MMA_MAX_M}, {packed.shape[1] * 64}] expected, got "
                         f"{x.dtype} {tuple(x.shape)}")
    x = x.contiguous() if perm is None else x.index_select(1, perm)
    # the kernels read x, the scales and zero points 16 bytes at a time (cp.async in the "p" body)
    x, scale = _aligned16(x), _aligned16(scale.contiguous())
    zero = None if zero is None else _aligned16(zero.contiguous())
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    nt, sym, device = token_tiles(m), zero is None, x.device.index or 0
    if lorc is not None:
        lorc = _check_lorc(lorc, n, k)
    fused = lorc is not None and nt <= LORC_MAX_NT and lorc[0].shape[0] <= LORC_MAX_RANK
    v, u = lorc if fused else (None, None)
    ws, cnt = reserve(n, x.device)
    tw, tc = lorc_workspace(x.device)
    args = [_ptr(x), _ptr(packed), _ptr(scale), _ptr(zero), _ptr(bias), _ptr(y), _ptr(ws), _ptr(cnt),
            ctypes.c_int(m), ctypes.c_int(n), ctypes.c_int(k), ctypes.c_int(group // 64),
            _ptr(v), _ptr(u), ctypes.c_int(0 if v is None else v.shape[0]), _ptr(tw), _ptr(tc)]

    def unpack() -> torch.Tensor:
        return torch.nn.functional.linear(x, dequant_mma(packed, scale, zero, group), bias)

    rank = 0 if lorc is None else lorc[0].shape[0]
    cfg = _tune((nt, n, k, group, sym, device, rank if fused else 0), nt, sym, device, args, n, unpack, fused)
    if cfg == UNPACK:
        y = unpack()
    else:
        _run(cfg, nt, sym, device, args, n, fused)
    if lorc is not None and not fused:  # many tokens or a large rank: the product after the kernel
        y.addmm_(torch.nn.functional.linear(x, lorc[0]), lorc[1].t())
    return y


def dequant_mma(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
                dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The fp16 weight ``W [N, K]`` from the MMA layout (one pass; for many tokens: unpack once, then cuBLAS)."""
    if dtype != torch.float16:
        raise ValueError(f"dequant_mma writes fp16, got {dtype}")
    n, k = packed.shape[0] * 16, packed.shape[1] * 64
    w = torch.empty(n, k, dtype=torch.float16, device=packed.device)
    lanes = packed.numel() // 4
    args = [_ptr(packed), _ptr(scale), _ptr(zero), _ptr(w), ctypes.c_int(n), ctypes.c_int(k),
            ctypes.c_int(group // 64)]
    _driver().launch(packed.device.index or 0, "w4_mma_dequant", -(-lanes // 256), 256, args)
    return w
