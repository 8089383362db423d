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

import math
from dataclasses import dataclass

import torch

from ..quantizers import QuantizationError, QuantSpec, fake_quantize


# Fast path for the top eigenpairs of a large Gram matrix (issue 22). A full ``eigh`` of the [n, n] Gram matrix
# computes all n eigenpairs (cusolver syevd, ~0.13 s at n = 4096 on an H200) where LoRC keeps ``rank`` of them.
# Block Krylov (block Lanczos with full reorthogonalisation) + Rayleigh-Ritz finds the top ones from products G @ Q
# with a thin Q: cheap on any device. Quantization errors have flat spectra (the top eigenvalues are close), so the
# Krylov space must grow to ~15-40% of n before the kept Ritz vectors converge (measured on RTN int4 g128 errors:
# ~45% at n = 1024, 25-40% at n = 2048, 16-29% at n = 4096); for n below 4096 the full eigh is cheap (<= 30 ms on
# an H200), the saving small and a miss costs the full eigh on top, so smaller matrices keep the exact path (and
# the small-shape tests stay bit-identical). ``_KRYLOV_MAX_FRACTION`` caps the space so that the small eigh of the
# projected matrix stays a few percent (in flops) of the full one.
_KRYLOV_MIN_N = 4096
_KRYLOV_MAX_FRACTION = 1 / 3
# A kept Ritz pair (theta, v) is converged when ||G v - theta v|| <= tol * theta_max. Its Ritz value is then within
# ~||r||^2 / gap of an eigenvalue and the vectors within ~||r|| / gap of the eigenvectors (not unique anyway where
# eigenvalues are near-equal). LoRC stores its factors in fp16 or fewer bits, so 1e-4 asks for no more than what is
# kept: on the OPT-6.7B shapes' flat int4 errors (H200, bench/lorc_krylov_tol.py) the product U V is then within
# 1.1-1.8e-4 of the exact one, where rounding the exact factors to fp16 alone moves it by 2.9e-4, and the Frobenius
# error left differs by <= 2e-11 relative; the space is 672-832 columns instead of 1152-1344 for 1e-8, so that more
# layers converge before the cap instead of paying the full eigh after a failed Krylov run.
# (tests/test_methods.py holds the algorithm to 1e-9 at a 1e-8 tolerance, and the default to this contract.)
_KRYLOV_TOL = 1e-4


@dataclass(frozen=True)
class KrylovResult:
    """Top eigenpairs of a symmetric PSD matrix by block Krylov, or why there are none (``converged`` False)."""

    eigvals: torch.Tensor  # [rank], descending
    eigvecs: torch.Tensor  # [n, rank], orthonormal columns
    converged: bool
    dim: int  # size of the Krylov space at the last Rayleigh-Ritz step
    residual: float  # max ||G v - theta v|| / theta_max over the kept pairs


def _project_out(W: torch.Tensor, Q: torch.Tensor | None) -> torch.Tensor:
    """W minus its component in span(Q), by classical Gram-Schmidt twice (the second pass restores the
    orthogonality lost to cancellation: "twice is enough")."""
    if Q is not None:
        for _ in range(2):
            W = W - Q @ (Q.t() @ W)
    return W


def _cholesky_qr(W: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """W R^-1 with R^T R = W^T W (Cholesky QR: two small products instead of a Householder QR, which is slow for
    tall thin matrices on both CPU and GPU), or None when W is too ill-conditioned for it to be accurate."""
    R, info = torch.linalg.cholesky_ex(W.t() @ W, upper=True)
    if int(info) != 0 or float(R.diagonal().min()) <= 1e-6 * float(scale):
        return None
    return torch.linalg.solve_triangular(R, W, upper=True, left=False)


def _orthonormal_block(W: torch.Tensor, Q: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """An orthonormal basis of W's columns that is orthogonal to Q (same number of columns as W)."""
    scale = W.norm(dim=0).max()
    P = _cholesky_qr(_project_out(W, Q), scale)
    if P is not None:
        # a second projection and Cholesky QR ("CholeskyQR2") restore what the first lost to rounding
        P = _cholesky_qr(_project_out(P, Q), torch.ones((), dtype=W.dtype))
    if P is not None:
        return P
    # Some column (nearly) vanished: it lies in the space already (e.g. G is rank-deficient, or zero) and what is
    # left of it is rounding noise. Continue with a random direction there instead, so the basis stays orthonormal.
    P, R = torch.linalg.qr(_project_out(W, Q))
    dead = R.diagonal().abs() <= 1e-6 * scale
    fresh = torch.randn(W.shape, generator=gen, dtype=W.dtype, device=W.device)
    P, _ = torch.linalg.qr(_project_out(torch.where(dead, fresh, W), Q))
    P, _ = torch.linalg.qr(_project_out(P, Q))
    return P


def top_eigenpairs_krylov(
    gram: torch.Tensor, rank: int, tol: float = _KRYLOV_TOL, max_dim: int | None = None, block: int | None = None
) -> KrylovResult:
    """The ``rank`` largest eigenpairs of the symmetric PSD ``gram`` by block Krylov with Rayleigh-Ritz.

    The block (default ``2 rank + 16`` columns) is larger than ``rank`` so that repeated or clustered eigenvalues converge
    together. Rayleigh-Ritz (one small eigh of the projected matrix) runs only at a few sizes of the space: after the
    first two, the next is predicted from the measured geometric decay of the residual, and the attempt stops as
    soon as convergence would need more than ``max_dim`` columns. The start block is seeded, so a result is
    reproducible on one device.
    """
    n = gram.shape[0]
    block = 2 * rank + 16 if block is None else max(int(block), rank)
    max_dim = int(n * _KRYLOV_MAX_FRACTION) if max_dim is None else max_dim
    max_dim = max(block, min(max_dim, n) // block * block)
    gen = torch.Generator(device=gram.device).manual_seed(0)
    # The basis Q and G Q, stored transposed so that each step fills a contiguous block of rows.
    Qt = torch.empty(max_dim, n, dtype=gram.dtype, device=gram.device)
    GQt = torch.empty_like(Qt)
    start = torch.randn(n, block, generator=gen, dtype=gram.dtype, device=gram.device)
    Qt[:block] = _orthonormal_block(start, None, gen).t()
    check_at = max(3 * block, n // 8)
    history: list[tuple[int, float]] = []
    dim = block
    while True:
        torch.matmul(Qt[dim - block : dim], gram, out=GQt[dim - block : dim])  # (G Q_j)^T, G symmetric
        last = dim + block > max_dim
        if dim >= check_at or last:
            Qd, GQd = Qt[:dim].t(), GQt[:dim].t()
            T = Qt[:dim] @ GQd
            theta, Y = torch.linalg.eigh((T + T.t()) / 2)  # ascending
            theta, Y = theta[-rank:].flip(0), Y[:, -rank:].flip(1)
            V = Qd @ Y
            scale = float(theta[0])
            res = float((GQd @ Y - V * theta).norm(dim=0).max())
            rel = res / scale if scale > 0 else (0.0 if res == 0 else math.inf)
            # The residual bounds the error only for orthonormal V: check it rather than assume it.
            orthonormal = float((V.t() @ V - torch.eye(rank, dtype=V.dtype, device=V.device)).abs().max()) <= 1e-12
            if (rel <= tol and orthonormal) or last:
                return KrylovResult(theta, V, rel <= tol and orthonormal, dim, rel)
            history.append((dim, rel))
            check_at = dim + max(block, dim // 4)
            if len(history) >= 2 and 0 < history[-1][1] < history[-2][1]:
                (d0, r0), (d1, r1) = history[-2:]
                per_col = math.log(r1 / r0) / (d1 - d0)  # log residual per Krylov column, negative
                need = d1 + math.log(tol / r1) / per_col
                # Convergence speeds up as the space grows (superlinear), so this straight-line extrapolation
                # overestimates, most early on; give up only past half the cap and when it is far beyond the cap.
                if dim >= max_dim // 2 and need > 1.5 * max_dim:
                    return KrylovResult(theta, V, False, dim, rel)
                check_at = max(dim + block, int(need))
        Qt[dim : dim + block] = _orthonormal_block(GQt[dim - block : dim].t(), Qt[:dim].t(), gen).t()
        dim += block


def _top_eigenpairs(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rank`` largest eigenvalues (descending) and eigenvectors of the PSD ``gram``: block Krylov where it pays
    (``n >= _KRYLOV_MIN_N`` and the block small next to n), the full ``eigh`` otherwise and whenever Krylov has not
    converged, so the answer is never worse than the full eigh's."""
    n = gram.shape[0]
    if n >= _KRYLOV_MIN_N and 4 * rank + 16 <= n // 4:
        fast = top_eigenpairs_krylov(gram, rank, tol=_KRYLOV_TOL)
        if fast.converged:
            return fast.eigvals, fast.eigvecs
    eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
    return eigvals[-rank:].flip(0), eigvecs[:, -rank:].flip(1)


def top_singular_factors(E: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_m S_m^(1/2), S_m^(1/2) V_m^T)``: the best rank-``m`` factors of ``E``, split evenly.

    Only ``m`` singular triplets are needed, so instead of a full SVD this
    takes the eigenvectors of the smaller Gram matrix (``E^T E`` or ``E E^T``)
    in float64 and gets the other side by one product with ``E``: the same
    subspace, about 9x faster on the GPU for 4096-wide layers
    (bench/bench_lorc_svd.py). Squaring ``E`` only costs accuracy in singular
    values below ~1e-8 of the largest, which carry no energy worth keeping.
    For large Gram matrices the top eigenpairs come from block Krylov
    (``_top_eigenpairs``) instead of a full eigendecomposition.
    """
    tall = E.shape[0] >= E.shape[1]
    E64 = E.double()
    gram = E64.t() @ E64 if tall else E64 @ E64.t()
    eigvals, vecs = _top_eigenpairs(gram, rank)
    sigma = eigvals.clamp(min=0).sqrt()
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
