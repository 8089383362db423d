"""The W4A16 MMA kernel's layout and arithmetic on CPU (the kernel itself runs in tests/gpu/test_gpu_w4_mma.py).

The emulation below does what csrc/w4_mma.cu does, step by step and in the same fp16 arithmetic: per lane, the
``lop3`` bit patterns read as fp16 pairs, the exact subtraction and the one rounding by the scale, the registers
placed where PTX puts an m16n8k16 A / B fragment, and the product of each step's 16x16 by 16x8 fragments.  It
checks the index math of the layout against a dense product, independently of :func:`pack_int4_mma`'s own view.
"""

from __future__ import annotations

import stat
import textwrap

import numpy as np
import pytest
import torch

from ptqlab.kernels import w4_mma
from ptqlab.kernels.real import KERNEL_BACKENDS, scheme_of
from ptqlab.kernels.w4_mma import pack_int4_mma, unpack_int4_mma_reference
from ptqlab.models import QuantLinear
from ptqlab.quantizers import PER_ROW, QuantSpec


def _fp16_pairs(words: np.ndarray) -> np.ndarray:
    """uint32 words -> [..., 2] fp16 (low half first, as the GPU's registers)."""
    return words.astype(np.uint32).view(np.float16).reshape(*words.shape, 2)


def _emulate(packed: torch.Tensor, scale: np.ndarray, zero: np.ndarray | None, x: np.ndarray,
             post_scale: bool = False) -> np.ndarray:
    """y [M, N] the kernel computes: ``scale``/``zero`` fp16 [G, N], x fp16 [M <= 8, K]; float64 MMA sums.
    ``post_scale``: the "p" body at few tokens, A = the exact fp16 ``code - zero`` and each k-tile's sums (C's
    rows g / g + 8 of a tile) times the rows' scales (csrc/w4_mma.cu: dequant_codes, post_scale)."""
    tn, chunks = packed.shape[:2]
    n, k = tn * 16, chunks * 64
    m = x.shape[0]
    group_chunks = chunks // scale.shape[0]
    words = packed.numpy().astype(np.int64) & 0xFFFFFFFF
    y = np.zeros((n, 8))
    xb = np.zeros((8, k), dtype=np.float16)
    xb[:m] = x
    for tile in range(tn):
        for c in range(chunks):
            grp = c // group_chunks
            part = np.zeros((16, 8))  # this k-tile's sums (post-scaling)
            for s in range(4):
                a = np.zeros((16, 16), dtype=np.float16)  # the step's A fragment: rows, fragment columns
                b = np.zeros((16, 8), dtype=np.float16)  # B: fragment rows (k), tokens
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    q = words[tile, c, lane, s]
                    r0, r1 = 16 * tile + g, 16 * tile + g + 8
                    z0 = np.float16(8 if zero is None else zero[grp, r0])
                    z1 = np.float16(8 if zero is None else zero[grp, r1])
                    s0, s1 = np.float16(scale[grp, r0]), np.float16(scale[grp, r1])
                    if post_scale:
                        s0 = s1 = np.float16(1)
                    lo = _fp16_pairs(np.array([(q & 0x000F000F) | 0x64006400, ((q >> 8) & 0x000F000F) | 0x64006400]))
                    hi = _fp16_pairs(np.array([(q & 0x00F000F0) | 0x64006400, ((q >> 8) & 0x00F000F0) | 0x64006400]))
                    regs = [(lo[0] - (np.float16(1024) + z0)) * s0,
                            (hi[0] * np.float16(0.0625) - (np.float16(64) + z1)) * s1,
                            (lo[1] - (np.float16(1024) + z0)) * s0,
                            (hi[1] * np.float16(0.0625) - (np.float16(64) + z1)) * s1]
                    # PTX m16n8k16 .f16 A: a0a1 (g, 2t..), a2a3 (g+8, 2t..), a4a5 (g, 2t+8..), a6a7 (g+8, 2t+8..)
                    a[g, 2 * t:2 * t + 2], a[g + 8, 2 * t:2 * t + 2] = regs[0], regs[1]
                    a[g, 2 * t + 8:2 * t + 10], a[g + 8, 2 * t + 8:2 * t + 10] = regs[2], regs[3]
                    # B: b0b1 (k 2t, 2t+1; token g), b2b3 (2t+8, 2t+9); the lane loads columns 64c + 16t + 4s + 0..3
                    k0 = 64 * c + 16 * t + 4 * s
                    b[2 * t:2 * t + 2, g], b[2 * t + 8:2 * t + 10, g] = xb[g, k0:k0 + 2], xb[g, k0 + 2:k0 + 4]
                part += a.astype(np.float64) @ b.astype(np.float64)
            rows = scale[grp, 16 * tile:16 * tile + 16].astype(np.float64)[:, None] if post_scale else 1.0
            y[16 * tile:16 * tile + 16] += rows * part
    return y[:, :m].T


def _grid(n: int, k: int, group: int, symmetric: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    codes[0], codes[1, : k // 2] = 0, 15  # the grid's edges
    groups = k // group
    scale = (torch.rand(groups, n, generator=gen) * 0.05 + 1e-3).half().numpy()
    zero = None if symmetric else torch.randint(0, 16, (groups, n), generator=gen).half().numpy()
    return codes, scale, zero


def _dense(codes: torch.Tensor, scale: np.ndarray, zero: np.ndarray | None, group: int) -> np.ndarray:
    """The fake-quant fp16 weight ``fp16((code - zero) * scale)`` [N, K]."""
    s = np.repeat(scale.T.astype(np.float32), group, axis=1)
    z = 8.0 if zero is None else np.repeat(zero.T.astype(np.float32), group, axis=1)
    return ((codes.numpy().astype(np.float32) - z) * s).astype(np.float16)


@pytest.mark.parametrize("n,k", [(16, 64), (48, 192), (32, 320)])
def test_pack_round_trips_and_keeps_the_sources_word_table(n, k):
    codes, _, _ = _grid(n, k, 64, True, n + k)
    packed = pack_int4_mma(codes)
    assert packed.shape == (n // 16, k // 64, 32, 4) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4_mma_reference(packed), codes)
    # the header of csrc/w4_mma.cu: word s of lane (g, t), rows g / g + 8, k0 = 16 t + 4 s
    table = {0: (0, 0), 1: (8, 0), 2: (0, 2), 3: (8, 2), 4: (0, 1), 5: (8, 1), 6: (0, 3), 7: (8, 3)}
    for tile, c, lane, s in [(0, 0, 0, 0), (n // 16 - 1, k // 64 - 1, 31, 3), (0, k // 64 - 1, 13, 2)]:
        word = int(packed[tile, c, lane, s]) & 0xFFFFFFFF
        g, t = lane // 4, lane % 4
        for nibble, (dr, dk) in table.items():
            assert (word >> 4 * nibble) & 15 == codes[16 * tile + g + dr, 64 * c + 16 * t + 4 * s + dk]


@pytest.mark.parametrize("group,symmetric,m", [(64, True, 1), (128, False, 3), (None, True, 8), (64, False, 5)])
def test_the_kernels_fragment_arithmetic_equals_the_dense_product(group, symmetric, m):
    n, k = 32, 256
    group = group or k  # None: one group a row
    codes, scale, zero = _grid(n, k, group, symmetric, group + m)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2).half().numpy()
    got = _emulate(pack_int4_mma(codes), scale, zero, x)
    w = _dense(codes, scale, zero, group)
    want = x.astype(np.float64) @ w.astype(np.float64).T
    # the same fp16 weights, summed in float64 in another order
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    # post-scaled ("p" body, 1-16 tokens): the exact (code - zero) * scale, no fp16 rounding of the weight
    got = _emulate(pack_int4_mma(codes), scale, zero, x, post_scale=True)
    s64 = np.repeat(scale.T.astype(np.float64), group, axis=1)
    z64 = 8.0 if zero is None else np.repeat(zero.T.astype(np.float64), group, axis=1)
    exact = x.astype(np.float64) @ ((codes.numpy().astype(np.float64) - z64) * s64).T
    np.testing.assert_allclose(got, exact, rtol=1e-12, atol=1e-9)


def _emulate_lorc(v: np.ndarray, u: np.ndarray, x: np.ndarray) -> np.ndarray:
    """LoRC's ``(x V^T) U^T`` [M, N] as the kernel's LORC variant computes it: V [rank <= 32, K] row-major fp16 read
    as rank tiles of 16 rows, lane (g, t) loading 8 halves of rows 16 rt + g and + 8 at columns 64c + 16t + 8h
    (v0, v1), step 2h's A registers {v0.x, v1.x, v0.y, v1.y} and step 2h + 1's {v0.z, v1.z, v0.w, v1.w}; the x
    fragments as the weight's; then U [N, rank] times t as each output is written."""
    rank, k = v.shape
    m = x.shape[0]
    vp = np.zeros((32, k), dtype=np.float16)
    vp[:rank] = v  # rows past rank: the kernel's predicated-off loads (zeros)
    xb = np.zeros((8, k), dtype=np.float16)
    xb[:m] = x
    t_acc = np.zeros((32, 8))
    for rt in range(2):
        for c in range(k // 64):
            for h in range(2):
                for step in range(2):  # 2h, 2h + 1
                    a = np.zeros((16, 16), dtype=np.float16)
                    b = np.zeros((16, 8), dtype=np.float16)
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        col = 64 * c + 16 * t + 8 * h
                        v0, v1 = vp[16 * rt + g, col:col + 8], vp[16 * rt + g + 8, col:col + 8]
                        regs = [v0[4 * step:4 * step + 2], v1[4 * step:4 * step + 2],
                                v0[4 * step + 2:4 * step + 4], v1[4 * step + 2:4 * step + 4]]
                        a[g, 2 * t:2 * t + 2], a[g + 8, 2 * t:2 * t + 2] = regs[0], regs[1]
                        a[g, 2 * t + 8:2 * t + 10], a[g + 8, 2 * t + 8:2 * t + 10] = regs[2], regs[3]
                        k0 = col + 4 * step  # the x registers of this step: x[j].x, .y (step 2h) or .z, .w
                        b[2 * t:2 * t + 2, g], b[2 * t + 8:2 * t + 10, g] = xb[g, k0:k0 + 2], xb[g, k0 + 2:k0 + 4]
                    t_acc[16 * rt:16 * rt + 16] += a.astype(np.float64) @ b.astype(np.float64)
    return (u.astype(np.float64) @ t_acc[:rank])[:, :m].T


@pytest.mark.parametrize("rank,m", [(1, 1), (8, 3), (16, 8), (17, 2), (24, 5), (32, 1)])
def test_lorc_fragments_from_row_major_v_equal_the_dense_product(rank, m):
    k, n = 128, 16
    gen = torch.Generator().manual_seed(rank + m)
    v = torch.randn(rank, k, generator=gen).half().numpy()
    u = torch.randn(n, rank, generator=gen).half().numpy()
    x = torch.randn(m, k, generator=gen).half().numpy()
    want = (x.astype(np.float64) @ v.astype(np.float64).T) @ u.astype(np.float64).T
    np.testing.assert_allclose(_emulate_lorc(v, u, x), want, rtol=1e-9, atol=1e-9)


def test_pack_rejects_shapes_off_the_tile():
    with pytest.raises(ValueError, match="divisible by 16 .* by 64, got 24x128"):
        pack_int4_mma(torch.zeros(24, 128, dtype=torch.uint8))
    with pytest.raises(ValueError, match="got 32x96"):
        pack_int4_mma(torch.zeros(32, 96, dtype=torch.uint8))


def test_token_tiles():
    assert [w4_mma.token_tiles(m) for m in (1, 8, 9, 16, 17, 33, 64, 65, 128)] == [1, 1, 2, 2, 4, 8, 8, 16, 16]
    assert max(w4_mma.CONFIGS) * 8 == w4_mma.MMA_MAX_M


def _fake_nvcc(tmp_path, body: str) -> str:
    script = tmp_path / "nvcc"
    script.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_build_compiles_once_into_the_cache(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    # a stand-in nvcc: writes its -o file (the argument after -o) and counts its calls
    nvcc = _fake_nvcc(tmp_path, f"""
        echo x >> {calls}
        while [ "$1" != "-o" ]; do shift; done
        printf CUBIN > "$2"
        """)
    monkeypatch.setenv("PTQLAB_NVCC", nvcc)
    monkeypatch.setenv("PTQLAB_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="building ptqlab's W4A16 CUDA kernel for sm_90"):
        assert w4_mma._build("sm_90") == b"CUBIN"
    assert w4_mma._build("sm_90") == b"CUBIN"  # from the cache: no second compile
    assert calls.read_text().count("x") == 1
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("-sm_90.cubin")  # no temporary left behind


def test_build_failure_says_what_nvcc_said(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQLAB_NVCC", _fake_nvcc(tmp_path, "echo 'w4_mma.cu(1): error: no sm_99' >&2; exit 2\n"))
    monkeypatch.setenv("PTQLAB_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=r"nvcc failed \(2\): .*no sm_99"):
        w4_mma._build("sm_99")
    assert not any(p.suffix == ".cubin" for p in (tmp_path / "cache").rglob("*"))


def test_without_a_gpu_the_triton_kernels_keep_w4a16(monkeypatch):
    monkeypatch.setattr(w4_mma, "_STATE", {})
    assert w4_mma.unavailable() == "no CUDA GPU" or torch.cuda.is_available()
    monkeypatch.setattr(w4_mma, "_STATE", {})
    monkeypatch.setenv("PTQLAB_W4_MMA", "0")
    assert w4_mma.unavailable() == "PTQLAB_W4_MMA=0"
    layer = QuantLinear(torch.zeros(64, 128, dtype=torch.float16), None, "l")
    layer.weight_spec = QuantSpec(4, True, 128)
    assert scheme_of(layer) == "w4a16-triton"


@pytest.mark.parametrize("dtype,n,k,lorc,fits", [
    (torch.float16, 64, 128, False, True), (torch.bfloat16, 64, 128, False, False),
    (torch.float16, 40, 128, False, False), (torch.float16, 64, 96, False, False),
    (torch.float16, 64, 128, True, True), (torch.bfloat16, 64, 128, True, False)])
def test_the_mma_backend_takes_only_the_layers_it_fits(monkeypatch, dtype, n, k, lorc, fits):
    monkeypatch.setattr(w4_mma, "_STATE", {"reason": None})  # as on a GPU where it built
    layer = QuantLinear(torch.zeros(n, k, dtype=dtype), None, "l")
    layer.weight_spec = QuantSpec(4, True, 64)
    if lorc:
        layer.lorc_u = torch.zeros(n, 8, dtype=dtype)
    assert KERNEL_BACKENDS["w4a16-mma"].fits(layer) is fits
    assert scheme_of(layer) == ("w4a16-mma" if fits else "w4a16-triton")
    for group in (32, 96):  # groups the kernel does not read: the Triton kernels (32), or none of ptqlab's (96)
        layer.weight_spec = QuantSpec(4, True, group)
        assert scheme_of(layer) != "w4a16-mma"
    layer.weight_spec = QuantSpec(4, False, PER_ROW)
    assert scheme_of(layer) == ("w4a16-mma" if fits else "w4a16-triton")
    assert scheme_of(layer, "tinygemm") != "w4a16-mma"


def test_cubin_names_cover_every_config():
    source = w4_mma.SOURCE.read_text()
    for nt, configs in w4_mma.CONFIGS.items():
        for body, r, warps, shares in configs:
            assert f"W4_MMA{'' if body == 'k' else body.upper()}({nt}, {r})" in source
            assert 32 * warps <= 256 and shares >= 1 and body in ("k", "x", "p", "p2")  # the kernels' __launch_bounds__
            assert body == "k" or warps >= 4  # the staging of the inputs assumes 128 threads or more
            if body in ("p", "p2"):  # the pipelined body's stages fit the GPU's shared memory (H100/H200: 227 KiB)
                assert w4_mma.pipe_shared_bytes(nt, r, warps, sym=False) <= 227 * 1024
    assert "w4_mma_dequant" in source
    for nt in w4_mma.CONFIGS:  # LoRC's variants: the "k" body at 1..16 tokens, none beyond
        lorc = w4_mma.lorc_configs(nt)
        assert bool(lorc) == (nt <= w4_mma.LORC_MAX_NT) and all(body == "k" for body, *_ in lorc)
        for _, r, _, _ in lorc:
            assert f"W4_MMA_LORC({nt}, {r})" in source
    # the LoRC launch's extra blocks: the Python grid and the kernel's own count must agree
    assert f"constexpr int LORC_BLOCKS = {w4_mma.LORC_BLOCKS};" in source
    assert "min(LORC_BLOCKS, ((K >> 6) + warps - 1) / warps)" in source
    assert [w4_mma.lorc_blocks(k, w) for k, w in ((64, 8), (4096, 8), (4096, 4), (28672, 4))] == [1, 8, 16, 64]
    assert f"tred[LORC ? {w4_mma.LORC_MAX_RANK} : 1]" in source  # (t's rank rows)
    # the "p" body's dynamic shared memory: the Python size and the kernel's own layout must agree
    assert f"constexpr int PIPE_XROW = {w4_mma.PIPE_XROW};" in source
    assert "constexpr int pipe_stages() { return NT >= 16 ? 3 : 4; }" in source
    assert [w4_mma.pipe_stages(nt) for nt in (1, 8, 16)] == [4, 4, 3]
    # post-scaling: the Python rule (which reference the GPU tests hold a config to) and the kernel's own
    assert f"constexpr int POST_SCALE_MAX_NT = {w4_mma.POST_SCALE_MAX_NT};" in source
    assert "constexpr bool POST = NT <= POST_SCALE_MAX_NT;" in source
    assert [w4_mma.post_scaled(c, nt) for c, nt in ((("p", 2, 4, 8), 1), (("p2", 1, 8, 1), 2), (("p", 2, 4, 8), 4),
                                                    (("k", 1, 8, 1), 1), (("x", 1, 4, 1), 2))] == \
        [w4_mma.POST_SCALE_MAX_NT >= 1, w4_mma.POST_SCALE_MAX_NT >= 2, w4_mma.POST_SCALE_MAX_NT >= 4, False, False]
    assert "x_bytes = 8 * NT * PIPE_XROW * 2, w_bytes = warps * R * 512, s_bytes = rows * 2;" in source
    assert "stage_bytes = x_bytes + w_bytes + (SYM ? 1 : 2) * s_bytes;" in source
    assert w4_mma.pipe_shared_bytes(8, 2, 4, sym=True) == 4 * (8 * 8 * 72 * 2 + 4 * 2 * 512 + 16 * 2 * 4 * 2)


def test_tuning_takes_the_fastest_config_once_and_the_default_while_capturing(monkeypatch):
    # the timing stands in for CUDA-graph replays: a made-up time per config, the hand-off slowest or fastest
    runs: list = []
    monkeypatch.setattr(w4_mma, "_TUNED", {})
    monkeypatch.setattr(w4_mma, "_run", lambda cfg, *args: runs.append(cfg))
    fake_ms = {cfg: 1.0 + i for i, cfg in enumerate(w4_mma.CONFIGS[4])}
    fastest = w4_mma.CONFIGS[4][3]
    fake_ms[fastest] = 0.5
    unpack_ms = [9.0]

    def graph_ms(fn):
        before = len(runs)
        fn()
        return fake_ms.get(runs[-1], 5.0) if len(runs) > before else unpack_ms[0]

    monkeypatch.setattr(w4_mma, "_graph_ms", graph_ms)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert w4_mma._tune(("key",), 4, True, 0, [], 64, lambda: None) == w4_mma.CONFIGS[4][0]
    assert not runs and not w4_mma._TUNED  # nothing timed inside a capture, nothing remembered
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert w4_mma._tune(("key",), 4, True, 0, [], 64, lambda: None) == fastest
    timed = len(runs)
    assert w4_mma._tune(("key",), 4, True, 0, [], 64, lambda: None) == fastest and len(runs) == timed  # cached
    unpack_ms[0] = 0.1  # from 17 tokens (4 token tiles) on the hand-off competes, and wins here
    assert w4_mma._tune(("other",), 4, True, 0, [], 64, lambda: None) == w4_mma.UNPACK
    assert w4_mma._tune(("one token",), 1, True, 0, [], 64, lambda: None) != w4_mma.UNPACK  # not at 1..16


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_real_layer_holds_the_packed_codes_and_the_grid_alone(symmetric):
    # the build on CPU (the forward needs the GPU): one layout, fp16 scales [G, N], zero points only when asymmetric;
    # unpacked with the grid it gives the layer's fake-quant weight (up to the scale's rounding to fp16)
    from ptqlab.kernels.real import RealLinear
    from ptqlab.quantizers import fake_quantize, weight_qparams

    spec = QuantSpec(4, symmetric, 64)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1)) * 0.02
    layer = QuantLinear(w.clone(), None, "l")
    layer.weight_spec = spec
    layer.set_weight_qparams(*weight_qparams(w, spec))
    layer.weight.data.copy_(fake_quantize(w, spec))
    real = RealLinear(layer, "w4a16-mma", keep_original=False)
    names = {n for n, b in real.named_buffers() if b is not None}
    assert names == {"w_packed", "w_scale"} | ({"w_zero"} if not symmetric else set())
    assert real.w_packed.shape == (2, 2, 32, 4) and real.w_scale.shape == (2, 32) and real.group == 64
    codes = unpack_int4_mma_reference(real.w_packed).float()
    zero = 8.0 if symmetric else real.w_zero.t().float().repeat_interleave(64, 1)
    deq = (codes - zero) * real.w_scale.t().float().repeat_interleave(64, 1)
    assert float((deq - layer.weight).abs().max()) <= float(layer.weight.abs().max()) * 2e-3


@pytest.mark.parametrize("m,rank,in_kernel", [(1, 8, True), (16, 24, True), (17, 8, False), (3, 40, False)])
def test_lorc_launches_its_variant_up_to_16_tokens_and_rank_32_else_adds_the_product(monkeypatch, m, rank,
                                                                                      in_kernel):
    # the launch path on CPU with a stand-in driver (the kernel itself: tests/gpu): which kernel, its grid with
    # t's blocks in front, the LoRC arguments; outside the kernel's reach the product is added after it
    import ctypes

    launches: list = []

    class FakeDriver:
        def launch(self, device, name, grid, threads, args, grid_y=1, shared=0):
            launches.append((name, grid, threads, grid_y, args))
            if name != "w4_mma_dequant":  # (the unpack hand-off, timed at 17 tokens: its output is not used here)
                ctypes.memset(args[5].value, 0, m * n * 2)  # the output: zeros (the kernel's sum is not run here)

    monkeypatch.setattr(w4_mma, "_driver", lambda: FakeDriver())
    monkeypatch.setattr(w4_mma, "_TUNED", {})
    monkeypatch.setattr(w4_mma, "_graph_ms", lambda fn: (fn(), 1.0)[1])  # every config "as fast": the first
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (a CPU build has no CUDA state)
    n, k = 208, 1088
    gen = torch.Generator().manual_seed(m + rank)
    packed = pack_int4_mma(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8))
    scale = torch.full((k // 64, n), 0.01, dtype=torch.float16)
    v = (torch.randn(rank, k, generator=gen) * 0.02).half()
    u = (torch.randn(n, rank, generator=gen) * 0.1).half()
    x = torch.randn(m, k, generator=gen).half()
    y = w4_mma.w4a16_mma(x, packed, scale, None, 64, lorc=(v, u))
    name, grid, threads, grid_y, args = launches[-1]
    assert name.startswith("w4_mma_nt")
    nt = w4_mma.token_tiles(m)
    cfg = (w4_mma.lorc_configs(nt) if in_kernel else w4_mma.CONFIGS[nt])[0]
    assert all(lname.endswith("_lorc") == in_kernel for lname, *_ in launches)
    rows = -(-(n // 16) // (cfg[1] * cfg[2] if cfg[0] == "x" else cfg[1]))
    assert grid == rows + (w4_mma.lorc_blocks(k, cfg[2]) if in_kernel else 0) and grid_y == cfg[3]
    assert args[14].value == (rank if in_kernel else 0) and bool(args[12].value) == in_kernel
    assert bool(args[15].value) and bool(args[16].value)  # t's workspace and counters, always passed
    want = torch.zeros(m, n) if in_kernel else (x.float() @ v.float().t()) @ u.float().t()
    torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="LoRC's fp16 V"):
        w4_mma.w4a16_mma(x, packed, scale, None, 64, lorc=(v, u[:, :1]))


def test_the_pipelined_body_launches_with_its_grid_and_shared_memory(monkeypatch):
    # CPU, a stand-in driver: the "p" config's kernel name, blocks of 16 R warps rows, K shares, the dynamic
    # shared memory of its stages; a misaligned input (a view 2 bytes into its storage) is copied first
    import ctypes

    launches: list = []

    class FakeDriver:
        def launch(self, device, name, grid, threads, args, grid_y=1, shared=0):
            launches.append((name, grid, threads, grid_y, shared, args))
            ctypes.memset(args[5].value, 0, m * n * 2)

    monkeypatch.setattr(w4_mma, "_driver", lambda: FakeDriver())
    monkeypatch.setattr(w4_mma, "_TUNED", {})
    monkeypatch.setattr(w4_mma, "_tune", lambda *a, **kw: ("p", 2, 4, 8))
    m, n, k = 40, 208, 1088
    gen = torch.Generator().manual_seed(0)
    packed = pack_int4_mma(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8))
    scale = torch.full((k // 64, n), 0.01, dtype=torch.float16)
    zero = torch.full((k // 64, n), 8.0, dtype=torch.float16)
    x = torch.randn(m * k + 1, generator=gen).half()[1:].view(m, k)
    assert x.data_ptr() % 16 != 0
    w4_mma.w4a16_mma(x, packed, scale, zero, 64)
    name, grid, threads, grid_y, shared, args = launches[-1]
    assert name == "w4_mmap_nt8_r2_asym" and threads == 128 and grid_y == 8
    assert grid == -(-(n // 16) // (2 * 4)) and shared == w4_mma.pipe_shared_bytes(8, 2, 4, sym=False)
    assert args[0].value % 16 == 0 and args[2].value % 16 == 0 and args[3].value % 16 == 0
