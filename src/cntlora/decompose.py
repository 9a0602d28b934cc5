"""ΔW -> LoRA factors B, A; and VAS, the per-layer rank allocation under a budget.

Pure tensor math. With s the LoRA scale, B = U_r Σ_r^½ / √s and A = Σ_r^½ V_rᵀ / √s, so
s·B·A is the rank-r part of ΔW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Protocol, Tuple

import torch

from .config import CNTLoRAError

Tensor = torch.Tensor

# kaiming_uniform_(a=√5) draws A's entries from U(−1/√n, 1/√n): each row has norm ≈ 1/√3.
DEFAULT_A_ROW_NORM = 1.0 / math.sqrt(3.0)


@dataclass(frozen=True)
class Spectrum:
    """The top singular triplets of ΔW and its total energy ||ΔW||_F² (None when ΔW was never
    formed: the randomized path on an implicit ΔW sees only products with k vectors).

    Under the objective truncation (objective_truncation), the rank-k part is Σ_{i<k} u_i·s_i·v_iᵀ
    with u orthonormal and v of unit columns that need not be orthogonal; `gains` then holds what
    each component removes from the constraints' objective, and `energy` that objective's total.
    """

    u: Tensor  # m × k
    s: Tensor  # k
    v: Tensor  # n × k
    energy: Optional[float]
    gains: Optional[Tensor] = None  # k, only under the objective truncation

    @property
    def component_energy(self) -> Tensor:
        """What each component contributes to `energy`: σ², or the objective's gains."""
        return self.s.pow(2) if self.gains is None else self.gains

    @property
    def sigma(self) -> Tensor:
        """The descending singular values the truncation ranks by: of ΔW, or of ΔW·chol."""
        return self.s if self.gains is None else self.gains.clamp_min(0).sqrt()

    def numerical_rank(self) -> int:
        sigma = self.sigma
        if sigma.numel() == 0 or float(sigma[0]) == 0.0:
            return 0
        m, n = self.u.shape[0], self.v.shape[0]
        tol = float(sigma[0]) * max(m, n) * torch.finfo(torch.float32).eps
        return int((sigma > tol).sum())


def _eigh(gram: Tensor):
    """Symmetric eigendecomposition. On the CPU, matrices this small run single-threaded: MKL's
    threaded eigh gains nothing at this size and, on a busy machine, was seen 100× slower."""
    if gram.is_cuda or gram.shape[0] > 2048:
        return torch.linalg.eigh(gram)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(gram)
    finally:
        torch.set_num_threads(threads)


class MatrixProducts(Protocol):
    """What the randomized SVD needs of ΔW: its shape, dtype, device and products with blocks of vectors."""

    shape: Tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matmul(self, x: Tensor) -> Tensor: ...  # ΔW x, x is n × k

    def rmatmul(self, y: Tensor) -> Tensor: ...  # ΔWᵀ y, y is m × k


@dataclass(frozen=True)
class DenseProducts:
    matrix: Tensor

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.matrix.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def matmul(self, x: Tensor) -> Tensor:
        return self.matrix @ x

    def rmatmul(self, y: Tensor) -> Tensor:
        return self.matrix.T @ y


def randomized_range(op: MatrixProducts, k: int, seed: int = 0, niter: int = 4, oversample: int = 10
                     ) -> Tuple[Tensor, Tensor]:
    """(basis m×q, projected n×q = ΔWᵀ·basis) with ΔW ≈ basis·projectedᵀ, by subspace iteration.

    The start block is drawn on the CPU from `seed`, so every device gives the same adapter.
    The basis is re-orthonormalized once per power step (ΔW ΔWᵀ): in float64 that loses
    nothing while σ_1/σ_q stays below ~1e6, and halves the QR factorizations, which dominate
    on GPUs. Nothing here waits for the device.
    """
    m, n = op.shape
    q = min(k + oversample, m, n)
    omega = torch.randn(n, q, generator=torch.Generator().manual_seed(seed), dtype=op.dtype).to(op.device)
    basis, _ = torch.linalg.qr(op.matmul(omega))
    for _ in range(niter):
        basis, _ = torch.linalg.qr(op.matmul(op.rmatmul(basis)))
    return basis, op.rmatmul(basis)


def ritz_triplets(basis: Tensor, projected: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(u, s, v): the k leading singular triplets of basis·projectedᵀ; batched over leading axes.

    From the eigendecomposition of the small q×q Gram matrix projectedᵀ·projected: one batched
    call for a stack of layers of one shape, where a tall SVD per layer costs a device sync
    each. In float64 the σ that matter (above σ_1·1e-7) keep full accuracy.
    """
    evals, evecs = torch.linalg.eigh(projected.mT @ projected)
    evals, evecs = evals.flip(-1)[..., :k].clamp_min(0), evecs.flip(-1)[..., :k]
    s = evals.sqrt()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return basis @ evecs, s, (projected @ evecs) * inv.unsqueeze(-2)


def randomized_svd(op: MatrixProducts, k: int, seed: int = 0, niter: int = 4, oversample: int = 10
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """(u m×k, s k, v n×k): the k leading singular triplets by subspace iteration."""
    return ritz_triplets(*randomized_range(op, k, seed, niter, oversample), k)


def top_singular(delta: Tensor, k: int, seed: int = 0, randomized_above: int = 2048, niter: int = 4) -> Spectrum:
    """The k leading singular triplets; randomized (with a fixed seed) for large layers."""
    m, n = delta.shape
    k = min(k, m, n)
    energy = float(delta.pow(2).sum())
    if min(m, n) > randomized_above:
        u, s, v = randomized_svd(DenseProducts(delta), k, seed, niter)
        return Spectrum(u, s, v, energy)
    # Eigendecomposition of the smaller Gram matrix: min(m,n)³ instead of a full SVD. In
    # float64 the leading σ stay accurate far below the rank cut-off used afterwards.
    wide = m <= n
    gram = delta @ delta.T if wide else delta.T @ delta
    evals, evecs = _eigh(gram)
    evals, evecs = evals.flip(0)[:k].clamp_min(0), evecs.flip(1)[:, :k]
    s = evals.sqrt()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    if wide:
        return Spectrum(evecs, s, (delta.T @ evecs) * inv, energy)
    return Spectrum((delta @ evecs) * inv, s, evecs, energy)


def top_singular_implicit(op: MatrixProducts, k: int, seed: int = 0, niter: int = 4) -> Spectrum:
    """The k leading singular triplets of a ΔW known only through its products (energy None)."""
    m, n = op.shape
    u, s, v = randomized_svd(op, min(k, m, n), seed, niter)
    return Spectrum(u, s, v, None)


def objective_truncation(delta: Tensor, chol: Tensor, k: int, seed: int = 0, randomized_above: int = 2048,
                         niter: int = 4) -> Spectrum:
    """The rank-1..k adapters that minimize the constraints' own objective, not ||ΔW − ΔW_k||_F.

    The objective is a quadratic in ΔW with Hessian gram = chol·cholᵀ, minimized by `delta`:
    J(X) = J(ΔW) + ||(X − ΔW)·chol||_F². Its rank-k minimizer (reduced-rank regression) is
    U_k·U_kᵀ·ΔW, with U_k the top left singular vectors of ΔW·chol, and the ranks nest. The
    components u_i·(ΔWᵀu_i)ᵀ come back as (u_i, ||ΔWᵀu_i||, ΔWᵀu_i / ||ΔWᵀu_i||), with gains σ_i² of
    ΔW·chol and energy ||ΔW·chol||_F².
    """
    weighted = top_singular(delta @ chol, k, seed, randomized_above, niter)
    rows = delta.T @ weighted.u  # n × k: the rows of U_kᵀ·ΔW
    norms = torch.linalg.vector_norm(rows, dim=0)
    inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    return Spectrum(weighted.u, norms, rows * inv, weighted.energy, weighted.s.pow(2))


def ritz_by_shape(ranges: Dict[str, tuple]) -> Dict[str, Spectrum]:
    """The Ritz step of every randomized layer, one batched ritz_triplets call per shape.

    Args:
        ranges: {layer: (basis, projected, k)}, randomized_range's output and the rank wanted.

    Returns:
        {layer: its top-k Spectrum}, without ||ΔW||² (the caller adds it where it formed ΔW).
    """
    by_shape: Dict[tuple, list] = {}
    for name, (basis, projected, _) in ranges.items():
        by_shape.setdefault((tuple(basis.shape), tuple(projected.shape)), []).append(name)
    out = {}
    for names in by_shape.values():
        u, s, v = ritz_triplets(torch.stack([ranges[n][0] for n in names]), torch.stack([ranges[n][1] for n in names]),
                                max(ranges[n][2] for n in names))
        for i, name in enumerate(names):
            k = ranges[name][2]
            out[name] = Spectrum(u[i, :, :k], s[i, :k], v[i, :, :k], None)
    return out


def ordered_basis(v: Tensor) -> Tensor:
    """Orthonormal columns spanning v's first 1, 2, ... columns (Gram–Schmidt order, signs kept)."""
    q, r = torch.linalg.qr(v)
    signs = torch.sign(torch.diagonal(r))
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)


def _whitened(sym: Tensor, chol: Tensor) -> Tensor:
    """chol⁻¹·sym·chol⁻ᵀ for a symmetric `sym` and a lower Cholesky factor, by triangular solves,
    symmetrized against rounding: its eigenvalues are the generalized ones of (sym, chol·cholᵀ)."""
    half = torch.linalg.solve_triangular(chol, sym, upper=False)  # chol⁻¹·sym
    out = torch.linalg.solve_triangular(chol, half.T, upper=False)  # chol⁻¹·sym·chol⁻ᵀ (sym = symᵀ)
    return (out + out.T) / 2


def generalized_directions(rhs: Tensor, chol: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """(ρ, Q): the k input directions that T = rhs·gram⁻¹ amplifies most, independent of W0.

    They are the top generalized eigenvectors of rhs·w = ρ·gram·w (rhs symmetric, gram =
    chol·cholᵀ its ridge-regularized Gram matrix; for Cross, C_f·w = ρ·(C_f + γC_p + λI)·w:
    where fine-tuning energy most exceeds pre-training energy, ρ in [0, 1)), returned as
    orthonormal columns Q (n × k) spanning the first 1..k of them, ρ descending. Solved as the
    symmetric eigenproblem of chol⁻¹·rhs·chol⁻ᵀ, with triangular solves only.
    """
    if not torch.allclose(rhs, rhs.T, rtol=1e-10, atol=1e-12 * float(rhs.abs().max())):
        raise CNTLoRAError("directions='generalized' needs a symmetric right-hand side (Self or Cross "
                           "constraints); Shift's alignment is not symmetric: use directions='delta'")
    rho, vectors = _eigh(_whitened(rhs, chol))
    rho, vectors = rho.flip(0)[:k], vectors.flip(1)[:, :k]
    directions = torch.linalg.solve_triangular(chol.T, vectors, upper=True)  # w = chol⁻ᵀ·u
    q, _ = torch.linalg.qr(directions)
    # one sign per column (the largest entry positive), so equal inputs give equal adapters
    signs = torch.sign(q.gather(0, q.abs().argmax(0, keepdim=True)))
    return rho, q * torch.where(signs == 0, torch.ones_like(signs), signs)


def orthogonal_rows(kept: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """`count` random orthonormal rows (count × n), orthogonal to the columns of `kept` (n × k)."""
    n = kept.shape[0]
    if kept.shape[1] + count > n:
        raise CNTLoRAError(f"cannot find {count} more directions in {n} dimensions; lower r")
    g = torch.randn(n, count, generator=generator, dtype=torch.float64).to(kept)
    if kept.shape[1]:
        g = g - kept @ (kept.T @ g)
        g = g - kept @ (kept.T @ g)  # twice: one projection leaves O(eps·κ) leakage
    q, _ = torch.linalg.qr(g)
    return q.T


def cap_factor(rank_energy: float, w0_norm: float, strength: Optional[float]) -> float:
    """The trust region: min(1, τ·||W0||_F / ||ΔW_r||_F)."""
    if strength is None or rank_energy <= 0:
        return 1.0
    return min(1.0, strength * w0_norm / math.sqrt(rank_energy))


def lora_factors(
    spectrum: Spectrum,
    rank: int,
    scale: float,
    base: str,
    w0_norm: float,
    strength: Optional[float],
    seed: int = 0,
    a_row_norm: float = DEFAULT_A_ROW_NORM,
) -> tuple:
    """(B m×rank, A rank×n, cap) for one layer.

    subspace: A = the top right singular vectors at LoRA's default row norm, B = 0 (under the
    objective truncation, an orthonormal basis of its rank-r part's rows, in order).
    keep / residual: s·B·A = cap·(rank-r part of ΔW). Beyond ΔW's numerical rank, A gets
    random rows orthogonal to the kept ones and B zero columns.
    """
    m, n = spectrum.u.shape[0], spectrum.v.shape[0]
    if rank > min(m, n):
        raise CNTLoRAError(f"rank {rank} exceeds min(m, n) = {min(m, n)} of a {m}×{n} layer; lower r")
    kept = min(rank, spectrum.numerical_rank())
    u, s, v = spectrum.u[:, :kept], spectrum.s[:kept], spectrum.v[:, :kept]
    basis = v if spectrum.gains is None else ordered_basis(v)
    gen = torch.Generator().manual_seed(seed)
    pad = orthogonal_rows(basis, rank - kept, gen) * a_row_norm
    if base == "subspace":
        a = torch.cat([basis.T * a_row_norm, pad])
        return torch.zeros(m, rank, dtype=a.dtype, device=a.device), a, 1.0
    cap = cap_factor(float(s.pow(2).sum()), w0_norm, strength)
    root = (s * cap / scale).sqrt()
    b = torch.cat([u * root, torch.zeros(m, rank - kept, dtype=u.dtype, device=u.device)], dim=1)
    a = torch.cat([root.unsqueeze(1) * v.T, pad])
    return b, a, cap


def input_shift(fine: Tensor, pretrain: Tensor, k: int, ridge: float = 1e-4) -> float:
    """How far a layer's inputs moved from pre-training: the mean of the k largest generalized
    eigenvalues of (C_f, C_p + δI), with C_f and C_p scaled to unit trace and δ = ridge / n (a
    share `ridge` of C_p's mean eigenvalue). Solved through C_p's Cholesky factor, no inverse.

    Args:
        fine: C_f, the fine-tuning inputs' n × n second moment.
        pretrain: C_p, the pre-training inputs' n × n second moment (true, or a proxy).
        k: how many of the largest eigenvalues to average (at most n).
        ridge: δ as a share of C_p's mean eigenvalue.

    Returns:
        The mean: about 1 where the two distributions agree, larger the more energy fine-tuning
        puts into directions pre-training seldom used.

    Raises:
        CNTLoRAError: shapes that differ, a k out of range, or a zero or non-finite moment.
    """
    n = fine.shape[0]
    if fine.shape != (n, n) or pretrain.shape != (n, n) or not 1 <= k <= n:
        raise CNTLoRAError(f"input_shift needs two n×n moments and 1 <= k <= n; got {tuple(fine.shape)}, "
                           f"{tuple(pretrain.shape)} and k={k}")
    f, p = fine.double(), pretrain.double()
    traces = (float(torch.trace(f)), float(torch.trace(p)))
    if not all(math.isfinite(t) and t > 0 for t in traces):
        raise CNTLoRAError(f"input_shift needs moments with a finite, positive trace, got traces {traces}: "
                           "were the layer's inputs all zero or non-finite?")
    f, p = f / traces[0], p / traces[1]
    chol = torch.linalg.cholesky(p + (ridge / n) * torch.eye(n, dtype=p.dtype, device=p.device))
    return float(_eigh(_whitened(f, chol))[0][-k:].mean())


def component_scores(spectrum: Spectrum, w0_norm: float, score: str, shift: Optional[float] = None) -> Tensor:
    """Score of each singular component: its share of ΔW's energy (of the constraints' objective under
    the objective truncation), that share times the layer's input_shift ("shift"), or σ² / ||W0||²."""
    if score in ("energy", "shift") and spectrum.energy is None:
        raise CNTLoRAError(f"the {score!r} VAS score needs ||ΔW||², which the implicit randomized path does not form")
    if score == "shift" and shift is None:
        raise CNTLoRAError("the 'shift' VAS score needs each layer's input shift (pre-training statistics)")
    if score in ("energy", "shift"):
        share = spectrum.component_energy / spectrum.energy if spectrum.energy > 0 else torch.zeros_like(spectrum.s)
        return share * shift if score == "shift" else share
    return spectrum.s.pow(2) / w0_norm**2 if w0_norm > 0 else torch.zeros_like(spectrum.s)


def allocate_ranks(
    scores: Mapping[str, Tensor],
    costs: Mapping[str, int],
    budget: int,
    r_min: int,
    r_max: int,
) -> Dict[str, int]:
    """Greedy VAS: take components in descending score while the budget lasts.

    Each layer's components come in order (σ sorted), a component costs m_l + n_l
    parameters, and every rank stays within [r_min, r_max] (and the layer's own size).
    """
    ranks = {}
    spent = 0
    for name, sc in scores.items():
        ranks[name] = min(r_min, sc.numel())
        spent += ranks[name] * costs[name]
    if spent > budget:
        raise CNTLoRAError(f"r_min={r_min} alone costs {spent} parameters, over the budget {budget}; lower r_min")
    order = sorted(
        ((float(sc[i]), name, i) for name, sc in scores.items() for i in range(ranks[name], min(r_max, sc.numel()))),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    for score, name, i in order:
        if i != ranks[name] or spent + costs[name] > budget:
            continue
        ranks[name] += 1
        spent += costs[name]
    return ranks
