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


def top_singular_factors(E: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_m S_m^(1/2), S_m^(1/2) V_m^T)``: the best rank-``m`` factors of ``E``, split evenly.

    Only ``m`` singular triplets are needed, so instead of a full SVD this
    takes the eigenvectors of the smaller Gram matrix (``E^T E`` or ``E E^T``)
    in float64 and gets the other side by one product with ``E``: the same
    subspace, about 9x faster on the GPU for 4096-wide layers
    (bench/bench_lorc_svd.py). Squaring ``E`` only costs accuracy in singular
    values below ~1e-8 of the largest, which carry no energy worth keeping.
    """
    tall = E.shape[0] >= E.shape[1]
    E64 = E.double()
    gram = E64.t() @ E64 if tall else E64 @ E64.t()
    eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
    sigma = eigvals[-rank:].flip(0).clamp(min=0).sqrt()
    vecs = eigvecs[:, -rank:].flip(1)
    # Singular vectors are defined up to sign; fix it (largest entry positive) so that the factors,
    # not only their product, are reproducible across devices and solvers.
    pivot = vecs.gather(0, vecs.abs().argmax(dim=0, keepdim=True))
    vecs = (vecs * torch.where(pivot < 0, -1.0, 1.0)).to(E.dtype)
    root = sigma.sqrt().to(E.dtype)
    inv_root = torch.where(root > 0, 1 / root, torch.zeros_like(root))  # a zero singular value: a zero factor
    if tall:  # vecs are V_m: U_m S_m^(1/2) = E V_m S_m^(-1/2)
        return (E @ vecs) * inv_root, root[:, None] * vecs.t()
    # vecs are U_m: S_m^(1/2) V_m^T = S_m^(-1/2) U_m^T E
    return vecs * root, inv_root[:, None] * (vecs.t() @ E)


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
    # float64 where it is cheap (CPU); on the GPU float32 for the [out, in] products, while the
    # Gram matrix and its eigendecomposition below are always float64.
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
    u, v = top_singular_factors(E, rank)
    if L is not None:
        # v L^-1, i.e. solve X L = v for X
        v = torch.linalg.solve_triangular(L, v, upper=False, left=False)
    u = fake_quantize(u.float(), factor_spec, f"{name} LoRC U")
    v = fake_quantize(v.float(), factor_spec, f"{name} LoRC V")
    return u, v
