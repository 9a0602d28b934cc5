"""CNTLoRAConfig: every choice CNTLoRA makes, validated once, in one place.

The top level holds what most users set. `AdvancedConfig` (`CNTLoRAConfig.advanced`) holds
research options and performance knobs, as PEFT keeps EVA's options in `LoraConfig.eva_config`.
docs/benchmarks.md says how each option fared.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence

MODES = ("self", "cross", "shift")
BASES = ("subspace", "residual", "keep")
PRETRAIN_SOURCES = ("reference", "weights", "isotropic")
SHIFT_ALIGNMENTS = ("diag", "full")
SHIFT_FLOORS = ("trace", "max")
VAS_SCORES = ("energy", "weight", "shift")
DIRECTIONS = ("delta", "generalized")
TRUNCATIONS = ("frobenius", "objective")


class CNTLoRAError(ValueError):
    """Bad input. The message names the problem and how to fix it."""


def _choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise CNTLoRAError(f"unknown {name} {value!r}; use one of {', '.join(map(repr, allowed))}")


def _number(name: str, value, minimum: float = 0.0, strict: bool = False, hint: str = "") -> None:
    """A finite real number >= minimum (> minimum when strict)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise CNTLoRAError(f"{name} must be a finite number {bound}, got {value!r}{hint}")


def _count(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise CNTLoRAError(f"{name} must be {what}, got {value!r}")


@dataclass
class AdvancedConfig:
    """Research options and performance knobs of CNTLoRA (docs/method.md explains each).

    shift_alignment: Shift mode's moment alignment: "diag" (per feature) or "full" (whitening
        and recolouring).
    shift_floor: the eigenvalue floor of Shift's alignment: the system's λ = ridge·tr(C_f)/n
        ("trace") or ridge·λ_max(C_f) ("max"); it bounds how far the alignment stretches
        low-variance directions.
    vas_score: what variable ranks (VAS) rank components by: "energy" (each component's share
        of ΔW's energy), "weight" (relative to the layer's ||W0||) or "shift" (the energy share
        times how far the layer's inputs moved from pre-training's, decompose.input_shift, so
        the budget goes to the layers whose inputs changed most; needs pre-training
        statistics, from pretrain_source, in every mode).
    directions: where A's rows come from in subspace mode. "delta": the top right singular
        vectors of ΔW. "generalized": the top generalized eigenvectors of rhs·w = ρ·gram·w of
        the layer's system (Cross: C_f·w = ρ·(C_f + γC_p + λI)·w), the input directions where
        fine-tuning energy most exceeds pre-training energy. Self or Cross, subspace base, no VAS.
    truncation: how ΔW becomes rank r. "frobenius": its top-r singular components.
        "objective": the rank-r update that minimizes the constraints' own objective
        (reduced-rank regression through the system's Cholesky factor).
    a_row_norm: the row norm of A in subspace mode and of A's padding rows; None is the
        expected row norm of PEFT's default A, 1/sqrt(3).
    randomized_svd_above: layers with min(m, n) above this use a seeded randomized SVD (on the
        CPU, layers above 2048 without forming ΔW). None picks 256.
    svd_niter: power iterations of the randomized SVD.
    """

    shift_alignment: str = "diag"
    shift_floor: str = "trace"
    vas_score: str = "energy"
    directions: str = "delta"
    truncation: str = "frobenius"
    a_row_norm: Optional[float] = None
    randomized_svd_above: Optional[int] = None
    svd_niter: int = 4

    def __post_init__(self) -> None:
        _choice("shift_alignment", self.shift_alignment, SHIFT_ALIGNMENTS)
        _choice("shift_floor", self.shift_floor, SHIFT_FLOORS)
        _choice("vas_score", self.vas_score, VAS_SCORES)
        _choice("directions", self.directions, DIRECTIONS)
        _choice("truncation", self.truncation, TRUNCATIONS)
        if self.truncation == "objective" and self.directions == "generalized":
            raise CNTLoRAError("directions='generalized' takes A's directions from the system, not from a truncation "
                               "of ΔW; use truncation='frobenius' with it, or directions='delta'")
        if self.a_row_norm is not None:
            _number("a_row_norm", self.a_row_norm, strict=True, hint=" (or None for LoRA's default)")
        if self.randomized_svd_above is not None:
            _count("randomized_svd_above", self.randomized_svd_above, 0)
        _count("svd_niter", self.svd_niter, 0)


ADVANCED_FIELDS = tuple(f.name for f in fields(AdvancedConfig))


@dataclass
class CNTLoRAConfig:
    """How to turn activation statistics into LoRA weights (docs/method.md).

    mode: "self", "cross" or "shift", the preset constraints; ignored when `constraints` is given.
        Self keeps the fine-tuning data's outputs; Cross also keeps ΔW small on pre-training
        inputs; Shift aligns the moments of fine-tuning inputs to pre-training ones.
    r, alpha, use_rslora: as in peft.LoraConfig; the scale is s = alpha/r (alpha/sqrt(r) with rsLoRA).
    base: "subspace" (B = 0 and A spans the data-driven directions; the output is unchanged),
        "residual" (W0 <- W0 - s·B·A; the output is unchanged) or "keep" (W0 stays, so the
        output moves by s·B·A).
    strength: trust region τ: ΔW_r is scaled by min(1, τ·||W0||/||ΔW_r||) whenever it enters
        the weights (base "keep" or "residual"). None disables the cap.
    gamma: the weight of the "zero on pre-training inputs" constraint in Cross mode.
    pretrain_source: where pre-training statistics come from, for Cross and Shift: "reference"
        (a reference data set passed at collection), "weights" (a proxy built from W0) or
        "isotropic". None picks "reference" when reference statistics exist, else "weights".
    ridge: relative ridge: λ = ridge · trace(Σ_k w_k C_k) / n.
    vas: variable ranks (VAS): each layer gets a rank from r_min to r_max under a parameter
        `budget` (None: what rank r everywhere would cost), by the energy of ΔW's components.
    budget, r_min, r_max: VAS's budget and rank bounds; r_max None is 2r with VAS, else r.
    seed: seeds the randomized SVD and the random padding rows of A.
    constraints: a list of cntlora.Constraint that replaces the mode's preset.
    advanced: research options and performance knobs (AdvancedConfig).
    """

    mode: str = "self"
    r: int = 8
    alpha: float = 8.0
    use_rslora: bool = False
    base: str = "subspace"
    strength: Optional[float] = 0.05
    gamma: float = 1.0
    pretrain_source: Optional[str] = None
    ridge: float = 1e-2
    vas: bool = False
    budget: Optional[int] = None
    r_min: int = 0
    r_max: Optional[int] = None
    seed: int = 0
    constraints: Optional[list] = field(default=None, repr=False)
    advanced: AdvancedConfig = field(default_factory=AdvancedConfig)

    def __post_init__(self) -> None:
        self.mode = str(self.mode).lower()
        _choice("mode", self.mode, MODES)
        _choice("base", self.base, BASES)
        if self.pretrain_source is not None:
            _choice("pretrain_source", self.pretrain_source, PRETRAIN_SOURCES)
        _count("r", self.r, 1)
        _number("alpha", self.alpha, strict=True)
        _number("ridge", self.ridge, hint="; 1e-2 is a safe start")
        _number("gamma", self.gamma)
        if self.strength is not None:
            _number("strength", self.strength, strict=True, hint=" (or None for no cap)")
        _count("r_min", self.r_min, 0)
        if self.r_max is not None and (not isinstance(self.r_max, int) or self.r_max < max(self.r_min, 1)):
            raise CNTLoRAError(
                f"need 0 <= r_min <= r_max and r_max >= 1, got r_min={self.r_min}, r_max={self.r_max}"
            )
        if self.budget is not None and (not isinstance(self.budget, int) or isinstance(self.budget, bool)
                                        or self.budget <= 0):
            raise CNTLoRAError(f"budget must be a positive parameter count, got {self.budget!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise CNTLoRAError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.advanced, Mapping):
            self.advanced = AdvancedConfig(**self.advanced)
        if not isinstance(self.advanced, AdvancedConfig):
            raise CNTLoRAError(f"advanced must be a cntlora.AdvancedConfig, got {type(self.advanced).__name__}")
        if self.advanced.directions == "generalized":
            if self.base != "subspace":
                raise CNTLoRAError("directions='generalized' gives A's directions, not ΔW's magnitude: use it with "
                                   "base='subspace', or directions='delta' with base='residual'/'keep'")
            if self.vas:
                raise CNTLoRAError("directions='generalized' has no ΔW spectrum for VAS to allocate ranks from; "
                                   "use vas=False, or directions='delta'")
            if self.constraints is None and self.mode == "shift":
                raise CNTLoRAError("directions='generalized' needs Self or Cross: Shift's alignment is not "
                                   "symmetric; use directions='delta' with mode='shift'")
        if self.constraints is not None and len(self.constraints) == 0:
            raise CNTLoRAError("constraints=[] gives no equations; pass None to use the mode's preset")

    @property
    def scale(self) -> float:
        """s, the LoRA scale that multiplies B·A."""
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)

    @property
    def max_rank(self) -> int:
        """The largest rank a layer can get: r_max, else 2r with VAS, else r."""
        return self.r_max if self.r_max is not None else (2 * self.r if self.vas else self.r)

    def to_dict(self) -> dict:
        """The config as plain JSON-able data (constraints as their repr); `from_dict` reads it back."""
        d = asdict(self)
        d["constraints"] = None if self.constraints is None else [repr(c) for c in self.constraints]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CNTLoRAConfig":
        """Build a config from a dict: `to_dict`'s output, or the flat form with advanced options at the top.

        Args:
            data: field names to values. Advanced options may stand at the top level (the flat
                form older adapters saved) or under "advanced". A saved constraints list
                stays a list of descriptions (text).

        Returns:
            The validated CNTLoRAConfig.

        Raises:
            CNTLoRAError: an unknown field, or an invalid value.
        """
        data = dict(data)
        advanced = dict(data.pop("advanced", None) or {})
        for name in ADVANCED_FIELDS:
            if name in data:
                advanced[name] = data.pop(name)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known) + sorted(set(advanced) - set(ADVANCED_FIELDS))
        if unknown:
            raise CNTLoRAError(f"unknown CNTLoRAConfig field(s) {unknown}; known: {sorted(known | set(ADVANCED_FIELDS))}")
        return cls(**data, advanced=AdvancedConfig(**advanced))
