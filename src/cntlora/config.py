"""CNTLoRAConfig: every choice CNTLoRA makes, validated once, in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

MODES = ("self", "cross", "shift")
BASES = ("subspace", "residual", "keep")
PRETRAIN_SOURCES = ("reference", "weights", "isotropic")
SHIFT_ALIGNMENTS = ("diag", "full")
SHIFT_FLOORS = ("trace", "max")
VAS_SCORES = ("energy", "weight")
DIRECTIONS = ("delta", "generalized")
TRUNCATIONS = ("frobenius", "objective")


class CNTLoRAError(ValueError):
    """Bad input. The message names the problem and how to fix it."""


def _choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise CNTLoRAError(f"unknown {name} {value!r}; use one of {', '.join(map(repr, allowed))}")


@dataclass
class CNTLoRAConfig:
    """How to turn activation statistics into LoRA weights (see docs/method.md).

    mode: "self", "cross" or "shift" (presets of the constraint engine), ignored when
        `constraints` is given.
    r, alpha, use_rslora: as in peft.LoraConfig; the scale is s = alpha/r (alpha/sqrt(r)).
    base: "subspace" (default: B = 0, A spans the data-driven directions, output unchanged),
        "residual" (W0 <- W0 - s·B·A, output unchanged) or "keep" (output moves by s·B·A).
        For causal language models, base="residual" with strength=None starts the adapter at
        the top-r part of ΔW; in the quality benchmark it beat PiSSA on SmolLM2 with 800
        windows and tied it with 100, where "subspace" lost (at a learning rate 3x lower than
        subspace's).
    gamma: weight of the "zero on pre-training inputs" constraint in Cross mode.
    pretrain_source: "reference", "weights" or "isotropic"; None picks "reference" when
        reference statistics exist, else "weights". In the quality benchmark a real reference set
        tied the weight proxy on the classifiers except for Cross-VAS on MobileNetV2 (800
        examples), which it repaired, and lost with the causal-LM residual start.
    ridge: relative ridge, lambda = ridge · trace(sum_k w_k C_k) / n.
    shift_alignment: "diag" (per feature) or "full" (whitening + recolouring).
    shift_floor: the eigenvalue floor of Shift's alignment: the system's λ = ridge·tr(C_f)/n
        ("trace", default) or ridge·λ_max(C_f) ("max"), which bounds how far the alignment
        stretches low-variance directions (METHOD.md direction 2); in the benchmark it tied
        "trace".
    strength: trust region tau; ΔW_r is scaled by min(1, tau·||W0||/||ΔW_r||) whenever it
        enters the weights (base "keep" or "residual"). None disables it.
    vas, budget, r_min, r_max, vas_score: variable ranks under a parameter budget.
    constraints: a list of cntlora.Constraint replacing the mode's preset.
    seed: seeds the randomized SVD and the random padding rows of A.
    a_row_norm: row norm of A in subspace mode and of A's padding rows; None is the expected
        row norm of PEFT's default A, 1/sqrt(3). With vas=True, 1 was the best CNTLoRA setting on
        ~100-example classifiers (level with the best PEFT init) and lost on the few-shot LM.
    directions: where A's rows come from in subspace mode. "delta" (default): the top right
        singular vectors of ΔW. "generalized": the top generalized eigenvectors of
        rhs·w = ρ·gram·w of the layer's system (Cross: C_f·w = ρ·(C_f + γC_p + λI)·w), the input
        directions where fine-tuning energy most exceeds pre-training energy, whatever W0 does
        with them (docs/method.md). Self or Cross, subspace base, no VAS.
    truncation: how ΔW becomes rank r. "frobenius" (default): its top-r singular components, the
        closest rank r in ||·||_F. "objective": the rank-r update that minimizes the constraints'
        own objective (reduced-rank regression: U_r·U_rᵀ·ΔW, U_r the top left singular vectors
        of ΔW·chol(gram)), which weighs the inputs as the data does (docs/method.md). It forms
        ΔW in every layer; VAS's "energy" score becomes each component's share of the objective.
        In the quality benchmark it won with VAS on vision (800 examples), lost on the few-shot
        language model and tied elsewhere, so it stays opt-in.
    randomized_svd_above: layers with min(m, n) above this use a seeded randomized SVD (on the
        CPU, layers above 2048 without forming ΔW). None picks 256 on every device: the exact
        path cost ~2.5 s of a 1B model's init on an H200 and 8 s of SmolLM2's on 2 CPU cores.

    The defaults (mode="self", base="subspace", vas=False) follow the quality benchmark:
    docs/benchmarks.md.
    """

    mode: str = "self"
    r: int = 8
    alpha: float = 8.0
    base: str = "subspace"
    gamma: float = 1.0
    pretrain_source: Optional[str] = None
    ridge: float = 1e-2
    shift_alignment: str = "diag"
    shift_floor: str = "trace"
    strength: Optional[float] = 0.05
    use_rslora: bool = False
    vas: bool = False
    budget: Optional[int] = None
    r_min: int = 0
    r_max: Optional[int] = None
    vas_score: str = "energy"
    constraints: Optional[list] = field(default=None, repr=False)
    seed: int = 0
    a_row_norm: Optional[float] = None
    directions: str = "delta"
    truncation: str = "frobenius"
    randomized_svd_above: Optional[int] = None  # None: 256
    svd_niter: int = 4

    def __post_init__(self) -> None:
        self.mode = str(self.mode).lower()
        _choice("mode", self.mode, MODES)
        _choice("base", self.base, BASES)
        if self.pretrain_source is not None:
            _choice("pretrain_source", self.pretrain_source, PRETRAIN_SOURCES)
        _choice("shift_alignment", self.shift_alignment, SHIFT_ALIGNMENTS)
        _choice("shift_floor", self.shift_floor, SHIFT_FLOORS)
        _choice("vas_score", self.vas_score, VAS_SCORES)
        if not isinstance(self.r, int) or self.r < 1:
            raise CNTLoRAError(f"r must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise CNTLoRAError(f"alpha must be positive, got {self.alpha!r}")
        if self.ridge < 0:
            raise CNTLoRAError(f"ridge must be >= 0, got {self.ridge!r}; 1e-2 is a safe start")
        if self.gamma < 0:
            raise CNTLoRAError(f"gamma must be >= 0, got {self.gamma!r}")
        if self.strength is not None and self.strength <= 0:
            raise CNTLoRAError(f"strength must be positive or None (no cap), got {self.strength!r}")
        if self.r_min < 0 or (self.r_max is not None and self.r_max < max(self.r_min, 1)):
            raise CNTLoRAError(
                f"need 0 <= r_min <= r_max and r_max >= 1, got r_min={self.r_min}, r_max={self.r_max}"
            )
        _choice("directions", self.directions, DIRECTIONS)
        if self.directions == "generalized":
            if self.base != "subspace":
                raise CNTLoRAError("directions='generalized' gives A's directions, not ΔW's magnitude: use it with "
                                   "base='subspace', or directions='delta' with base='residual'/'keep'")
            if self.vas:
                raise CNTLoRAError("directions='generalized' has no ΔW spectrum for VAS to allocate ranks from; "
                                   "use vas=False, or directions='delta'")
            if self.constraints is None and self.mode == "shift":
                raise CNTLoRAError("directions='generalized' needs Self or Cross: Shift's alignment is not "
                                   "symmetric; use directions='delta' with mode='shift'")
        _choice("truncation", self.truncation, TRUNCATIONS)
        if self.truncation == "objective" and self.directions == "generalized":
            raise CNTLoRAError("directions='generalized' takes A's directions from the system, not from a truncation "
                               "of ΔW; use truncation='frobenius' with it, or directions='delta'")
        if self.a_row_norm is not None and not self.a_row_norm > 0:
            raise CNTLoRAError(f"a_row_norm must be positive or None (LoRA's default), got {self.a_row_norm!r}")
        if self.budget is not None and self.budget <= 0:
            raise CNTLoRAError(f"budget must be a positive parameter count, got {self.budget!r}")
        if self.constraints is not None and len(self.constraints) == 0:
            raise CNTLoRAError("constraints=[] gives no equations; pass None to use the mode's preset")

    @property
    def scale(self) -> float:
        """s, the LoRA scale that multiplies B·A."""
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)

    @property
    def max_rank(self) -> int:
        return self.r_max if self.r_max is not None else (2 * self.r if self.vas else self.r)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["constraints"] = None if self.constraints is None else [repr(c) for c in self.constraints]
        return d
