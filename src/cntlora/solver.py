"""The constraint engine: activation moments + W0 -> the closed-form update ΔW.

Pure tensor math (no hooks, no I/O, no PEFT). Each constraint k asks, on inputs x ~ D_k,

    ΔW x ≈ W0 (R_k x + q_k)        with weight w_k,

and the ridge least-squares solution over all of them is

    ΔW = W0 · (Σ_k w_k (R_k C_k + q_k mu_kᵀ)) · (Σ_k w_k C_k + λ I)⁻¹,

with λ = ridge · trace(Σ_k w_k C_k) / n. The Self, Cross and Shift modes are lists of
constraints built with the same public `Constraint` type a user can pass. Derivations:
docs/method.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from .config import CNTLoRAConfig, CNTLoRAError

Tensor = torch.Tensor
# R is a scalar (times I), a vector (a diagonal) or a full n×n matrix; q is a vector or None.
Target = Tuple[Union[float, Tensor], Optional[Tensor]]


@dataclass(frozen=True)
class Moments:
    """First and second moments of a layer's inputs: mean mu and C = E[x xᵀ]."""

    count: float
    mean: Tensor
    second: Tensor

    @property
    def covariance(self) -> Tensor:
        return self.second - torch.outer(self.mean, self.mean)

    @property
    def dim(self) -> int:
        return self.mean.numel()


@dataclass(frozen=True)
class SolveContext:
    """What a constraint's target may depend on: both distributions and the absolute ridge."""

    fine: Moments
    pretrain: Optional[Moments]
    lam: float


@dataclass(frozen=True)
class Constraint:
    """ΔW x ≈ W0 (R x + q) on x ~ `on` ("fine" or "pretrain"), weighted by `weight`.

    `target(ctx) -> (R, q)` builds R and q from the statistics; `target=None` asks for
    ΔW x ≈ 0. Set `uses_pretrain=True` when the target reads `ctx.pretrain`. Use the
    factories `reproduce_frozen`, `vanish` and `align_moments`, or write your own target.
    """

    on: str
    weight: float = 1.0
    target: Optional[Callable[[SolveContext], Target]] = None
    name: str = "custom"
    uses_pretrain: bool = False  # the target reads ctx.pretrain

    def __post_init__(self) -> None:
        if self.on not in ("fine", "pretrain"):
            raise CNTLoRAError(f"Constraint.on must be 'fine' or 'pretrain', got {self.on!r}")
        if not self.weight > 0:
            raise CNTLoRAError(f"Constraint.weight must be positive, got {self.weight!r}")

    def __repr__(self) -> str:
        return f"Constraint({self.name}, on={self.on}, weight={self.weight})"


def reproduce_frozen(on: str = "fine", weight: float = 1.0) -> Constraint:
    """ΔW x ≈ W0 x: the adapter takes over what W0 does on these inputs."""
    return Constraint(on, weight, lambda ctx: (1.0, None), name="reproduce_frozen")


def vanish(on: str = "pretrain", weight: float = 1.0) -> Constraint:
    """ΔW x ≈ 0: leave these inputs to the frozen weight."""
    return Constraint(on, weight, None, name="vanish")


def alignment_matrix(fine: Moments, pretrain: Moments, lam: float, alignment: str) -> Tensor:
    """A_s mapping fine-tuning covariance onto pre-training covariance (a vector if diagonal)."""
    s_f, s_p = fine.covariance, pretrain.covariance
    if alignment == "diag":
        return torch.sqrt((torch.diagonal(s_p).clamp_min(0) + lam) / (torch.diagonal(s_f).clamp_min(0) + lam))
    if alignment == "full":
        eye = torch.eye(fine.dim, dtype=s_f.dtype, device=s_f.device)
        ep, vp = torch.linalg.eigh(s_p + lam * eye)
        ef, vf = torch.linalg.eigh(s_f + lam * eye)
        root_p = (vp * ep.clamp_min(lam).sqrt()) @ vp.T
        inv_root_f = (vf * ef.clamp_min(lam).rsqrt()) @ vf.T
        return root_p @ inv_root_f
    raise CNTLoRAError(f"unknown shift_alignment {alignment!r}; use 'diag' or 'full'")


def alignment_floor(ctx: SolveContext, floor: str) -> float:
    """The eigenvalue floor of the alignment: the system's λ = ridge·tr(C_f)/n ("trace"), or
    ridge·λ_max(C_f) ("max"), the same ridge taken relative to the largest eigenvalue, so that
    directions far below the top are not stretched by up to sqrt(λ_max/λ)."""
    if floor == "trace":
        return ctx.lam
    if floor == "max":
        second = ctx.fine.second
        mean_eig = float(torch.trace(second)) / second.shape[0]
        return ctx.lam * float(torch.linalg.eigvalsh(second)[-1]) / mean_eig if mean_eig > 0 else ctx.lam
    raise CNTLoRAError(f"unknown shift_floor {floor!r}; use 'trace' or 'max'")


def align_moments(alignment: str = "diag", weight: float = 1.0, floor: str = "trace") -> Constraint:
    """(W0 + ΔW) x ≈ W0 T(x) with T(x) = A_s (x − mu_f) + mu_p, i.e. R = A_s − I, q = mu_p − A_s mu_f.

    floor: the eigenvalue floor of A_s (alignment_floor)."""

    def target(ctx: SolveContext) -> Target:
        a_s = alignment_matrix(ctx.fine, ctx.pretrain, alignment_floor(ctx, floor), alignment)
        if a_s.dim() == 1:
            return a_s - 1.0, ctx.pretrain.mean - a_s * ctx.fine.mean
        eye = torch.eye(a_s.shape[0], dtype=a_s.dtype, device=a_s.device)
        return a_s - eye, ctx.pretrain.mean - a_s @ ctx.fine.mean

    name = f"align_moments[{alignment}]" if floor == "trace" else f"align_moments[{alignment}, floor={floor}]"
    return Constraint("fine", weight, target, name=name, uses_pretrain=True)


def mode_constraints(config: CNTLoRAConfig) -> list:
    """The constraint list of a config: its own, or its mode's preset."""
    if config.constraints is not None:
        return list(config.constraints)
    if config.mode == "self":
        return [reproduce_frozen("fine")]
    if config.mode == "cross":
        cons = [reproduce_frozen("fine")]
        return cons + ([vanish("pretrain", config.gamma)] if config.gamma > 0 else [])
    return [align_moments(config.advanced.shift_alignment, floor=config.advanced.shift_floor)]


def needs_pretrain(constraints: Sequence[Constraint]) -> bool:
    return any(c.on == "pretrain" or c.uses_pretrain for c in constraints)


def pretrain_moments(source: str, fine: Moments, weight: Tensor, reference: Optional[Moments] = None) -> Moments:
    """Pre-training statistics from a reference set, from W0's row space, or isotropic.

    "weights": C_p = κ W0ᵀW0 with κ = trace(C_f)/||W0||², mu_p = 0 (W0's rows are sums of
    past gradient directions δ·x_pᵀ, so they record where pre-training inputs lay).
    """
    dtype, device = fine.second.dtype, fine.second.device
    n = fine.dim
    if source == "reference":
        if reference is None:
            raise CNTLoRAError(
                "pretrain_source='reference' needs reference statistics; pass reference_dataloader= "
                "to collect_statistics, or use pretrain_source='weights'"
            )
        return reference
    zero = torch.zeros(n, dtype=dtype, device=device)
    trace_f = torch.trace(fine.second)
    if source == "weights":
        w = weight.to(dtype=dtype, device=device)
        gram = w.T @ w
        kappa = trace_f / torch.trace(gram).clamp_min(torch.finfo(dtype).tiny)
        return Moments(float(weight.shape[0]), zero, gram.mul_(kappa))
    if source == "isotropic":
        return Moments(float(n), zero, (trace_f / n) * torch.eye(n, dtype=dtype, device=device))
    raise CNTLoRAError(f"unknown pretrain_source {source!r}; use 'reference', 'weights' or 'isotropic'")


def _apply_target(r: Union[float, Tensor], q: Optional[Tensor], moments: Moments) -> Tensor:
    """R C + q muᵀ for R given as a scalar, a diagonal or a matrix. R = 1 without q returns C
    itself (no copy): the caller must not modify the result in place."""
    c = moments.second
    if isinstance(r, Tensor) and r.dim() == 2:
        out = r @ c
    elif isinstance(r, Tensor):
        out = r.unsqueeze(1) * c
    elif float(r) == 1.0:
        out = c
    else:
        out = float(r) * c
    if q is not None:
        out = out + torch.outer(q, moments.mean)
    return out


@dataclass(frozen=True)
class NormalEquations:
    """ΔW = W0 · rhs · gram⁻¹, kept as gram's Cholesky factor and rhs; W0 enters last."""

    chol: Tensor  # lower Cholesky factor of Σ_k w_k C_k + λI
    rhs: Tensor  # Σ_k w_k (R_k C_k + q_k muᵀ)
    # λ when rhs = gram − λI, i.e. every constraint asks ΔW x ≈ W0 x on its own inputs (Self);
    # then ΔW = W0 − λ·W0·gram⁻¹, which skips the m×n×n product W0·rhs (a third of the solve)
    rhs_gap: Optional[float] = None

    def transfer(self) -> Tensor:
        """T = rhs · gram⁻¹ (n × n), so that ΔW = W0 · T; gram is symmetric, hence the transposed system."""
        return torch.cholesky_solve(self.rhs.T, self.chol).T

    def delta(self, weight: Tensor) -> Tensor:
        """ΔW (m × n), formed."""
        w0 = weight.to(dtype=self.rhs.dtype, device=self.rhs.device)
        if w0.shape[0] > w0.shape[1]:  # tall W0: n right-hand sides instead of m (n³ + m·n² instead of 2·m·n²)
            return w0 @ self.transfer()
        if self.rhs_gap is not None:
            return torch.cholesky_solve(w0.T, self.chol).T.mul_(-self.rhs_gap).add_(w0)
        return torch.cholesky_solve((w0 @ self.rhs).T, self.chol).T

    def products(self, weight: Tensor) -> "ImplicitDelta":
        """ΔW as products only: k vectors cost O((m + n)·n·k) instead of forming ΔW's O(m·n²)."""
        return ImplicitDelta(weight.to(dtype=self.rhs.dtype, device=self.rhs.device), self)


@dataclass(frozen=True)
class ImplicitDelta:
    """ΔW x and ΔWᵀ y without ΔW (what decompose.randomized_svd needs)."""

    weight: Tensor
    system: NormalEquations

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def matmul(self, x: Tensor) -> Tensor:
        return self.weight @ (self.system.rhs @ torch.cholesky_solve(x, self.system.chol))

    def rmatmul(self, y: Tensor) -> Tensor:
        return torch.cholesky_solve(self.system.rhs.T @ (self.weight.T @ y), self.system.chol)


def normal_equations(
    fine: Moments, pretrain: Optional[Moments], constraints: Sequence[Constraint], ridge: float
) -> NormalEquations:
    """The factored system of a layer's constraints, in the dtype of the moments (use float64)."""
    n = fine.dim
    dtype, device = fine.second.dtype, fine.second.device
    dist = {"fine": fine, "pretrain": pretrain}
    if needs_pretrain(constraints) and pretrain is None:
        raise CNTLoRAError("a constraint on 'pretrain' inputs needs pre-training statistics")
    if not constraints:
        raise CNTLoRAError("no constraints to solve; pass at least one Constraint (or leave constraints=None)")

    # no n×n temporaries beyond gram and rhs: at n = 8192 each float64 matrix is 512 MB
    gram = None
    for c in constraints:
        second = dist[c.on].second
        gram = second * c.weight if gram is None else gram.add_(second, alpha=c.weight)
    lam = float(ridge * torch.trace(gram) / n)
    ctx = SolveContext(fine, pretrain, lam)

    rhs = None
    reproduce_only = True  # every target is R = 1 without q: then rhs = gram − λI
    for c in constraints:
        reproduce_only = reproduce_only and c.target is not None
        if c.target is not None:
            r, q = c.target(ctx)
            reproduce_only = reproduce_only and q is None and not isinstance(r, Tensor) and float(r) == 1.0
            term = _apply_target(r, q, dist[c.on])  # may be a moment matrix itself: never added to in place
            term = term if c.weight == 1.0 else term * c.weight
            rhs = term if rhs is None else rhs + term
    if rhs is None:
        rhs = torch.zeros(n, n, dtype=dtype, device=device)

    if lam == 0.0 and float(torch.trace(gram)) == 0.0:
        raise CNTLoRAError("every input row is zero, so there is no direction to solve for and no ridge can help; "
                           "check the data (or the layers before), or leave this layer out of target_modules")
    gram.diagonal().add_(lam)
    # in place: one n×n float64 matrix less at the solve's memory peak (512 MB for n = 8192)
    chol, info = torch.linalg.cholesky_ex(gram, out=(gram, torch.empty((), dtype=torch.int32, device=device)))
    if int(info) != 0:
        raise CNTLoRAError(
            "the constraint system is singular (the inputs span fewer than n directions); "
            "raise ridge (e.g. ridge=1e-2) or collect more data"
        )
    return NormalEquations(chol, rhs, lam if reproduce_only else None)


def solve_delta(
    weight: Tensor,
    fine: Moments,
    pretrain: Optional[Moments],
    constraints: Sequence[Constraint],
    ridge: float,
) -> Tensor:
    """ΔW (m × n) for one layer, in the dtype of the moments (use float64)."""
    n = fine.dim
    if weight.shape[1] != n:
        raise CNTLoRAError(f"weight has {weight.shape[1]} inputs but the statistics have {n}")
    return normal_equations(fine, pretrain, constraints, ridge).delta(weight)
