"""Which layers of a denoiser get adapters, and the rank cap of layers that see only the conditioning.

Target sets (exact module names, in the model's order):
    "attention"       diffusers' DreamBooth LoRA set: to_q, to_k, to_v, to_out.0 of every
                      attention, plus the context projections add_k_proj, add_v_proj (and
                      add_q_proj, to_add_out of joint attention) where present
    "attention+conv"  also the ResNet blocks' conv1, conv2 (3×3) and conv_shortcut, and the
                      proj_in / proj_out (1×1 conv or Linear) around each transformer block stack
    "attention+ff"    also the feed-forward layers of transformer blocks: ff.net.0.proj, ff.net.2
                      (and ff_context's in joint-attention blocks)
    "all"             all of the above

Cross-attention to_k / to_v see only the text embeddings. With one prompt those span a few
directions (nearly rank one when the tokens are alike); LoRA directions outside that span
never see an input, so their rank is capped at the inputs' effective rank (effective_ranks).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Iterable, List, Sequence, Union

import torch
from torch import nn

from ..config import CNTLoRAError
from ..layers import find_targets
from ..plan import Plan
from ..statistics import Statistics

TARGET_SETS = ("attention", "attention+conv", "attention+ff", "all")
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONTEXT = ("add_k_proj", "add_v_proj", "add_q_proj", "to_add_out")
RESNET = ("conv1", "conv2", "conv_shortcut")
PROJECTIONS = ("proj_in", "proj_out")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
# an eigenvalue below this share of the largest is numerical noise of the accumulation
NOISE_FLOOR = 1e-6


def _modules(denoiser: nn.Module) -> Dict[str, nn.Module]:
    model = denoiser.get_base_model() if hasattr(denoiser, "get_base_model") else denoiser
    return dict(model.named_modules())


def _attentions(modules: Dict[str, nn.Module]) -> List[str]:
    """Attention modules: those with to_q, to_k and to_v layers."""
    return [n for n, m in modules.items() if all(isinstance(getattr(m, p, None), nn.Module) for p in ATTENTION[:3])]


def _children(modules: Dict[str, nn.Module], parents: Iterable[str], leaves: Sequence[str]) -> List[str]:
    """parent.leaf for every pair that names a Linear or Conv2d."""
    out = []
    for parent in parents:
        for leaf in leaves:
            name = f"{parent}.{leaf}" if parent else leaf
            if isinstance(modules.get(name), (nn.Linear, nn.Conv2d)):
                out.append(name)
    return out


def target_modules(denoiser: nn.Module, targets: Union[str, Sequence[str]] = "attention") -> List[str]:
    """The exact module names a target set picks in `denoiser`.

    Args:
        denoiser: a diffusers denoiser (UNet2DConditionModel, UNet2DModel, SD3Transformer2DModel, ...).
        targets: one of TARGET_SETS, or a list of names / name suffixes resolved like PEFT's
            target_modules (a suffix matches every module whose name ends with "." + it).

    Returns:
        Full module names, in the model's order.

    Raises:
        CNTLoRAError: an unknown target set, or a set or list that matches no layer.
    """
    modules = _modules(denoiser)
    if not isinstance(targets, str):
        picked = set(find_targets(denoiser, list(targets)))
        return [n for n in modules if n in picked]
    if targets not in TARGET_SETS:
        raise CNTLoRAError(f"unknown targets {targets!r}; use one of {', '.join(map(repr, TARGET_SETS))} or a list "
                           "of module names")
    attentions = _attentions(modules)
    picked = set(_children(modules, attentions, ATTENTION + CONTEXT))
    if targets in ("attention+conv", "all"):
        resnets = [n for n, m in modules.items() if isinstance(getattr(m, "conv1", None), nn.Conv2d)
                   and isinstance(getattr(m, "conv2", None), nn.Conv2d)]
        # proj_in / proj_out of the transformer block stacks inside a UNet, never a model's own output layer
        stacks = [n for n, m in modules.items() if n and hasattr(m, "transformer_blocks")]
        picked |= set(_children(modules, resnets, RESNET)) | set(_children(modules, stacks, PROJECTIONS))
    if targets in ("attention+ff", "all"):
        blocks = [n for n, m in modules.items() if hasattr(m, "ff") or hasattr(m, "ff_context")]
        picked |= set(_children(modules, blocks, FEED_FORWARD))
    if not picked:
        raise CNTLoRAError(
            f"targets={targets!r} matched no layer of {type(denoiser).__name__} (it has no attention layers?); "
            f"use another of {', '.join(map(repr, TARGET_SETS))} or a list of module names"
        )
    return [n for n in modules if n in picked]


def context_layers(denoiser: nn.Module) -> List[str]:
    """Layers whose input is the conditioning: cross-attention to_k / to_v and the context projections.

    Args:
        denoiser: a diffusers denoiser.

    Returns:
        Module names: to_k and to_v of every attention with is_cross_attention, and
        add_k_proj / add_v_proj wherever present.
    """
    modules = _modules(denoiser)
    attentions = _attentions(modules)
    cross = [n for n in attentions if getattr(modules[n], "is_cross_attention", False)]
    return [n for n in modules if n in set(_children(modules, cross, ("to_k", "to_v"))
                                           + _children(modules, attentions, ("add_k_proj", "add_v_proj")))]


def effective_rank(second: torch.Tensor, ridge: float) -> int:
    """How many input directions the solve does not damp: eigenvalues of C above λ.

    Args:
        second: the inputs' second-moment matrix C = E[x xᵀ] (n × n).
        ridge: the relative ridge; λ = ridge·tr(C)/n is the solve's own (a direction with
            eigenvalue c enters ΔW with weight c/(c + λ), under one half below λ), and never
            below NOISE_FLOOR·λ_max.

    Returns:
        The count, at least 1.
    """
    eigenvalues = torch.linalg.eigvalsh(second.double())
    top = float(eigenvalues[-1].clamp_min(0))
    threshold = max(ridge * float(torch.trace(second.double())) / second.shape[0], NOISE_FLOOR * top)
    return max(1, int((eigenvalues > threshold).sum()))


def effective_ranks(stats: Statistics, layers: Iterable[str], ridge: float) -> Dict[str, int]:
    """The effective rank of the inputs of each of `layers` present in `stats`.

    Args:
        stats: collected statistics; a reference set, when present, counts too (training
            sees both, e.g. DreamBooth's instance and class prompts).
        layers: the layer names to measure (context_layers).
        ridge: the relative ridge (effective_rank).

    Returns:
        {layer: effective rank}, computed once per shared input.
    """
    by_group: Dict[str, int] = {}
    out = {}
    for name in layers:
        if name not in stats.layers:
            continue
        group = stats.groups[name]
        if group not in by_group:
            second = stats.moments(name).second
            if stats.reference is not None:
                second = second + stats.moments(name, "reference").second
            by_group[group] = effective_rank(second, ridge)
        out[name] = by_group[group]
    return out


def cap_ranks(plan: Plan, caps: Dict[str, int]) -> Plan:
    """The plan with each capped layer's rank lowered to its cap (its leading components kept).

    Args:
        plan: a solved plan.
        caps: {layer: largest rank}; layers not in the plan or already within their cap are
            left alone.

    Returns:
        A new Plan; stats_info["rank_caps"] records {layer: [rank before, rank after]}.
        Layers keep the scale s (alpha_pattern follows the rank).
    """
    layers = dict(plan.layers)
    capped = {}
    for name, cap in caps.items():
        lp = layers.get(name)
        if lp is None or lp.rank <= cap:
            continue
        layers[name] = replace(lp, rank=cap, B=lp.B[:, :cap].contiguous(), A=lp.A[:cap].contiguous())
        capped[name] = [lp.rank, cap]
    info = dict(plan.stats_info)
    if capped:
        info["rank_caps"] = capped
    return replace(plan, layers=layers, stats_info=info, timings=dict(plan.timings))
