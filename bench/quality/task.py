"""What the quality benchmark trains: a `Task`, and method labels with their setting overrides.

A label is a method name plus optional overrides: 'cntlora-cross@ridge=0.1,base=residual'.
Overrides are CNTLoRAConfig settings (flat names, advanced ones included), LoRA settings
(r, lora_alpha), or harness settings (HARNESS_KEYS, e.g. the calibration size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from cntlora.config import CNTLoRAError

from .baselines import METHODS

HARNESS_KEYS = ("calib", "ref")  # overrides the harness handles itself (calibration and reference sample sizes)


@dataclass
class Task:
    """One fine-tuning problem.

    build_model(seed) returns a fresh pretrained model (a new head may depend on the seed).
    train/val/test are sequences of examples; collate(list of examples) -> batch.
    loss_fn(model, batch) -> scalar loss; metric_fn(model, batches) -> float over a split.
    lora_kwargs: peft.LoraConfig arguments shared by every method (r, lora_alpha,
    modules_to_save...); target_modules is added from the field of that name.
    calibration_size: how many training examples the data-driven inits see (the first ones,
    the same for every method and seed).
    reference_batches: ready batches of pre-training-like data (what collate returns), the
    reference set of labels with @pretrain_source=reference; empty when the task has none.
    corda_device: where CorDA's calibration runs (baselines.peft_init); None is the model's device.
    """

    name: str
    build_model: Callable[[int], nn.Module]
    target_modules: Any
    train: Sequence
    val: Sequence
    test: Sequence
    collate: Callable[[list], Any]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    metric_fn: Callable[[nn.Module, list], float]
    metric: str = "accuracy"
    higher_is_better: bool = True
    lora_kwargs: dict = field(default_factory=lambda: {"r": 8, "lora_alpha": 8})
    batch_size: int = 16
    eval_batch_size: int = 64
    calibration_size: int = 64
    forward_fn: Optional[Callable] = None
    freeze_batchnorm: bool = True
    reference_batches: Sequence = ()
    corda_device: Optional[str] = None

    def batches(self, examples: Sequence, batch_size: int) -> list:
        """`examples` collated in consecutive batches of `batch_size` (the last may be smaller)."""
        return [self.collate(list(examples[i : i + batch_size])) for i in range(0, len(examples), batch_size)]

    def calibration_batches(self, size: Optional[int] = None) -> list:
        """The first `size` training examples (default: calibration_size), in training-size batches."""
        size = self.calibration_size if size is None else size
        return self.batches(self.train[: min(size, len(self.train))], self.batch_size)

    def reference_sample(self, size: Optional[int] = None) -> list:
        """The first `size` examples of reference_batches (all of them when size is None), re-batched as they were.

        Raises:
            CNTLoRAError: size is not a positive number of examples the reference set holds.
        """
        batches = list(self.reference_batches)
        if size is None:
            return batches
        held = sum(_batch_len(b) for b in batches)
        if not isinstance(size, int) or not 0 < size <= held:
            raise CNTLoRAError(f"ref={size!r}: task {self.name!r} holds {held} reference examples; use ref=1..{held}")
        out, left = [], size
        for b in batches:
            if left <= 0:
                break
            out.append(_batch_head(b, left))
            left -= _batch_len(out[-1])
        return out

    def full_lora_kwargs(self) -> dict:
        """lora_kwargs with target_modules added."""
        return {**self.lora_kwargs, "target_modules": self.target_modules}


def _batch_len(batch) -> int:
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    return len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)


def _batch_head(batch, n: int):
    """The first n examples of a batch (a tensor, a dict of tensors or a tuple of tensors)."""
    if isinstance(batch, dict):
        return {k: v[:n] for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(v[:n] for v in batch)
    return batch[:n]


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_label(label: str) -> tuple[str, dict]:
    """Split a method label into its method and its overrides.

    Args:
        label: e.g. 'cntlora-cross@ridge=0.1,base=residual'.

    Returns:
        (method, overrides), e.g. ('cntlora-cross', {'ridge': 0.1, 'base': 'residual'}); values
        are parsed as None, booleans, ints or floats where they read as such, else kept as text.

    Raises:
        CNTLoRAError: an unknown method, or an override that is not key=value.
    """
    method, _, rest = label.partition("@")
    if method not in METHODS:
        raise CNTLoRAError(f"unknown method {method!r}; use one of {', '.join(METHODS)} (optionally @key=value,...)")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise CNTLoRAError(f"bad override {item!r} in {label!r}; write key=value, e.g. ridge=0.1")
        overrides[key.strip()] = _parse_value(value.strip())
    return method, overrides


def resolve_label(label: str, lora_kwargs: dict) -> tuple[str, dict, dict, dict]:
    """Split a label's overrides into init overrides, harness settings and LoRA kwargs.

    A rank override keeps the LoRA scale alpha/r, so that only the rank changes; for PEFT's
    methods, r and lora_alpha go into the LoraConfig.

    Args:
        label: a method label (parse_label).
        lora_kwargs: the task's LoRA kwargs; not modified.

    Returns:
        (method, init overrides, harness settings, LoRA kwargs).

    Raises:
        CNTLoRAError: as parse_label.
    """
    method, overrides = parse_label(label)
    harness = {k: overrides.pop(k) for k in list(overrides) if k in HARNESS_KEYS}
    lora_kwargs = dict(lora_kwargs)
    ours = method.startswith("cntlora-")
    if "r" in overrides and "alpha" not in overrides and "lora_alpha" not in overrides:
        overrides["alpha" if ours else "lora_alpha"] = overrides["r"] * lora_kwargs.get("lora_alpha", 8) / lora_kwargs.get("r", 8)
    if not ours:
        for key in ("r", "lora_alpha"):
            if key in overrides:
                lora_kwargs[key] = overrides.pop(key)
    return method, overrides, harness, lora_kwargs
