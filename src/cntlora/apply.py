"""Apply: a Plan -> a peft.PeftModel built with PEFT's own LoraConfig, with B and A loaded.

Base handling (docs/method.md): "subspace" and "keep" leave W0 alone; "residual" writes
W0 <- W0 - s·B·A so that the output at step 0 is unchanged.
"""

from __future__ import annotations

import copy
import re
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from . import distributed as dist
from .config import CNTLoRAConfig, CNTLoRAError
from .layers import base_layer, delta_to_weight
from .plan import Plan, solve, solve_parts
from .collect import collect_statistics, iter_statistics
from .statistics import weight_digest

# What CNTLoRA decides; everything else in a user's LoraConfig is honoured as given.
_DECIDED = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "init_lora_weights")


def _needs_exact_names(adapted, module_names) -> bool:
    """PEFT matches list entries as name suffixes and pattern keys as `(.*[.])?key$`, so a top-level
    "0" would also claim a nested "2.0"."""
    targets = set(adapted)
    return any(other != name and other.endswith("." + name) for other in module_names for name in targets)


def lora_config_for(plan: Plan, lora_config=None, module_names=()):
    """PEFT's LoraConfig for a plan: ranks, alpha and targets from the plan, the rest from `lora_config`.

    Layer names are written as plain names, which downstream tools read, unless one of them is
    also the suffix of another module's name; then they become anchored, escaped patterns.

    Args:
        plan: the solved plan (cntlora.solve).
        lora_config: a peft.LoraConfig whose other fields (modules_to_save, dropout, bias,
            task_type...) are kept; None starts from LoraConfig().
        module_names: every module name of the model, to detect names that are suffixes of others.

    Returns:
        A new peft.LoraConfig with init_lora_weights=False.

    Raises:
        CNTLoRAError: lora_config is not a LoraConfig, asks for DoRA or layer replication, or
            every layer got rank 0.
    """
    from peft import LoraConfig

    if lora_config is not None and not isinstance(lora_config, LoraConfig):
        raise CNTLoRAError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    if lora_config is not None and (lora_config.use_dora or getattr(lora_config, "layer_replication", None)):
        raise CNTLoRAError("cntlora initializes plain LoRA; turn off use_dora / layer_replication in lora_config")
    if not plan.adapted:
        raise CNTLoRAError("every layer got rank 0; raise the budget or r_min")
    cfg = copy.deepcopy(lora_config) if lora_config is not None else LoraConfig()
    c = plan.config
    cfg.r = c.r
    cfg.lora_alpha = c.alpha
    cfg.use_rslora = c.use_rslora
    if _needs_exact_names(plan.adapted, module_names):
        cfg.target_modules = "|".join(re.escape(n) for n in plan.adapted)  # PEFT fullmatches a string
        cfg.rank_pattern = {"^" + re.escape(n): r for n, r in plan.rank_pattern.items()}
        cfg.alpha_pattern = {"^" + re.escape(n): a for n, a in plan.alpha_pattern.items()}
    else:
        cfg.target_modules = set(plan.adapted)
        cfg.rank_pattern = plan.rank_pattern
        cfg.alpha_pattern = plan.alpha_pattern
    cfg.init_lora_weights = False  # B and A are overwritten below
    cfg.fan_in_fan_out = any(plan.layers[n].spec.kind == "conv1d" for n in plan.adapted)
    return cfg


def _refuse_shared_weights(model: nn.Module, adapted) -> None:
    """Residual mode rewrites W0: refuse a weight that another module (or layer) also uses."""
    users: dict = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(p), []).append(pname.rsplit(".", 1)[0])
    modules = dict(model.named_modules())
    for name in adapted:
        others = [u for u in users.get(id(base_layer(modules[name]).weight), []) if u != name]
        if others:
            raise CNTLoRAError(
                f"the weight of {name!r} is shared with {others[:3]} (tied weights); base='residual' would change "
                "them too. Use base='subspace' or 'keep', or leave the shared layers out of target_modules"
            )


def apply(model: nn.Module, plan: Plan, lora_config=None, adapter_name: str = "default"):
    """Wrap `model` (in place, as peft.get_peft_model does) and load the planned B and A.

    With base="residual", each adapted weight becomes W0 - s·B·A, so the output is unchanged.

    Args:
        model: the model the plan was solved for. A DistributedDataParallel wrapper is unwrapped
            (wrap the returned PeftModel again to train); under FSDP2 the base stays sharded and
            the LoRA factors are plain tensors, the same on every rank.
        plan: the plan from cntlora.solve or cntlora.solve_parts.
        lora_config: an optional peft.LoraConfig for everything the plan does not decide.
        adapter_name: the PEFT adapter name.

    Returns:
        The peft.PeftModel; its `cntlora_plan` attribute holds the plan.

    Raises:
        CNTLoRAError: the config is unusable (see lora_config_for), the model mixes Conv1D with
            other layer kinds, residual mode on a weight shared with another module, or PEFT
            wrapped other layers or gave another scale than planned.
    """
    from peft import get_peft_model

    t0 = time.perf_counter()
    model = dist.unwrap(model)  # DDP: PEFT wraps the module; wrap the PeftModel in DDP again to train it
    if plan.config.base == "residual":
        _refuse_shared_weights(model, plan.adapted)
        modules = dict(model.named_modules())
        plan.base_digest = weight_digest({n: modules[n] for n in plan.adapted}, {n: plan.layers[n].spec for n in plan.adapted})
    cfg = lora_config_for(plan, lora_config, [n for n, _ in model.named_modules()])
    mixed = {n for n in plan.adapted if plan.layers[n].spec.kind == "conv1d"}
    if mixed and len(mixed) != len(plan.adapted):
        raise CNTLoRAError(
            "a model mixing transformers Conv1D and other layer types needs two adapters (fan_in_fan_out differs); "
            "target one kind at a time"
        )
    peft_model = get_peft_model(model, cfg, adapter_name=adapter_name)
    modules = dict(peft_model.base_model.model.named_modules())
    wrapped = {n for n, m in modules.items() if hasattr(m, "lora_A") and adapter_name in m.lora_A}
    if wrapped != set(plan.adapted):
        raise CNTLoRAError(f"PEFT attached adapters to {sorted(wrapped ^ set(plan.adapted))[:3]} against the plan; "
                           "report this with the model's layer names")
    s = plan.scale
    for name in plan.adapted:
        lp = plan.layers[name]
        layer = modules[name]
        lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        with torch.no_grad():
            lora_a.copy_(lp.A.reshape(lora_a.shape))
            lora_b.copy_(lp.B.reshape(lora_b.shape))
            if plan.config.base == "residual":
                w = base_layer(layer).weight
                delta = s * (lp.B.double() @ lp.A.double())  # FSDP2: each rank updates its own shard
                dist.subtract_from_weight(w, delta_to_weight(delta, lp.spec).to(device=w.device, dtype=w.dtype))
        if abs(layer.scaling[adapter_name] - s) > 1e-9 * s:
            raise CNTLoRAError(f"PEFT gave {name!r} scale {layer.scaling[adapter_name]} instead of {s}")
    peft_model.cntlora_plan = plan
    plan.timings["apply"] = time.perf_counter() - t0
    return peft_model


def initialize(
    model: nn.Module,
    dataloader: Iterable,
    config: Optional[CNTLoRAConfig] = None,
    target_modules: Union[str, Sequence[str], None] = None,
    reference_dataloader: Optional[Iterable] = None,
    lora_config=None,
    max_batches: Optional[int] = None,
    max_tokens: Optional[int] = None,
    forward_fn: Optional[Callable] = None,
    mask_fn: Optional[Callable] = None,
    max_stats_memory: Optional[int] = None,
    offload: bool = False,
    stats_dtype: Optional[torch.dtype] = None,
    stop_early: bool = True,
    progress: bool = True,
    adapter_name: str = "default",
    distributed_solve: str = "rank0",
):
    """Collect statistics, solve and apply in one call.

    With max_stats_memory, each pass's layers are solved as soon as the pass ends and its
    statistics are then dropped, so the device holds one pass's statistics (plus one layer's
    solve) at a time, and nothing goes to host memory. offload=True instead collects every pass
    to host memory first and solves afterwards: the lowest device memory, paid for in transfers.

    Args:
        model: the frozen model; it is wrapped in place.
        dataloader: batches of fine-tuning data (see collect_statistics).
        config: a CNTLoRAConfig; None uses the defaults.
        target_modules: the layers to adapt (names, suffixes or a regex); None takes them from
            lora_config.target_modules.
        reference_dataloader: pre-training-like batches, for Cross and Shift.
        lora_config: a peft.LoraConfig for what CNTLoRA does not decide (modules_to_save, dropout...).
        max_batches, max_tokens, forward_fn, mask_fn, max_stats_memory, stats_dtype, stop_early,
            progress: as in collect_statistics.
        offload: collect every pass to host memory, then solve.
        adapter_name: the PEFT adapter name.
        distributed_solve: under torch.distributed, "rank0" or "shared" (see cntlora.solve).

    Returns:
        A peft.PeftModel to train as usual; `cntlora_plan` holds the plan and its timings.

    Raises:
        CNTLoRAError: no target modules, bad data or config; the message names the fix.
    """
    config = config or CNTLoRAConfig()
    if target_modules is None and lora_config is not None and lora_config.target_modules:
        target_modules = (
            lora_config.target_modules if isinstance(lora_config.target_modules, str) else sorted(lora_config.target_modules)
        )
    if target_modules is None:
        raise CNTLoRAError("pass target_modules=[...] (or a lora_config with target_modules)")
    collection = dict(reference_dataloader=reference_dataloader, max_batches=max_batches, max_tokens=max_tokens,
                      forward_fn=forward_fn, mask_fn=mask_fn, max_stats_memory=max_stats_memory,
                      stats_dtype=stats_dtype, stop_early=stop_early, progress=progress)
    if offload:
        t0 = time.perf_counter()
        stats = collect_statistics(model, dataloader, target_modules, offload=True, **collection)
        collect_seconds = time.perf_counter() - t0
        plan = solve(model, stats, config, progress=progress, distributed_solve=distributed_solve)
        del stats
    else:
        collect_seconds = [0.0]
        parts = _timed(iter_statistics(model, dataloader, target_modules, **collection), collect_seconds)
        plan = solve_parts(model, parts, config, progress=progress, release=True, distributed_solve=distributed_solve)
        collect_seconds = collect_seconds[0]
    plan.timings["collect"] = collect_seconds
    return apply(model, plan, lora_config=lora_config, adapter_name=adapter_name)


def _timed(parts: Iterator, seconds: list) -> Iterator:
    """Pass `parts` through, adding the wall time spent producing them to seconds[0] (each part
    ends with a device sync, so the time is the collection's own)."""
    parts = iter(parts)
    while True:
        t0 = time.perf_counter()
        try:
            part = next(parts)
        except StopIteration:
            return
        finally:
            seconds[0] += time.perf_counter() - t0
        yield part
        del part  # the consumer releases the part; no reference stays here
