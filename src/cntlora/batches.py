"""Batches as the collection sees them: the default forward and mask, moves between devices."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Callable, Optional

from .config import CNTLoRAError

import torch
from torch import nn


def default_mask(batch) -> Optional[torch.Tensor]:
    """Positions to keep: attention_mask, minus labels == -100 where labels are per token."""
    if not isinstance(batch, Mapping) or batch.get("attention_mask") is None:
        return None
    mask = batch["attention_mask"].bool()
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != -100)
    return mask


def default_forward(model: nn.Module, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}  # a BatchEncoding becomes a dict
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


_ON_DEVICE = object()


def _host_mask(mask: Optional[torch.Tensor]):
    """None for a host mask that keeps every position (then no row is multiplied by it); a
    mask already on an accelerator is taken as it is (_ON_DEVICE), since reading it would sync."""
    if mask is None:
        return None
    if mask.device.type != "cpu":
        return _ON_DEVICE
    return None if bool(mask.all()) else mask


def _batch_rows(batch) -> int:
    first = batch
    while isinstance(first, (dict, list, tuple)):
        first = next(iter(first.values())) if isinstance(first, Mapping) else first[0]
    return int(first.shape[0] * (first.shape[1] if first.dim() > 1 else 1))


def _first_row(batch):
    """`batch` cut to its first example: every tensor whose first dimension is the batch's."""
    rows = None
    probe = batch
    while isinstance(probe, (dict, list, tuple)) and len(probe):
        probe = next(iter(probe.values())) if isinstance(probe, Mapping) else probe[0]
    if isinstance(probe, torch.Tensor) and probe.dim() > 0:
        rows = probe.shape[0]

    def cut(v):
        if isinstance(v, torch.Tensor):
            return v[:1] if rows is not None and v.dim() > 0 and v.shape[0] == rows else v
        if isinstance(v, Mapping):
            return {k: cut(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(cut(x) for x in v)
        return v

    return cut(batch)


def length_of(dataloader) -> Optional[int]:
    """len(dataloader), or None for a stream without a length."""
    try:
        return len(dataloader)
    except TypeError:  # no __len__, or an IterableDataset's DataLoader
        return None


def check_caps(max_batches, max_tokens, max_stats_memory=None) -> None:
    """Refuse caps that would collect nothing or drop data silently (zero, negative, not whole)."""
    caps = (("max_batches", max_batches), ("max_tokens", max_tokens), ("max_stats_memory", max_stats_memory))
    for name, value in caps:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise CNTLoRAError(f"{name}={value!r} would collect nothing or drop data; pass a positive integer, "
                               "or None for all of it")


@contextmanager
def eval_mode(model: nn.Module):
    """Run the model in eval mode without gradients; restore every module's mode afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def model_device(model: nn.Module):
    """Where the model's first parameter lives (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _StopForward(Exception):
    """Raised by the last needed hook to end a forward pass early; caught by _run_pass."""


def _forward(forward_fn: Callable, model: nn.Module, batch, what: Optional[str]) -> None:
    """forward_fn(model, batch); with `what`, a failure becomes one CNTLoRAError that names the batch."""
    try:
        forward_fn(model, batch)
    except (_StopForward, CNTLoRAError):
        raise
    except Exception as e:
        if what is None:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CNTLoRAError(f"the model's forward pass failed on {what} ({type(e).__name__}: {first}); check that the "
                           "batches fit the model (feature size, dtype, length within its positions), or pass "
                           "forward_fn=") from e
