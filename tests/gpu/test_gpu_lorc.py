"""LoRC's factors on CUDA at the width where the library takes block Krylov (Gram matrices of 4096 and more,
issue 22): a block's linears batched into one Krylov run give each linear's one-at-a-time factors, and both keep
the accuracy of the exact full-eigh path: the product ``U V`` within the order of what fp16 rounding of the exact
factors moves it (at most twice that: on these errors 0.4-1.2x of it), and the same Frobenius error left."""

from __future__ import annotations

import pytest
import torch

from ptqlab.methods import lorc
from ptqlab.quantizers import QuantSpec, fake_quantize

FULL = QuantSpec(bits=16)  # full-precision factors: the solver's accuracy alone


def _error(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    """E = W - Q(W), int4 g128, of a random layer on the GPU: the flat spectrum, Krylov's slow case."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=gen, device="cuda") * 0.02
    return W - fake_quantize(W, QuantSpec(4, True, 128))


def _exact(E: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-eigh path's factors."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lorc, "_KRYLOV_MIN_N", 10**9)
        return lorc.top_singular_factors(E, rank)


def test_batched_krylov_on_cuda_matches_one_at_a_time_and_the_exact_truncation():
    rank = 8
    errors = [_error(4096, 4096, 1), _error(4096, 4096, 2), _error(8192, 4096, 3), _error(4096, 8192, 4)]
    runs = []
    solver = lorc.top_eigenpairs_krylov_batched

    def spy(*args, **kwargs):
        runs.append(solver(*args, **kwargs))
        return runs[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lorc, "top_eigenpairs_krylov_batched", spy)
        together = lorc.lorc_factors_many(errors, [rank] * 4, FULL)
        assert len(runs) == 1 and len(runs[0]) == 4 and all(r.converged for r in runs[0])
        alone = [lorc.lorc_factors(E, rank, FULL) for E in errors]
    for (u, v), (u1, v1), E in zip(together, alone, errors):
        got, one = u.double() @ v.double(), u1.double() @ v1.double()
        ue, ve = _exact(E, rank)
        exact = ue.double() @ ve.double()
        scale = float(exact.norm())
        assert float((got - one).norm()) <= 1e-5 * scale  # batched vs one at a time: rounding only
        fp16 = float((ue.half().double() @ ve.half().double() - exact).norm()) / scale
        assert float((got - exact).norm()) / scale <= 2 * fp16
        E64 = E.double()
        assert float((E64 - got).norm()) == pytest.approx(float((E64 - exact).norm()), rel=1e-7)
