"""Low-Rank Compensation (LoRC, ZeroQuant-V2 section 5).

The quantization error ``E = W - Q(W)`` is approximated by a truncated SVD
``E ~ U_m S_m V_m^T`` and stored as two factors ``U^ = U_m S_m^(1/2)`` and
``V^ = S_m^(1/2) V_m^T``, themselves quantized; the layer then computes
``X (Q(W) + U^ V^)^T``.  With full-precision factors the Frobenius error left
is the Eckart-Young bound ``sqrt(sum of the discarded sigma^2)``.

Beyond the paper, ``hessian`` makes it activation-aware: with
``H + damp I = L L^T`` (``H`` the input Hessian), ``||(E - UV) X^T||_F^2 =
||(E - UV) L||_F^2``, so the SVD of ``E L`` truncated and multiplied back by
``L^-1`` minimises the layer's *output* error instead of its weight error.
"""

from __future__ import annotations

import torch

from ..quantizers import QuantizationError, QuantSpec, fake_quantize


@torch.no_grad()
def lorc_factors(
    error: torch.Tensor,
    rank: int,
    factor_spec: QuantSpec = QuantSpec(bits=8),
    hessian: torch.Tensor | None = None,
    percdamp: float = 0.01,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(U^ [out, rank], V^ [rank, in])`` with ``U^ V^ ~ error``, quantized by ``factor_spec``."""
    if rank < 1:
        raise QuantizationError(f"{name}: LoRC rank must be at least 1, got {rank}")
    out_features, in_features = error.shape
    if rank > min(out_features, in_features):
        raise QuantizationError(f"{name}: LoRC rank {rank} exceeds min(out, in) = {min(out_features, in_features)}")
    # float64 where it is cheap (CPU); on the GPU float64 SVD is ~10x slower than float32 and
    # float32 is ample for a factor that is then stored in 8 bits.
    work = torch.float64 if error.device.type == "cpu" else torch.float32
    E = error.to(work)
    L = None
    if hessian is not None:
        Hd = hessian.to(work).clone()
        dead = torch.diag(Hd) == 0  # inputs that were always zero: any compensation there is free
        Hd[dead, dead] = 1
        damp = percdamp * torch.mean(torch.diag(Hd)).clamp(min=1e-12)
        L, info = torch.linalg.cholesky_ex(Hd + damp * torch.eye(in_features, dtype=work, device=Hd.device))
        if int(info) != 0:
            raise QuantizationError(
                f"{name}: input Hessian is not positive definite for activation-aware LoRC; raise percdamp (now {percdamp})"
            )
        E = E @ L
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    root = S[:rank].sqrt()
    u = U[:, :rank] * root
    v = root[:, None] * Vh[:rank]
    if L is not None:
        # v L^-1, i.e. solve X L = v for X
        v = torch.linalg.solve_triangular(L, v, upper=False, left=False)
    u = fake_quantize(u.float(), factor_spec, f"{name} LoRC U")
    v = fake_quantize(v.float(), factor_spec, f"{name} LoRC V")
    return u, v
