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
from collections.abc import Sequence
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
# Since session 31 the block is ``2 rank`` columns (was ``2 rank + 16``) and the first Rayleigh-Ritz step comes at
# 7/64 of n (was n / 8): the space needs about the same polynomial degree whatever the block (~21-24 steps at 32
# columns, ~28-35 at 16, ~40-48 at 8), so a narrower block converges in fewer columns (448-560 instead of 672-832
# at n = 4096), and each Rayleigh-Ritz eigh, the larger cost on a GPU (5-9 ms each against ~1 ms a step), is of a
# smaller matrix and comes less often (9 instead of 18 for an OPT-6.7B block). The U V products are then 4e-6 to
# 2.6e-4 from the exact ones (fp16 rounding of the exact factors: 2.9e-4); bench/profile_lorc.py --sweep, H200.
_KRYLOV_TOL = 1e-4
# One batched Krylov run holds its matrices' two bases within this budget (six 4096-wide ones of an OPT-6.7B block
# take 0.5 GB; an 8192-wide one of a 70B model 0.36 GB, so five go at once).
_KRYLOV_BATCH_BYTES = 2 * 2**30


@dataclass(frozen=True)
class KrylovResult:
    """Top eigenpairs of a symmetric PSD matrix by block Krylov, or why there are none (``converged`` False)."""

    eigvals: torch.Tensor  # [rank], descending
    eigvecs: torch.Tensor  # [n, rank], orthonormal columns
    converged: bool
    dim: int  # size of the Krylov space at the last Rayleigh-Ritz step
    residual: float  # max ||G v - theta v|| / theta_max over the kept pairs


def _project_out(W: torch.Tensor, Q: torch.Tensor | None) -> torch.Tensor:
    """W minus its component in span(Q) (both batched ``[B, n, *]``), by classical Gram-Schmidt twice (the second
    pass restores the orthogonality lost to cancellation: "twice is enough")."""
    if Q is not None:
        for _ in range(2):
            W = W - Q @ (Q.mT @ W)
    return W


def _cholesky_qr(W: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W R^-1 with R^T R = W^T W for each of the batched ``W [B, n, c]`` (Cholesky QR: two small products instead
    of a Householder QR, which is slow for tall thin matrices on both CPU and GPU), and whether each is accurate:
    False where W is too ill-conditioned for it (its result is then garbage). No host sync: the caller checks all
    the flags at once."""
    R, info = torch.linalg.cholesky_ex(W.mT @ W, upper=True)
    ok = (info == 0) & (R.diagonal(dim1=-2, dim2=-1).amin(dim=-1) > 1e-6 * scale)
    return torch.linalg.solve_triangular(R, W, upper=True, left=False), ok


def _orthonormal_block_by_qr(W: torch.Tensor, Q: torch.Tensor | None, scale: float,
                             gen: torch.Generator) -> torch.Tensor:
    """The slow, safe ``_orthonormal_blocks`` of one matrix (``W [n, c]``, ``Q [n, d]``), for when some column of
    W (nearly) vanished: it lies in the space already (e.g. G is rank-deficient, or zero) and what is left of it is
    rounding noise. A random direction replaces it, so the basis stays orthonormal."""
    Qb = None if Q is None else Q[None]
    P, R = torch.linalg.qr(_project_out(W[None], Qb)[0])
    dead = R.diagonal().abs() <= 1e-6 * scale
    fresh = torch.randn(W.shape, generator=gen, dtype=W.dtype, device=W.device)
    P, _ = torch.linalg.qr(_project_out(torch.where(dead, fresh, W)[None], Qb)[0])
    P, _ = torch.linalg.qr(_project_out(P[None], Qb)[0])
    return P


def _orthonormal_blocks(W: torch.Tensor, Q: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """For each of the batched ``W [B, n, c]``: an orthonormal basis of its columns orthogonal to its ``Q [B, n, d]``
    (same number of columns as W). One host sync for the whole batch."""
    scale = W.norm(dim=1).amax(dim=1)
    P, ok = _cholesky_qr(_project_out(W, Q), scale)
    # a second projection and Cholesky QR ("CholeskyQR2") restore what the first lost to rounding
    P, ok2 = _cholesky_qr(_project_out(P, Q), torch.ones_like(scale))
    for b, good in enumerate((ok & ok2).tolist()):
        if not good:
            P[b] = _orthonormal_block_by_qr(W[b], None if Q is None else Q[b], float(scale[b]), gen)
    return P


# cuSOLVER's eigh of one small matrix is a long chain of small kernels (the tridiagonal reduction: ~250 launches of
# ~0.25 ms for d = 672 on an H200) that leave most of the GPU idle, and a batch runs them one matrix after another.
# With this on, the matrices of a batch go to one CUDA stream and host thread each, so their chains overlap: the
# Krylov run of an OPT-6.7B block 0.098 -> 0.090 s (0.162 -> 0.135 s at the old block width), H200.
_EIGH_STREAMS = True
_STREAMS: dict[torch.device, list[torch.cuda.Stream]] = {}


def _eigh_many(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of the batched symmetric ``T [k, d, d]``; on CUDA the k matrices concurrently."""
    k = T.shape[0]
    if T.device.type != "cuda" or k == 1 or not _EIGH_STREAMS:
        return torch.linalg.eigh(T)
    from concurrent.futures import ThreadPoolExecutor

    streams = _STREAMS.setdefault(T.device, [])
    streams.extend(torch.cuda.Stream(T.device) for _ in range(k - len(streams)))
    main = torch.cuda.current_stream(T.device)

    def one(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        side = streams[i]
        side.wait_stream(main)  # T is written on the main stream
        with torch.cuda.stream(side):
            w, v = torch.linalg.eigh(T[i])
        # made on the side stream, read on the main one: not to be reused before the main stream is done
        w.record_stream(main)
        v.record_stream(main)
        return w, v

    with ThreadPoolExecutor(k) as pool:
        pairs = list(pool.map(one, range(k)))
    for side in streams[:k]:
        main.wait_stream(side)
    return torch.stack([w for w, _ in pairs]), torch.stack([v for _, v in pairs])


def _ritz_pairs(Qt: torch.Tensor, GQt: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz on the batched bases ``Qt [k, d, n]`` (rows orthonormal) and ``GQt = (G Q)^T``: the top ``rank``
    Ritz values ``[k, rank]`` (descending), vectors ``[k, n, rank]``, and per matrix ``[k, 3]``: the largest Ritz
    value, the largest residual ``||G v - theta v||`` and the worst departure of the vectors from orthonormal."""
    T = Qt @ GQt.mT
    theta, Y = _eigh_many((T + T.mT) / 2)  # ascending
    theta, Y = theta[:, -rank:].flip(-1), Y[:, :, -rank:].flip(-1)
    V = Qt.mT @ Y
    res = (GQt.mT @ Y - V * theta[:, None, :]).norm(dim=1).amax(dim=1)
    eye = torch.eye(rank, dtype=V.dtype, device=V.device)
    ortho = (V.mT @ V - eye).abs().amax(dim=(1, 2))
    return theta, V, torch.stack([theta[:, 0], res, ortho], dim=1)


class _Grams:
    """The Gram matrices of a Krylov batch, applied to a block of each one's basis rows: ``(G Q_j)^T = Q_j^T G``.
    Either formed and stacked (``[B, n, n]``, one batched product a step), or each given by its factor ``E``
    (``G = E^T E`` for a tall E, ``E E^T`` for a wide one) and applied as two products with E, in E's precision:
    on a GPU E is float32, which reads half the bytes of the float64 Gram a step (a 16384x4096 E: 268 MB) and
    saves forming it (a float64 GEMM of 9 ms on an H200 for that E)."""

    def __init__(self, grams: torch.Tensor | Sequence[torch.Tensor]) -> None:
        self.stacked = grams if isinstance(grams, torch.Tensor) else None
        self.factors = None if self.stacked is not None else list(grams)
        first = self.stacked if self.stacked is not None else self.factors[0]
        self.n = self.stacked.shape[-1] if self.stacked is not None else min(first.shape)
        self.device = first.device

    def __len__(self) -> int:
        return self.stacked.shape[0] if self.stacked is not None else len(self.factors)

    def apply(self, Qt: torch.Tensor) -> torch.Tensor:
        """``Qt [B, c, n]`` (float64) times each G."""
        if self.stacked is not None:
            return (Qt.to(self.stacked.dtype) @ self.stacked).to(Qt.dtype)  # G symmetric
        out = torch.empty_like(Qt)
        for b, E in enumerate(self.factors):
            q = Qt[b].to(E.dtype)
            out[b] = ((q @ E.t()) @ E) if E.shape[0] >= E.shape[1] else ((q @ E) @ E.t())
        return out

    def keep(self, rows: list[int]) -> "_Grams":
        if self.stacked is not None:
            return _Grams(self.stacked[torch.tensor(rows, device=self.device)])
        return _Grams([self.factors[r] for r in rows])


def top_eigenpairs_krylov_batched(
    grams: torch.Tensor | Sequence[torch.Tensor], rank: int, tol: float = _KRYLOV_TOL, max_dim: int | None = None,
    block: int | None = None, first_check: int | None = None,
) -> list[KrylovResult]:
    """The ``rank`` largest eigenpairs of each symmetric PSD Gram matrix by block Krylov with Rayleigh-Ritz, the
    matrices stepped together. ``grams`` is either the Grams stacked (``[B, n, n]``) or a list of their factors
    ``E`` (``G = E^T E`` for a tall E, ``E E^T`` for a wide one; never formed). The basis is float64 either way.

    The block (default ``2 rank`` columns, at least 8) is larger than ``rank`` so that repeated or clustered
    eigenvalues converge together. Rayleigh-Ritz (one small eigh of the projected matrix) runs only at a few sizes of
    the space: after the first two, the next is predicted from the measured geometric decay of the residual, and the
    attempt stops as soon as convergence would need more than ``max_dim`` columns. Each matrix stops on its own, and
    leaves the batch.
    ``first_check`` (default ``max(3 block, 7 n / 64)``) is the space size of the first Rayleigh-Ritz step.
    Every matrix starts from the same seeded block, so a result does not depend on what it was batched with (up to
    the rounding of batched products) and is reproducible on one device.

    Why batched: at LoRC's sizes a step is a few small products and factorisations, each too small to fill a GPU,
    and one host sync per step; a decoder block's linears share the Gram width, so stepping them together divides
    the launches and syncs by their number.
    """
    G = _Grams(grams)
    count, n = len(G), G.n
    block = max(2 * rank, 8) if block is None else max(int(block), rank)
    max_dim = int(n * _KRYLOV_MAX_FRACTION) if max_dim is None else max_dim
    max_dim = max(block, min(max_dim, n) // block * block)
    dtype, device = torch.float64, G.device
    gen = torch.Generator(device=device).manual_seed(0)
    # The bases Q and G Q, stored transposed so that each step fills a contiguous block of rows of each matrix.
    Qt = torch.empty(count, max_dim, n, dtype=dtype, device=device)
    GQt = torch.empty_like(Qt)
    start = torch.randn(n, block, generator=gen, dtype=dtype, device=device)
    Qt[:, :block] = _orthonormal_blocks(start.expand(count, n, block).clone(), None, gen).mT
    active = list(range(count))  # the input index of each matrix still stepping
    check_at = [max(3 * block, 7 * n // 64) if first_check is None else first_check] * count
    history: list[list[tuple[int, float]]] = [[] for _ in range(count)]
    results: list[KrylovResult | None] = [None] * count
    dim = block
    while True:
        GQt[:, dim - block : dim] = G.apply(Qt[:, dim - block : dim])  # (G Q_j)^T
        last = dim + block > max_dim
        due = [j for j in range(len(active)) if dim >= check_at[j] or last]
        if due:
            rows = torch.tensor(due, device=device)
            theta, V, stats = _ritz_pairs(Qt[rows, :dim], GQt[rows, :dim], rank)
            for k, (j, (scale, res, ortho)) in enumerate(zip(due, stats.tolist())):
                rel = res / scale if scale > 0 else (0.0 if res == 0 else math.inf)
                # The residual bounds the error only for orthonormal V: check it rather than assume it.
                done = rel <= tol and ortho <= 1e-12
                gave_up = False
                if not (done or last):
                    past = history[j]
                    past.append((dim, rel))
                    check_at[j] = dim + max(block, dim // 4)
                    if len(past) >= 2 and 0 < past[-1][1] < past[-2][1]:
                        (d0, r0), (d1, r1) = past[-2:]
                        per_col = math.log(r1 / r0) / (d1 - d0)  # log residual per Krylov column, negative
                        need = d1 + math.log(tol / r1) / per_col
                        # Convergence speeds up as the space grows (superlinear), so this straight-line extrapolation
                        # overestimates, most early on; give up only past half the cap and when it is far beyond it.
                        gave_up = dim >= max_dim // 2 and need > 1.5 * max_dim
                        check_at[j] = max(dim + block, int(need))
                if done or last or gave_up:
                    results[active[j]] = KrylovResult(theta[k], V[k], done, dim, rel)
            keep = [j for j in range(len(active)) if results[active[j]] is None]
            if not keep:
                return results  # type: ignore[return-value]
            if len(keep) < len(active):
                rows = torch.tensor(keep, device=device)
                Qt, GQt, G = Qt[rows], GQt[rows], G.keep(keep)
                active, check_at = [active[j] for j in keep], [check_at[j] for j in keep]
                history = [history[j] for j in keep]
        Qt[:, dim : dim + block] = _orthonormal_blocks(GQt[:, dim - block : dim].mT, Qt[:, :dim].mT, gen).mT
        dim += block


def top_eigenpairs_krylov(
    gram: torch.Tensor, rank: int, tol: float = _KRYLOV_TOL, max_dim: int | None = None, block: int | None = None
) -> KrylovResult:
    """``top_eigenpairs_krylov_batched`` of one matrix."""
    return top_eigenpairs_krylov_batched(gram[None], rank, tol, max_dim, block)[0]


def _uses_krylov(n: int, rank: int) -> bool:
    """Block Krylov where it pays: ``n >= _KRYLOV_MIN_N`` and the block small next to n."""
    return n >= _KRYLOV_MIN_N and 4 * rank + 16 <= n // 4


def _krylov_batch_size(n: int) -> int:
    """How many n-wide Gram matrices one batched Krylov run takes: their two float64 bases within
    ``_KRYLOV_BATCH_BYTES`` (the Grams themselves are not formed)."""
    per_matrix = n * n * 8 * 2 * _KRYLOV_MAX_FRACTION
    return max(1, int(_KRYLOV_BATCH_BYTES // per_matrix))


def _top_eigenpairs_many(errors: Sequence[torch.Tensor],
                         ranks: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``ranks[i]`` largest eigenvalues (descending) and eigenvectors of the smaller Gram matrix of each
    ``errors[i]``: block Krylov where it pays, the errors of one Gram width and rank batched, the full ``eigh`` of
    the float64 Gram otherwise and whenever Krylov has not converged, so each answer is never worse than the full
    eigh's."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(errors)
    by_kind: dict[tuple, list[int]] = {}
    for i, (E, rank) in enumerate(zip(errors, ranks)):
        if _uses_krylov(min(E.shape), rank):
            by_kind.setdefault((min(E.shape), rank, E.device), []).append(i)
    for (n, rank, _), members in by_kind.items():
        size = _krylov_batch_size(n)
        for lo in range(0, len(members), size):
            chunk = members[lo : lo + size]
            for i, fast in zip(chunk, top_eigenpairs_krylov_batched([errors[i] for i in chunk], rank,
                                                                    tol=_KRYLOV_TOL)):
                if fast.converged:
                    out[i] = (fast.eigvals, fast.eigvecs)
    for i, (E, rank) in enumerate(zip(errors, ranks)):
        if out[i] is None:
            eigvals, eigvecs = torch.linalg.eigh(_gram(E))  # ascending
            out[i] = (eigvals[-rank:].flip(0), eigvecs[:, -rank:].flip(1))
    return out  # type: ignore[return-value]


def _gram(E: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of E, in float64: ``E^T E`` for a tall E, ``E E^T`` for a wide one."""
    E64 = E.double()
    return E64.t() @ E64 if E.shape[0] >= E.shape[1] else E64 @ E64.t()


def _factors_from_eigenpairs(E: torch.Tensor, eigvals: torch.Tensor,
                             vecs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_m S_m^(1/2), S_m^(1/2) V_m^T)`` of E from the top eigenpairs of its smaller Gram matrix."""
    tall = E.shape[0] >= E.shape[1]
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


def top_singular_factors_many(errors: Sequence[torch.Tensor],
                              ranks: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``top_singular_factors(errors[i], ranks[i])`` for each i, the Krylov runs of same-width Grams batched."""
    pairs = _top_eigenpairs_many(errors, ranks)
    return [_factors_from_eigenpairs(E, *pair) for E, pair in zip(errors, pairs)]


def top_singular_factors(E: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_m S_m^(1/2), S_m^(1/2) V_m^T)``: the best rank-``m`` factors of ``E``, split evenly.

    Only ``m`` singular triplets are needed, so instead of a full SVD this
    takes the eigenvectors of the smaller Gram matrix (``E^T E`` or ``E E^T``)
    in float64 and gets the other side by one product with ``E``: the same
    subspace, about 9x faster on the GPU for 4096-wide layers
    (bench/bench_lorc_svd.py). Squaring ``E`` only costs accuracy in singular
    values below ~1e-8 of the largest, which carry no energy worth keeping.
    For large Gram matrices the top eigenpairs come from block Krylov
    (``_top_eigenpairs_many``) instead of a full eigendecomposition, which
    applies the Gram as two products with ``E`` in E's own precision (float32
    on a GPU: enough for the 1e-4 residual asked, not for tolerances below
    ~1e-6) and never forms it.
    """
    return top_singular_factors_many([E], [rank])[0]


def _check_rank(error: torch.Tensor, rank: int, name: str) -> None:
    if rank < 1:
        raise QuantizationError(f"{name}: LoRC rank must be at least 1, got {rank}")
    if rank > min(error.shape):
        raise QuantizationError(f"{name}: LoRC rank {rank} exceeds min(out, in) = {min(error.shape)}")


def _hessian_factor(hessian: torch.Tensor, percdamp: float, work: torch.dtype, name: str) -> torch.Tensor:
    """``L`` with ``L L^T = H + damp I``: the whitening of activation-aware LoRC."""
    Hd = hessian.to(work).clone()
    dead = torch.diag(Hd) == 0  # inputs that were always zero: any compensation there is free
    Hd[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(Hd)).clamp(min=1e-12)
    L, info = torch.linalg.cholesky_ex(Hd + damp * torch.eye(Hd.shape[0], dtype=work, device=Hd.device))
    if int(info) != 0:
        raise QuantizationError(
            f"{name}: input Hessian is not positive definite for activation-aware LoRC; raise percdamp (now {percdamp})"
        )
    return L


@torch.no_grad()
def lorc_factors_many(
    errors: Sequence[torch.Tensor],
    ranks: Sequence[int],
    factor_spec: QuantSpec = QuantSpec(bits=8),
    hessians: Sequence[torch.Tensor | None] | None = None,
    percdamp: float = 0.01,
    names: Sequence[str] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``lorc_factors`` of several layers (a decoder block's linears) at once: the same factors, with the Krylov
    runs of their same-width Gram matrices batched into one."""
    names = list(names) if names is not None else [f"layer {i}" for i in range(len(errors))]
    hessians = list(hessians) if hessians is not None else [None] * len(errors)
    if not len(errors) == len(ranks) == len(hessians) == len(names):
        raise ValueError(f"lorc_factors_many: {len(errors)} errors, {len(ranks)} ranks, {len(hessians)} hessians "
                         f"and {len(names)} names")
    for error, rank, name in zip(errors, ranks, names):
        _check_rank(error, rank, name)
    whitened, factors = [], []
    for error, hessian, name in zip(errors, hessians, names):
        # float64 where it is cheap (CPU); on the GPU float32 for the [out, in] products (Krylov's too), while
        # the Krylov basis, its Rayleigh-Ritz and the full eigh's Gram matrix are always float64.
        work = torch.float64 if error.device.type == "cpu" else torch.float32
        E = error.to(work)
        L = None if hessian is None else _hessian_factor(hessian, percdamp, work, name)
        whitened.append(E if L is None else E @ L)
        factors.append(L)
    out = []
    for (u, v), L, name in zip(top_singular_factors_many(whitened, ranks), factors, names):
        if L is not None:
            # v L^-1, i.e. solve X L = v for X
            v = torch.linalg.solve_triangular(L, v, upper=False, left=False)
        out.append((fake_quantize(u.float(), factor_spec, f"{name} LoRC U"),
                    fake_quantize(v.float(), factor_spec, f"{name} LoRC V")))
    return out


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
    return lorc_factors_many([error], [rank], factor_spec, [hessian], percdamp, [name])[0]
