"""The training step shared by the demo and the benchmark: seeded batch order, one AdamW step."""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import torch
from torch import nn


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> List[List[int]]:
    """Example indices for every step: seeded epoch-wise shuffles, the same for every method.

    Args:
        n: the number of training examples.
        steps: how many batches.
        batch_size: examples per batch; a batch may span two epochs.
        seed: seeds the shuffles.

    Returns:
        `steps` lists of `batch_size` indices in [0, n).

    Raises:
        ValueError: n or batch_size is not positive.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"need at least one example and a positive batch size, got n={n}, batch_size={batch_size}")
    g = torch.Generator().manual_seed(seed)
    out, pool = [], []
    for _ in range(steps):
        while len(pool) < batch_size:
            pool += torch.randperm(n, generator=g).tolist()
        out.append(pool[:batch_size])
        pool = pool[batch_size:]
    return out


def train_mode(model: nn.Module, freeze_batchnorm: bool = False) -> None:
    """model.train(), keeping batch-norm layers in eval mode when `freeze_batchnorm` is set.

    Few-shot batches are too small for batch statistics, so a pre-trained CNN keeps its own.
    """
    model.train()
    if freeze_batchnorm:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def train_step(model: nn.Module, batch, loss_fn: Callable, optimizer: torch.optim.Optimizer,
               params: Optional[Iterable[torch.Tensor]] = None, clip: Optional[float] = 1.0, schedule=None) -> float:
    """One optimizer step: loss, backward, optional gradient clipping, step, optional schedule step.

    Args:
        model: the model, already in train mode.
        batch: passed to loss_fn.
        loss_fn: loss_fn(model, batch) -> scalar loss tensor.
        optimizer: the optimizer over `params`.
        params: the trainable parameters, for clipping; None clips nothing.
        clip: the max gradient norm; None disables clipping.
        schedule: a learning-rate scheduler stepped after the optimizer, or None.

    Returns:
        The loss before the step, as a float.
    """
    loss = loss_fn(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None and params is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    if schedule is not None:
        schedule.step()
    return float(loss.detach())
