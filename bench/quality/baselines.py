"""Every initialization the benchmarks (quality and cost) compare, behind one call each.

PEFT's own inits go through PEFT's public API only (LoraConfig.init_lora_weights, EVA's
initialize_lora_eva_weights, CorDA's preprocess_corda, LoRA-GA's preprocess_loraga), so the
comparison is against PEFT's real code. CNTLoRA goes through cntlora.initialize.

Both take the same `lora_kwargs` (r, lora_alpha, modules_to_save, ...) and the same
calibration batches, so every method gets the same trainable-parameter budget and data.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from cntlora.batches import default_forward, default_mask, to_device
from cntlora.config import CNTLoRAConfig, CNTLoRAError

PEFT_METHODS = ["default", "gaussian", "pissa_niter_4", "olora", "eva", "corda", "lora_ga"]
CNTLORA_METHODS = [f"cntlora-{mode}{vas}" for vas in ("", "-vas") for mode in ("self", "cross", "shift")]
METHODS = PEFT_METHODS + CNTLORA_METHODS

# PEFT's init_lora_weights value for the inits that need no data
_DATA_FREE = {"default": True, "gaussian": "gaussian", "pissa_niter_4": "pissa_niter_4", "olora": "olora"}


class ChannelLinear(nn.Module):
    """A 1×1 Conv2d as an nn.Linear over channels: same function, same parameters.

    PEFT's SVD-based inits (PiSSA, OLoRA, EVA, CorDA, LoRA-GA) reject Conv2d, so the vision
    benchmark swaps every targeted 1×1 conv for this wrapper for every method; the LoRA
    then lives on `.linear`, exactly as a LoRA on the conv would (a 1×1 conv is a matmul
    over channels at every position).
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1 or conv.padding not in ((0, 0), "valid"):
            raise CNTLoRAError(f"ChannelLinear takes a plain 1×1 conv (stride 1, groups 1, no padding), got {conv}")
        self.linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.reshape(conv.out_channels, conv.in_channels))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def forward(self, x):
        # (B, C, H, W) -> (B, H·W, C): positions become a token axis, the layout PEFT's
        # data-driven inits expect (CorDA squeezes a batch of one to a 2-D matrix)
        b, _, h, w = x.shape
        y = self.linear(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(b, -1, h, w)


def convs_to_linear(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Swap the named 1×1 convs for ChannelLinear in place; returns the new target names (`<name>.linear`)."""
    modules = dict(model.named_modules())
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, ChannelLinear(modules[name]))
    return [f"{n}.linear" for n in names]


def _lora_config(lora_kwargs: dict, **extra):
    from peft import LoraConfig

    kwargs = dict(lora_kwargs)
    kwargs.update(extra)
    return LoraConfig(**kwargs)


def _target_names(model, lora_kwargs) -> list:
    targets = lora_kwargs.get("target_modules")
    if not targets:
        raise CNTLoRAError("lora_kwargs needs target_modules, e.g. {'target_modules': ['query', 'value'], 'r': 8}")
    return targets if isinstance(targets, str) else list(targets)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def peft_init(
    method: str,
    model: nn.Module,
    lora_kwargs: dict,
    calibration_batches: list,
    forward_fn: Optional[Callable] = None,
    loss_fn: Optional[Callable] = None,
    corda_device=None,
):
    """Wrap `model` (in place) with PEFT's LoRA initialized by `method`; returns a peft.PeftModel.

    method: one of PEFT_METHODS. lora_kwargs: peft.LoraConfig arguments shared by every method
    (target_modules, r, lora_alpha, modules_to_save, ...). calibration_batches: what the
    data-driven inits see (EVA, CorDA, LoRA-GA). forward_fn(model, batch) runs one batch
    (default: model(**batch) for dicts, model(batch[0]) for tuples); loss_fn(model, batch)
    returns a scalar loss, which LoRA-GA needs for its gradient estimate. corda_device: where
    CorDA's calibration runs (default: the model's device); the PeftModel returns to the
    model's device. CorDA's hook synchronizes the device several times per example and layer,
    which on a GPU shared by many worker processes costs far more than the CPU's arithmetic
    for a small model.
    """
    from peft import get_peft_model

    forward_fn = forward_fn or default_forward
    device = _device(model)
    # where the calibration runs: the model's device, or corda_device for CorDA
    calibration_device = torch.device(corda_device) if method == "corda" and corda_device is not None else device
    batches = [to_device(b, calibration_device) for b in calibration_batches]
    if method in _DATA_FREE:
        return get_peft_model(model, _lora_config(lora_kwargs, init_lora_weights=_DATA_FREE[method]))
    if not batches and method in ("eva", "corda", "lora_ga"):
        raise CNTLoRAError(f"{method} is data-driven; pass at least one calibration batch")
    if method == "eva":
        return _eva(model, lora_kwargs, batches, forward_fn)
    if method == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        cfg = _lora_config(lora_kwargs, init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))
        model.to(calibration_device)

        @torch.no_grad()
        def run_model():
            # CorDA's hook squeezes the batch axis away, so it takes one example per forward
            was_training = model.training
            model.eval()
            for b in batches:
                for example in _single_examples(b):
                    forward_fn(model, example)
            model.train(was_training)

        preprocess_corda(model, cfg, run_model=run_model)
        return get_peft_model(model, cfg).to(device)
    if method == "lora_ga":
        from peft.tuners.lora.config import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        if loss_fn is None:
            raise CNTLoRAError("lora_ga estimates gradients; pass loss_fn(model, batch) -> scalar loss")
        cfg = _lora_config(lora_kwargs, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

        def train_step():
            for b in batches:
                loss_fn(model, b).backward()

        preprocess_loraga(model, cfg, train_step)
        return get_peft_model(model, cfg)
    raise CNTLoRAError(f"unknown PEFT init {method!r}; use one of {', '.join(PEFT_METHODS)}")


def _single_examples(batch):
    """Split a batch into batches of one, with right padding cut off (by attention_mask)."""
    if isinstance(batch, torch.Tensor):
        return [batch[i : i + 1] for i in range(batch.shape[0])]
    if isinstance(batch, (tuple, list)):
        return [type(batch)(t[i : i + 1] for t in batch) for i in range(batch[0].shape[0])]
    mask = batch.get("attention_mask")
    rows = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    out = []
    for i in range(rows):
        length = int(mask[i].sum()) if mask is not None else None
        example = {}
        for k, v in batch.items():
            v = v[i : i + 1] if isinstance(v, torch.Tensor) else v
            if length is not None and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == mask.shape[1]:
                v = v[:, :length]
            example[k] = v
        out.append(example)
    return out


def _eva(model, lora_kwargs, batches, forward_fn):
    from peft import get_peft_model
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    # EVA's own input filter expects token batches with per-token labels; for anything else
    # (class labels, images) we give it the same positions CNTLoRA uses: default_mask's.
    cfg = _lora_config(lora_kwargs, init_lora_weights="eva", eva_config=EvaConfig(use_label_mask=False))
    peft_model = get_peft_model(model, cfg, low_cpu_mem_usage=True)

    def prepare_model_inputs(batch, peft_config):
        return default_mask(batch)

    def prepare_layer_inputs(layer_input, mask, layer_name):
        x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
        if mask is not None and x.dim() == mask.dim() + 1 and x.shape[:-1] == mask.shape:
            return x[mask]
        # EVA hashes these with .view(-1), which needs a contiguous tensor
        return x.reshape(-1, x.shape[-1]).contiguous()

    # EVA runs until its incremental SVD converges, cycling over the batches it is given
    initialize_lora_eva_weights(
        peft_model,
        dataloader=batches,
        forward_fn=lambda m, b: forward_fn(m, b),
        prepare_model_inputs_fn=prepare_model_inputs,
        prepare_layer_inputs_fn=prepare_layer_inputs,
        show_progress_bar=False,
    )
    return peft_model


def parse_cntlora_method(method: str) -> dict:
    """'cntlora-cross-vas' -> {'mode': 'cross', 'vas': True}."""
    parts = method.split("-")
    if len(parts) not in (2, 3) or parts[0] != "cntlora" or (len(parts) == 3 and parts[2] != "vas"):
        raise CNTLoRAError(f"bad CNTLoRA method {method!r}; use cntlora-<self|cross|shift>[-vas]")
    return {"mode": parts[1], "vas": len(parts) == 3}


def cntlora_init(
    method: str,
    model: nn.Module,
    lora_kwargs: dict,
    calibration_batches: list,
    forward_fn: Optional[Callable] = None,
    loss_fn: Optional[Callable] = None,
    overrides: Optional[dict] = None,
    seed: int = 0,
    reference_batches: Optional[list] = None,
):
    """Wrap `model` (in place) with CNTLoRA's init; `overrides` are CNTLoRAConfig fields (ridge, gamma, base...).

    r, alpha and use_rslora come from lora_kwargs so the budget matches the PEFT methods;
    loss_fn is accepted (and unused) so every init has the same call. reference_batches: the
    pre-training-like set behind pretrain_source="reference".
    """
    from cntlora.apply import initialize

    kwargs = dict(lora_kwargs)
    targets = _target_names(model, kwargs)
    cfg_fields = parse_cntlora_method(method)
    cfg_fields.update(r=kwargs.pop("r", 8), alpha=float(kwargs.pop("lora_alpha", 8)), use_rslora=kwargs.pop("use_rslora", False))
    cfg_fields["seed"] = seed
    cfg_fields.update(overrides or {})
    config = CNTLoRAConfig.from_dict(cfg_fields)
    lora_config = _lora_config(kwargs)
    device = _device(model)
    batches = [to_device(b, device) for b in calibration_batches]
    reference = None if reference_batches is None else [to_device(b, device) for b in reference_batches]
    return initialize(model, batches, config, target_modules=targets, lora_config=lora_config,
                      reference_dataloader=reference, forward_fn=forward_fn, progress=False)


def init_method(method, model, lora_kwargs, calibration_batches, forward_fn=None, loss_fn=None, overrides=None, seed=0,
                reference_batches=None, corda_device=None):
    """Dispatch to peft_init or cntlora_init by name (see METHODS); corda_device as in peft_init."""
    if method.startswith("cntlora-"):
        return cntlora_init(method, model, lora_kwargs, calibration_batches, forward_fn, loss_fn, overrides, seed,
                            reference_batches)
    if overrides:
        raise CNTLoRAError(f"overrides are CNTLoRA settings; {method!r} takes none")
    return peft_init(method, model, copy.deepcopy(lora_kwargs), calibration_batches, forward_fn, loss_fn, corda_device)
