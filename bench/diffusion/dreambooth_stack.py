"""Many LoRA fine-tuning runs of one frozen denoiser in a single forward pass.

A run is one adapter: per target layer B, A, a scale, and an optional offset to the frozen
weight (PiSSA, OLoRA, CorDA and LoRA-GA move W0 when they initialize). `install` swaps every
target layer of the denoiser for a `StackedLoRA` that holds K runs' adapters. The batch is
laid out run-major (K equal slices, one per run) and every slice goes through its own run's
adapter, exactly as PEFT's LoRA layer would compute it: base(x) + scale·B(A(x)). Nothing in
the denoiser mixes examples of a batch (group norm, attention within an example), so K runs
in one pass are K independent runs, at the launch cost of one.

Ranks may differ between runs and layers (VAS, EVA): A and B are zero-padded to the largest
rank, and zero padding stays zero under training (its gradients are zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LayerAdapter:
    """One run's LoRA on one layer, in PEFT's layout: A (r, n) or (r, c_in, kh, kw); B (m, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    delta: Optional[torch.Tensor] = None  # the change the init made to W0 (W0's shape), if any

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class Adapter:
    """One run's initial adapter on every target layer (CPU tensors), plus how it was made."""

    layers: Dict[str, LayerAdapter]
    init_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def trainable_params(self) -> int:
        return sum(a.A.numel() + a.B.numel() for a in self.layers.values())


def extract_adapter(peft_model, base_weights: Dict[str, torch.Tensor], adapter_name: str = "default") -> Adapter:
    """Read B, A, scale and W0's change off a PEFT-wrapped denoiser (moved to the CPU).

    base_weights: {layer name: W0 before the init}; a layer whose W0 the init left alone gets
    no offset.
    """
    model = peft_model.base_model.model
    layers = {}
    for name, w0 in base_weights.items():
        module = model.get_submodule(name)
        if not hasattr(module, "lora_A") or adapter_name not in module.lora_A:  # rank 0 (VAS): no adapter here
            w = module.weight.detach()
            layers[name] = LayerAdapter(torch.zeros((0,) + tuple(w.shape[1:])), torch.zeros(w.shape[0], 0), 0.0)
            continue
        a = module.lora_A[adapter_name].weight.detach().float().cpu()
        b = module.lora_B[adapter_name].weight.detach().float().cpu()
        b = b.reshape(b.shape[0], b.shape[1])  # conv B is (m, r, 1, 1)
        w = module.get_base_layer().weight.detach().float().cpu()
        delta = w - w0.float().cpu()
        layers[name] = LayerAdapter(a.clone(), b.clone(), float(module.scaling[adapter_name]),
                                    delta if bool(delta.abs().max() > 0) else None)
    return Adapter(layers)


class StackedLoRA(nn.Module):
    """K runs' LoRA adapters on one frozen nn.Linear or nn.Conv2d; slice k of the batch is run k's."""

    def __init__(self, base: nn.Module, adapters: Sequence[LayerAdapter]):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"StackedLoRA wraps nn.Linear or nn.Conv2d, got {type(base).__name__}")
        if isinstance(base, nn.Conv2d) and (base.groups != 1 or tuple(base.dilation) != (1, 1)):
            raise ValueError("StackedLoRA takes plain convolutions (groups 1, dilation 1)")
        self.base = base
        self.k = len(adapters)
        rank = max(a.rank for a in adapters)
        weight = base.weight
        dev, dt = weight.device, weight.dtype
        a_shape = (rank,) + tuple(adapters[0].A.shape[1:])
        self.A = nn.Parameter(torch.zeros((self.k,) + a_shape, device=dev, dtype=dt))
        self.B = nn.Parameter(torch.zeros(self.k, weight.shape[0], rank, device=dev, dtype=dt))
        with torch.no_grad():
            for i, a in enumerate(adapters):
                self.A[i, : a.rank].copy_(a.A)
                self.B[i, :, : a.rank].copy_(a.B)
        self.register_buffer("scale", torch.tensor([a.scale for a in adapters], device=dev, dtype=dt))
        if any(a.delta is not None for a in adapters):
            delta = torch.zeros((self.k,) + tuple(weight.shape), device=dev, dtype=dt)
            for i, a in enumerate(adapters):
                if a.delta is not None:
                    delta[i].copy_(a.delta)
            self.register_buffer("delta", delta)
        else:
            self.delta = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.A.shape[1] == 0 and self.delta is None:  # no run adapts this layer
            return y
        scaled_b = self.B * self.scale.view(-1, 1, 1)
        if isinstance(self.base, nn.Linear):
            xs = x.reshape(self.k, -1, x.shape[-1])
            d = torch.bmm(torch.bmm(xs, self.A.transpose(1, 2)), scaled_b.transpose(1, 2))
            if self.delta is not None:
                d = d + torch.bmm(xs, self.delta.transpose(1, 2))
            return y + d.reshape(y.shape)
        # convolutions: the K runs become K groups of channels
        conv = self.base
        b, c, h, w = x.shape
        xg = x.reshape(self.k, b // self.k, c, h, w).transpose(0, 1).reshape(b // self.k, self.k * c, h, w)
        rank = self.A.shape[1]
        hid = F.conv2d(xg, self.A.reshape((self.k * rank,) + tuple(self.A.shape[2:])), None, conv.stride,
                       conv.padding, groups=self.k)
        d = F.conv2d(hid, scaled_b.reshape(self.k * scaled_b.shape[1], rank, 1, 1), groups=self.k)
        if self.delta is not None:
            d = d + F.conv2d(xg, self.delta.reshape((-1,) + tuple(self.delta.shape[2:])), None, conv.stride,
                             conv.padding, groups=self.k)
        m, ho, wo = d.shape[1] // self.k, d.shape[2], d.shape[3]
        return y + d.reshape(b // self.k, self.k, m, ho, wo).transpose(0, 1).reshape(b, m, ho, wo)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def install(denoiser: nn.Module, adapters: Sequence[Adapter]) -> List[StackedLoRA]:
    """Swap each target layer for a StackedLoRA holding every run's adapter (in place).

    Every adapter must cover the same layers. Returns the stacks, in layer order; `remove`
    undoes the swap.
    """
    names = list(adapters[0].layers)
    if any(list(a.layers) != names for a in adapters):
        raise ValueError("every run of a stack must adapt the same layers, in the same order")
    stacks = []
    for name in names:
        stack = StackedLoRA(denoiser.get_submodule(name), [a.layers[name] for a in adapters])
        stack.layer_name = name
        _set_module(denoiser, name, stack)
        stacks.append(stack)
    return stacks


def remove(denoiser: nn.Module, stacks: Sequence[StackedLoRA]) -> None:
    """Put the frozen layers back in place of their stacks."""
    for stack in stacks:
        _set_module(denoiser, stack.layer_name, stack.base)


def run_adapter(stacks: Sequence[StackedLoRA], k: int) -> Dict[str, LayerAdapter]:
    """Run k's current B, A (padded), scale and offset, on the CPU."""
    return {s.layer_name: LayerAdapter(s.A[k].detach().cpu().clone(), s.B[k].detach().cpu().clone(),
                                       float(s.scale[k]), None if s.delta is None else s.delta[k].detach().cpu().clone())
            for s in stacks}


class StackedAdamW:
    """AdamW over stacked parameters (run first), with one learning rate per run.

    Each run's update is exactly torch.optim.AdamW's for that run's slice (same betas, eps,
    decoupled weight decay); multi-tensor kernels keep the launch count independent of K.
    """

    def __init__(self, params: Sequence[torch.Tensor], lrs: Sequence[float], betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        self.params = list(params)
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = 0
        lr = torch.tensor(list(lrs), dtype=self.params[0].dtype, device=self.params[0].device)
        full = lambda p, v: v.view((-1,) + (1,) * (p.dim() - 1)).expand_as(p).contiguous()
        self.lr = [full(p, lr) for p in self.params]
        self.decay = [full(p, 1 - lr * weight_decay) for p in self.params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        torch._foreach_mul_(self.params, self.decay)
        torch._foreach_lerp_(self.m, grads, 1 - self.b1)
        torch._foreach_mul_(self.v, self.b2)
        torch._foreach_addcmul_(self.v, grads, grads, 1 - self.b2)
        bc1, bc2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, bc2**0.5)
        torch._foreach_add_(denom, self.eps)
        update = torch._foreach_div(self.m, denom)
        torch._foreach_mul_(update, self.lr)
        torch._foreach_add_(self.params, update, alpha=-1 / bc1)
