"""The W4A8 MMA kernel's arithmetic and launch path on CPU (the kernel itself: tests/gpu/test_gpu_w4a8_mma.py).

:func:`ptqlab.kernels.w4a8_mma.emulate` does what the CUDA body does with its registers (the same bit operations
on the packed words, the same byte permutation of the input, the m16n8k32 fragments where PTX places them); it
is checked against the dense integer product, so the layout's index math is tested independently of the GPU.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from ptqlab.kernels import w4_mma, w4a8_mma
from ptqlab.kernels.real import KERNEL_BACKENDS, RealLinear, scheme_of
from ptqlab.kernels.w4_mma import pack_int4_mma, unpack_int4_mma_reference
from ptqlab.models import QuantLinear
from ptqlab.quantizers import PER_ROW, QuantSpec, fake_quantize, weight_qparams

A8 = QuantSpec(8, True, PER_ROW)


@pytest.mark.parametrize("n,k,m", [(16, 64, 1), (32, 192, 5), (48, 128, 9), (16, 256, 17)])
def test_the_kernels_register_arithmetic_equals_the_integer_product(n, k, m):
    gen = torch.Generator().manual_seed(n + k + m)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    codes[0], codes[1, : k // 2] = 0, 15  # the grid's edges: 16 (code - 8) = -128 and 112
    x = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    x[0, :3] = torch.tensor([-128, 127, 0], dtype=torch.int8)
    got = w4a8_mma.emulate(x, pack_int4_mma(codes))
    want = 16 * (x.to(torch.int64) @ (codes.to(torch.int64) - 8).t())
    assert torch.equal(got, want)


def test_a_permutation_of_the_input_bytes_is_caught():
    # the test above can fail: without the kernel's byte permutation the product is wrong
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (16, 64), generator=gen, dtype=torch.uint8)
    x = torch.randint(-128, 128, (1, 64), generator=gen, dtype=torch.int8)
    swapped = x.view(1, 16, 4)[..., [0, 2, 1, 3]].reshape(1, 64)  # the permutation undone by the emulation
    want = 16 * (x.to(torch.int64) @ (codes.to(torch.int64) - 8).t())
    assert not torch.equal(w4a8_mma.emulate(swapped, pack_int4_mma(codes)), want)


def test_cubin_names_and_shared_memory_cover_every_config():
    source = w4_mma.SOURCE.read_text()
    for nt, configs in w4a8_mma.CONFIGS.items():
        assert configs and nt == w4_mma.token_tiles(8 * nt)
        for body, r, warps, shares in configs:
            assert body == "p" and f"W4A8_MMAP({nt}, {r})" in source
            assert 4 <= warps <= 8 and shares >= 1  # __launch_bounds__(256); the input staging's loop
            assert w4a8_mma.shared_bytes(nt, r, warps) <= 227 * 1024  # H100/H200: 227 KiB a block
    assert "w4a8_mma_unpack" in source
    assert f"constexpr int A8_XROW = {w4a8_mma.XROW};" in source
    assert f"constexpr int A8_STAGES = {w4a8_mma.STAGES};" in source
    assert "x_bytes = 8 * NT * A8_XROW, w_bytes = warps * R * 512, stage_bytes = x_bytes + w_bytes;" in source
    assert w4a8_mma.shared_bytes(16, 2, 8) == 4 * (16 * 8 * 64 + 8 * 2 * 512)
    assert max(w4a8_mma.CONFIGS) * 8 == w4a8_mma.MMA_MAX_M


def _layer(n: int, k: int, dtype=torch.float16, lorc: bool = False) -> QuantLinear:
    spec = QuantSpec(4, True, PER_ROW)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.02
    layer = QuantLinear(w.to(dtype), None, "l")
    layer.weight_spec, layer.act_spec = spec, A8
    layer.set_weight_qparams(*weight_qparams(w, spec))
    layer.weight.data.copy_(fake_quantize(w, spec).to(dtype))
    if lorc:
        layer.lorc_u, layer.lorc_v = torch.zeros(n, 8, dtype=dtype), torch.zeros(8, k, dtype=dtype)
    return layer


@pytest.mark.parametrize("dtype,n,k,lorc,fits", [
    (torch.float16, 64, 128, False, True), (torch.bfloat16, 64, 128, False, False),
    (torch.float16, 40, 128, False, False), (torch.float16, 64, 96, False, False),
    (torch.float16, 64, 128, True, False), (torch.bfloat16, 64, 128, True, False)])
def test_the_backend_takes_the_fp16_w4a8_layers_it_fits_and_the_triton_kernel_the_rest(monkeypatch, dtype, n, k,
                                                                                        lorc, fits):
    monkeypatch.setattr(w4_mma, "_STATE", {"reason": None})  # as on a GPU where it built
    layer = _layer(n, k, dtype, lorc)
    assert KERNEL_BACKENDS["w4a8-mma"].fits(layer) is fits
    assert scheme_of(layer) == ("w4a8-mma" if fits else "w4a8-triton")
    assert scheme_of(layer, "tinygemm") == "w4a8-int8"
    monkeypatch.setattr(w4_mma, "_STATE", {"reason": "no CUDA GPU"})
    assert scheme_of(layer) == "w4a8-triton"


def test_a_real_layer_holds_the_packed_codes_and_the_row_scales_alone():
    layer = _layer(32, 128)
    real = RealLinear(layer, "w4a8-mma", keep_original=False)
    names = {n for n, b in real.named_buffers() if b is not None}
    assert names == {"w_packed", "w_scale"}
    assert real.w_packed.shape == (2, 2, 32, 4) and real.w_scale.shape == (32,) and real.w_scale.dtype == torch.float32
    deq = (unpack_int4_mma_reference(real.w_packed).float() - 8) * real.w_scale[:, None]
    # the float32 grid itself: the fp16 weight is its rounding (half an ulp, 2^-11 relative)
    torch.testing.assert_close(deq.half(), layer.weight, rtol=0, atol=0)


class _FakeDriver:
    def __init__(self, out_bytes: int) -> None:
        self.launches: list = []
        self.out_bytes = out_bytes

    def launch(self, device, name, grid, threads, args, grid_y=1, shared=0):
        self.launches.append((name, grid, threads, grid_y, shared, args))
        if name.startswith("w4a8_mmap"):
            ctypes.memset(args[5].value, 0, self.out_bytes)


def test_the_launch_takes_its_config_grid_and_shared_memory(monkeypatch):
    m, n, k = 40, 208, 1088
    driver = _FakeDriver(m * n * 2)
    monkeypatch.setattr(w4_mma, "_driver", lambda: driver)
    monkeypatch.setattr(w4a8_mma, "_tune", lambda *a, **kw: ("p", 2, 4, 8))
    gen = torch.Generator().manual_seed(0)
    packed = pack_int4_mma(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8))
    codes = torch.randint(-128, 128, (m * k + 1,), generator=gen, dtype=torch.int8)[1:].view(m, k)
    assert codes.data_ptr() % 16 != 0
    y = w4a8_mma.w4a8_mma(codes, torch.ones(m), packed, torch.ones(n))
    name, grid, threads, grid_y, shared, args = driver.launches[-1]
    assert name == "w4a8_mmap_nt8_r2" and threads == 128 and grid_y == 8 and grid == -(-(n // 16) // 8)
    assert shared == w4a8_mma.shared_bytes(8, 2, 4) and args[0].value % 16 == 0  # the input copied to alignment
    assert [a.value for a in args[8:]] == [m, n, k] and y.shape == (m, n) and y.dtype == torch.float16


def test_tuning_times_every_config_and_the_hand_off_once_and_the_default_while_capturing(monkeypatch):
    runs: list = []
    monkeypatch.setattr(w4a8_mma, "_TUNED", {})
    monkeypatch.setattr(w4a8_mma, "_run", lambda cfg, *args: runs.append(cfg))
    fastest = w4a8_mma.CONFIGS[4][5]
    monkeypatch.setattr(w4a8_mma, "_graph_ms", lambda fn: (fn(), 0.5 if runs and runs[-1] == fastest else 2.0)[1])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert w4a8_mma._tune(("k",), 4, 0, [], 64, lambda: None) == w4a8_mma.CONFIGS[4][0] and not runs
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert w4a8_mma._tune(("k",), 4, 0, [], 64, lambda: None) == fastest
    assert len(runs) == len(w4a8_mma.CONFIGS[4])
    assert w4a8_mma._tune(("k",), 4, 0, [], 64, lambda: None) == fastest and len(runs) == len(w4a8_mma.CONFIGS[4])
    runs.clear()  # the hand-off: timed from 17 tokens (4 token tiles) on, and taken where it is fastest
    monkeypatch.setattr(w4a8_mma, "_graph_ms", lambda fn: 0.1 if fn() == "unpack" else 1.0)
    assert w4a8_mma._tune(("other",), 4, 0, [], 64, lambda: "unpack") == w4a8_mma.UNPACK
    assert w4a8_mma._tune(("one token",), 1, 0, [], 64, lambda: "unpack") != w4a8_mma.UNPACK


def test_many_tokens_take_the_int8_unpack_and_the_int8_gemm(monkeypatch):
    calls: list = []
    monkeypatch.setattr(w4a8_mma, "_unpack_path", lambda *a: calls.append(a) or torch.zeros(1))
    monkeypatch.setattr(w4a8_mma, "_run", lambda *a: pytest.fail("the MMA kernel above MMA_MAX_M"))
    m, n, k = w4a8_mma.MMA_MAX_M + 1, 16, 64
    packed = pack_int4_mma(torch.zeros(n, k, dtype=torch.uint8))
    w4a8_mma.w4a8_mma(torch.zeros(m, k, dtype=torch.int8), torch.ones(m), packed, torch.ones(n))
    assert len(calls) == 1


def test_bad_input_is_refused_with_a_clear_error():
    packed = pack_int4_mma(torch.zeros(16, 128, dtype=torch.uint8))
    ok = torch.zeros(2, 128, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"int8 codes \[M, 128\]"):
        w4a8_mma.w4a8_mma(ok.half(), torch.ones(2), packed, torch.ones(16))
    with pytest.raises(ValueError, match=r"int8 codes \[M, 128\]"):
        w4a8_mma.w4a8_mma(ok[:, :64], torch.ones(2), packed, torch.ones(16))
    with pytest.raises(ValueError, match=r"float32 scales \[2\] and \[16\]"):
        w4a8_mma.w4a8_mma(ok, torch.ones(3), packed, torch.ones(16))
    with pytest.raises(ValueError, match=r"float32 scales"):
        w4a8_mma.w4a8_mma(ok, torch.ones(2), packed, torch.ones(16, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"fp16 bias \[16\]"):
        w4a8_mma.w4a8_mma(ok, torch.ones(2), packed, torch.ones(16), bias=torch.ones(16))
