"""Batches as the collection sees them: the default forward and mask, moves between devices."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def default_mask(batch) -> Optional[torch.Tensor]:
    """Positions to keep: attention_mask, minus labels == -100 where labels are per token."""
    if not isinstance(batch, dict) or batch.get("attention_mask") is None:
        return None
    mask = batch["attention_mask"].bool()
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != -100)
    return mask


def default_forward(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
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
        first = next(iter(first.values())) if isinstance(first, dict) else first[0]
    return int(first.shape[0] * (first.shape[1] if first.dim() > 1 else 1))


def _first_row(batch):
    """`batch` cut to its first example: every tensor whose first dimension is the batch's."""
    rows = None
    probe = batch
    while isinstance(probe, (dict, list, tuple)) and len(probe):
        probe = next(iter(probe.values())) if isinstance(probe, dict) else probe[0]
    if isinstance(probe, torch.Tensor) and probe.dim() > 0:
        rows = probe.shape[0]

    def cut(v):
        if isinstance(v, torch.Tensor):
            return v[:1] if rows is not None and v.dim() > 0 and v.shape[0] == rows else v
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(cut(x) for x in v)
        return v

    return cut(batch)
