"""Solve + decompose for a whole model: statistics + W0 -> per-layer B, A and rank (a Plan).

The only model access is reading W0; everything after that is the pure functions of
solver.py and decompose.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .clock import PhaseClock, synchronize  # noqa: F401  (synchronize: the benchmark's timings)
from . import distributed as dist
from .config import CNTLoRAConfig, CNTLoRAError
from .decompose import (DEFAULT_A_ROW_NORM, DenseProducts, Spectrum, allocate_ranks, component_scores,
                        generalized_directions, input_shift, lora_factors, objective_truncation, randomized_range, ritz_by_shape,
                        top_singular)
from .layers import LayerSpec, base_layer, check_finite_weights, weight_matrix
from .solver import mode_constraints, needs_pretrain, normal_equations, pretrain_moments
from .statistics import Statistics


@dataclass
class LayerPlan:
    name: str
    spec: LayerSpec
    rank: int
    B: torch.Tensor  # m × rank, float32
    A: torch.Tensor  # rank × n, float32
    singular_values: torch.Tensor  # the leading σ of ΔW (of ΔW·chol under truncation="objective"), before the cap
    delta_energy: Optional[float]  # ||ΔW||_F² (||ΔW·chol||_F²); None when ΔW was only used implicitly
    w0_norm: float
    cap: float  # trust-region factor applied to ΔW_r (1 = none)
    input_shift: Optional[float] = None  # decompose.input_shift of the layer's inputs, under the "shift" VAS score

    @property
    def params(self) -> int:
        return self.rank * (self.spec.out_features + self.spec.in_features)

    @property
    def energy_share(self) -> float:
        """Share of ||ΔW||² in the kept components (nan when ||ΔW||² was not computed)."""
        if self.delta_energy is None:
            return float("nan")
        if self.delta_energy <= 0:
            return 0.0
        return float(self.singular_values[: self.rank].pow(2).sum()) / self.delta_energy


@dataclass
class Plan:
    """Everything `apply` needs: per-layer factors and the LoRA scale they assume."""

    config: CNTLoRAConfig
    layers: Dict[str, LayerPlan]
    pretrain_source: Optional[str]
    budget: int
    timings: Dict[str, float] = field(default_factory=dict)
    stats_info: dict = field(default_factory=dict)  # how the statistics were collected, and their bytes
    base_digest: Dict[str, str] = field(default_factory=dict)  # residual mode: the original W0 of each layer

    @property
    def scale(self) -> float:
        return self.config.scale

    @property
    def adapted(self) -> List[str]:
        """Layers that get an adapter (rank > 0)."""
        return [n for n, lp in self.layers.items() if lp.rank > 0]

    def layer_alpha(self, rank: int) -> float:
        """alpha_l that keeps s = alpha/r identical in a layer of rank r_l."""
        c = self.config
        return c.alpha * (math.sqrt(rank / c.r) if c.use_rslora else rank / c.r)

    @property
    def rank_pattern(self) -> Dict[str, int]:
        return {n: lp.rank for n, lp in self.layers.items() if lp.rank > 0 and lp.rank != self.config.r}

    @property
    def alpha_pattern(self) -> Dict[str, float]:
        return {n: self.layer_alpha(r) for n, r in self.rank_pattern.items()}

    @property
    def params(self) -> int:
        return sum(lp.params for lp in self.layers.values())

    def summary(self) -> str:
        """A per-layer table: shape, rank, captured energy share, parameters (and input shift under the
        "shift" VAS score); totals vs the budget."""
        name_w = max([len("layer")] + [len(n) for n in self.layers])
        shifts = any(lp.input_shift is not None for lp in self.layers.values())
        lines = [f"{'layer':<{name_w}}  {'shape':>11}  {'rank':>4}  {'energy':>6}  {'|ΔW|/|W0|':>9}  {'params':>9}"
                 + ("  shift" if shifts else "")]
        for n, lp in self.layers.items():
            shape = f"{lp.spec.out_features}x{lp.spec.in_features}"
            known = lp.delta_energy is not None and lp.w0_norm > 0
            rel = f"{math.sqrt(lp.delta_energy) / lp.w0_norm:.3f}" if known else "–"
            share = f"{lp.energy_share:.1%}" if lp.delta_energy is not None else "–"
            lines.append(f"{n:<{name_w}}  {shape:>11}  {lp.rank:>4}  {share:>6}  {rel:>9}  {lp.params:>9,}"
                         + (f"  {lp.input_shift:5.2f}" if lp.input_shift is not None else ""))
        c = self.config
        lines.append(
            f"total: {len(self.adapted)}/{len(self.layers)} layers adapted, {self.params:,} parameters "
            f"(budget {self.budget:,}); mode={c.mode if c.constraints is None else 'custom'}, base={c.base}, "
            f"pretrain_source={self.pretrain_source}, s={self.scale:g}"
        )
        return "\n".join(lines)


def solve(model: nn.Module, stats: Statistics, config: CNTLoRAConfig, progress: bool = False,
          distributed_solve: str = "rank0") -> Plan:
    """Solve for ΔW per layer and decompose it into LoRA factors.

    Under torch.distributed every rank must call it; rank 0's plan is broadcast, so every rank
    holds identical adapters (docs/multi-gpu.md).

    Args:
        model: the model the statistics were collected on (its weights are read, not changed);
            a DistributedDataParallel wrapper is unwrapped.
        stats: the Statistics from collect_statistics (or Statistics.load).
        config: the CNTLoRAConfig.
        progress: show a progress bar over the layers (rank 0 only).
        distributed_solve: under torch.distributed, "rank0" (rank 0 solves every layer) or
            "shared" (each rank solves a share of the layer inputs; rank 0 gathers them).

    Returns:
        The Plan: B, A and the rank of every layer, plus the scale and timings.

    Raises:
        CNTLoRAError: the statistics belong to another model or checkpoint, a mode needs
            pre-training statistics that are missing, a system is singular (raise ridge), or
            (under torch.distributed) another rank failed.
    """
    return solve_parts(model, [stats], config, progress, distributed_solve=distributed_solve)


def solve_parts(model: nn.Module, parts: Iterable[Statistics], config: CNTLoRAConfig, progress: bool = False,
                release: bool = False, distributed_solve: str = "rank0") -> Plan:
    """`solve` over statistics that arrive in parts (the passes of iter_statistics).

    Each part's layers are solved and decomposed when it arrives and only their spectra are
    kept, so one pass's statistics at a time are in memory. The plan is the one `solve` gives
    for the parts merged.

    Args:
        model, config, progress: as in solve.
        parts: an iterable of Statistics with disjoint layers; under torch.distributed every
            rank must iterate it.
        release: drop each input's sums from its part as soon as its layers are solved (for
            parts nobody else reads; it empties them).
        distributed_solve: as in solve.

    Returns:
        The Plan, identical on every rank.

    Raises:
        CNTLoRAError: as in solve, or no statistics were given.
    """
    if distributed_solve not in dist.SOLVE_MODES:
        raise CNTLoRAError(f"distributed_solve={distributed_solve!r}; use one of {dist.SOLVE_MODES}")
    model = dist.unwrap(model)
    solver = _Solver(model, config, progress and dist.is_main())
    if dist.active():
        return dist.solve_parts(model, parts, solver, distributed_solve, release)
    for part in parts:
        solver.add(part, release)
        del part
    return solver.plan()


# Layers with min(m, n) above this get a randomized SVD, on every device, so the CPU and the GPU
# run the same algorithm: the exact path (an eigendecomposition per layer) took 2.5 s of a 1B
# model's init on an H200 and 8 s of SmolLM2's on 2 CPU cores.
RANDOMIZED_SVD_ABOVE = 256
# CPU layers above this never form ΔW (it also drops ||ΔW||² from the plan's summary)
IMPLICIT_ABOVE_ON_CPU = 2048


def _solve_device(modules: Dict[str, nn.Module]) -> torch.device:
    """Solve where the weights live: the GPU when the model is on one."""
    return base_layer(next(iter(modules.values()))).weight.device if modules else torch.device("cpu")


def _system(stats: Statistics, layer: str, source: Optional[str], w0: torch.Tensor, constraints, ridge: float):
    """The factored normal equations of `layer`'s input, float64 on W0's device."""
    fine = stats.moments(layer, device=w0.device)
    reference = stats.moments(layer, "reference", device=w0.device) if source == "reference" else None
    pretrain = pretrain_moments(source, fine, w0, reference) if source else None
    try:
        return normal_equations(fine, pretrain, constraints, ridge)
    except CNTLoRAError as e:
        raise CNTLoRAError(f"layer {layer!r}: {e}") from None


def _share_transfer(stats: Statistics, group: str) -> bool:
    """Whether one n×n transfer matrix for the whole group beats forming each ΔW on its own.

    Per layer costs about Σ 2·m·n²; shared, n³ + Σ m·n² (the factorization is shared either way).
    """
    n = stats.layers[group].in_features
    members = [s for name, s in stats.layers.items() if stats.groups[name] == group]
    return sum(s.out_features for s in members) >= n


class _Solver:
    """The per-layer solve and decomposition of the parts seen so far, then the plan."""

    def __init__(self, model: nn.Module, config: CNTLoRAConfig, progress: bool):
        self.model, self.config, self.progress = model, config, progress
        self.constraints = mode_constraints(config)
        self.source: Optional[str] = None  # known once a part has been added
        self.specs: Dict[str, LayerSpec] = {}
        self.spectra: Dict[str, Spectrum] = {}
        self.w0_norms: Dict[str, float] = {}
        self.shifts: Dict[str, float] = {}  # input_shift per layer, for the "shift" VAS score
        self.timings = {"solve": 0.0, "decompose": 0.0}
        self.stats_info: dict = {"bytes": 0}

    def _pretrain_source(self, stats: Statistics) -> Optional[str]:
        if not (needs_pretrain(self.constraints) or (self.config.vas and self.config.advanced.vas_score == "shift")):
            return None
        source = self.config.pretrain_source or ("reference" if stats.reference is not None else "weights")
        if source == "reference" and stats.reference is None:
            raise CNTLoRAError(
                "pretrain_source='reference' but the statistics have no reference set; collect them with "
                "reference_dataloader=, or use pretrain_source='weights'"
            )
        return source

    def add(self, stats: Statistics, release: bool = False) -> None:
        config = self.config
        modules = stats.check_model(self.model)
        source = self._pretrain_source(stats)
        if self.specs and source != self.source:
            raise CNTLoRAError("the parts disagree on the pre-training source (some have a reference set, some not)")
        self.source = source
        if not config.vas:
            small = [(n, s) for n, s in stats.layers.items() if config.r > min(s.out_features, s.in_features)]
            if small:
                n, s = small[0]
                raise CNTLoRAError(
                    f"r={config.r} is larger than min(m, n)={min(s.out_features, s.in_features)} of layer {n!r} "
                    f"({s.out_features}×{s.in_features}); lower r or leave that layer out"
                )
        self.stats_info = {**stats.info, "bytes": self.stats_info["bytes"] + stats.nbytes()}
        spectra, w0_norms, shifts, timings = _layer_spectra(modules, stats, config, source, self.constraints,
                                                            self.progress, release)
        self.shifts.update(shifts)
        self.specs.update(stats.layers)
        self.spectra.update(spectra)
        self.w0_norms.update(w0_norms)
        for phase, seconds in timings.items():
            self.timings[phase] += seconds

    def plan(self) -> Plan:
        if not self.specs:
            raise CNTLoRAError("no statistics were given to solve from")
        config = self.config
        t0 = time.perf_counter()
        order = _model_order(self.model)
        specs = dict(sorted(self.specs.items(), key=lambda kv: order.get(kv[0], len(order))))
        spectra, w0_norms = self.spectra, self.w0_norms
        budget = config.budget or sum(config.r * (s.out_features + s.in_features) for s in specs.values())
        if config.vas:
            scores = {n: component_scores(spectra[n], w0_norms[n], config.advanced.vas_score, self.shifts.get(n))
                      for n in specs}
            costs = {n: s.out_features + s.in_features for n, s in specs.items()}
            ranks = allocate_ranks(scores, costs, budget, config.r_min, config.max_rank)
        else:
            ranks = {n: config.r for n in specs}

        layers = {}
        for i, (name, spec) in enumerate(specs.items()):
            sp = spectra[name]
            if ranks[name] > 0:
                b, a, cap = lora_factors(
                    sp, ranks[name], config.scale, config.base, w0_norms[name], config.strength, seed=config.seed + i,
                    a_row_norm=DEFAULT_A_ROW_NORM if config.advanced.a_row_norm is None else config.advanced.a_row_norm,
                )
            else:
                b = torch.zeros(spec.out_features, 0, dtype=torch.float64)
                a = torch.zeros(0, spec.in_features, dtype=torch.float64)
                cap = 1.0
            layers[name] = LayerPlan(name, spec, ranks[name], b.float(), a.float(), sp.sigma,
                                     sp.energy, w0_norms[name], cap, self.shifts.get(name))
        timings = dict(self.timings)
        timings["decompose"] += time.perf_counter() - t0
        return Plan(config, layers, self.source, budget, timings, self.stats_info)


def _model_order(model: nn.Module) -> Dict[str, int]:
    """Each module's position in the model (names with and without PEFT's wrapper prefix)."""
    order = {}
    for i, (name, _) in enumerate(model.named_modules()):
        order.setdefault(name.removeprefix("base_model.model."), i)
    return order


def _layer_spectra(modules: Dict[str, nn.Module], stats: Statistics, config: CNTLoRAConfig, source: Optional[str],
                   constraints, progress: bool, release: bool):
    """({layer: Spectrum on the CPU}, {layer: ||W0||}, {layer: input_shift ("shift" VAS)}, {phase: seconds})."""
    spectra: Dict[str, Spectrum] = {}
    ranges: Dict[str, tuple] = {}  # randomized layers: (basis, projected, k), their Ritz step batched by shape below
    energies: Dict[str, torch.Tensor] = {}  # ||ΔW||² of the randomized layers that form ΔW
    w0_norms: Dict[str, torch.Tensor] = {}
    device = _solve_device(modules)
    clock = PhaseClock(device)
    adv = config.advanced
    above = RANDOMIZED_SVD_ABOVE if adv.randomized_svd_above is None else adv.randomized_svd_above
    # On the CPU, the largest layers never form ΔW: the randomized SVD needs only products with it
    # (a Cholesky factorization plus O((m + n)·n·k) instead of O(m·n²)). On GPUs the triangular
    # solves are latency-bound (1.9 s for a 1B model on an H200, against 0.3 s for forming every
    # ΔW), so ΔW is formed there, and so it is for the "energy" VAS score and the objective truncation.
    implicit_allowed = (device.type == "cpu" and not (config.vas and config.advanced.vas_score != "weight")
                        and config.advanced.truncation == "frobenius")
    group_cache: Dict[str, dict] = {}  # the current group's system (and transfer matrix), shared by its layers
    shifts, shift_of = {}, {}  # input_shift per layer, and per input group (per layer under the weight proxy)
    shift_source = source if config.vas and adv.vas_score == "shift" else None
    source = source if needs_pretrain(constraints) else None  # the system's own (Self has none)
    # the last layer of each input: after it, release=True drops that input's sums
    last_of_group = {stats.groups[n]: n for n in stats.layers}
    # Nothing in this loop reads a GPU value back (only a group's first system does, and input_shift).
    check_finite_weights({n: modules[n] for n in stats.layers})
    for name in tqdm(stats.layers, desc="solve", disable=not progress, leave=False):
        spec = stats.layers[name]
        group = stats.groups[name]
        w0 = weight_matrix(modules[name], spec).detach().to(device, torch.float64)
        width = min(spec.out_features, spec.in_features)
        k = min(config.max_rank, width)
        randomized = width > above
        implicit = implicit_allowed and width > max(above, IMPLICIT_ABOVE_ON_CPU)
        if source != "weights":  # the system depends on the shared input only
            if group not in group_cache:
                group_cache.clear()
                group_cache[group] = {"system": _system(stats, group, source, w0, constraints, config.ridge)}
            cached = group_cache[group]
            system = cached["system"]
        else:
            cached, system = None, _system(stats, name, source, w0, constraints, config.ridge)
        key = name if shift_source == "weights" else group  # a proxy C_p depends on W0: one per layer
        if shift_source and key not in shift_of:  # from the sums, before they are released
            fine = stats.moments(name, device=device)
            ref = stats.moments(name, "reference", device=device) if shift_source == "reference" else None
            shift_of[key] = input_shift(fine.second, pretrain_moments(shift_source, fine, w0, ref).second,
                                        min(config.r, spec.in_features))
        if shift_source:
            shifts[name] = shift_of[key]
        if release and last_of_group[group] == name:  # the system holds what it needs of the sums
            for sets in (stats.fine, stats.reference or {}):
                sets.pop(group, None)
        w0_norms[name] = torch.linalg.norm(w0)
        if config.advanced.directions == "generalized":  # A's directions from the system alone; no ΔW, no SVD
            clock.mark("solve")
            shared = cached if cached is not None else {}
            if "directions" not in shared:  # for the widest k of the input's layers: slices serve the rest
                shared["directions"] = generalized_directions(system.rhs, system.chol,
                                                              min(config.max_rank, spec.in_features))
            rho, basis = shared["directions"]
            spectra[name] = Spectrum(torch.zeros(spec.out_features, k, dtype=w0.dtype, device=device), rho[:k],
                                     basis[:, :k], None)
            clock.mark("decompose")
            continue
        if implicit:
            products = system.products(w0)
        elif cached is not None and _share_transfer(stats, group):
            if "transfer" not in cached:
                cached["transfer"] = system.transfer()
            products = DenseProducts(w0 @ cached["transfer"])
        else:
            products = DenseProducts(system.delta(w0))
        clock.mark("solve")
        if config.advanced.truncation == "objective":  # its SVD is of ΔW·chol, per layer
            spectra[name] = objective_truncation(products.matrix, system.chol, k, config.seed, above, config.advanced.svd_niter)
        elif randomized:
            ranges[name] = (*randomized_range(products, k, config.seed, config.advanced.svd_niter), k)
            if not implicit:
                energies[name] = products.matrix.pow(2).sum()
        else:  # small layers: an exact decomposition, which reports ||ΔW||² itself
            spectra[name] = top_singular(products.matrix, k, config.seed, above, config.advanced.svd_niter)
        del products, system
        clock.mark("decompose")
    group_cache.clear()
    spectra.update(ritz_by_shape(ranges))
    clock.mark("decompose")
    # the first wait for the device since the loop began: every spectrum moves to the host, where
    # the factors are built (they end there); norms and energies come back in one transfer each
    w0_norms = dict(zip(w0_norms, torch.stack(list(w0_norms.values())).cpu().tolist()))
    if energies:
        energies = dict(zip(energies, torch.stack(list(energies.values())).cpu().tolist()))
    for name, sp in spectra.items():
        spectra[name] = Spectrum(sp.u.cpu(), sp.s.cpu(), sp.v.cpu(), energies.get(name, sp.energy),
                                 None if sp.gains is None else sp.gains.cpu())
    return spectra, w0_norms, shifts, clock.totals()
