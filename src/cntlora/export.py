"""Save and reload CNTLoRA adapters as PEFT folders, and export them as plain LoRA.

An adapter folder is what peft_model.save_pretrained writes, plus
    cntlora.json               the CNTLoRA config, base mode, scale and per-layer ranks / spectra
    init_factors.safetensors   B0 and A0 of every adapted layer, keyed "<module>.B" / "<module>.A"
    residual_base.safetensors  (base="residual" only) the changed base weights W0 - s·B0·A0, keyed
                               by module name, in the layer's own weight layout
export_plain_lora writes a standard PEFT LoRA folder that needs neither cntlora nor the
residual base: in residual mode W0 + s·(B·A - B0·A0) = W0 + s·[B, -B0]·[A; A0].
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Dict

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed as dist
from .config import CNTLoRAConfig, CNTLoRAError
from .files import JOURNAL, recover_directory, write_directory_atomically
from .layers import LayerSpec, base_layer
from .integrity import check_base, check_weights_file, file_sha256, meta_checksum
from .plan import LayerPlan, Plan

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
CNTLORA_FILE = "cntlora.json"
INIT_FACTORS_FILE = "init_factors.safetensors"
RESIDUAL_BASE_FILE = "residual_base.safetensors"
FORMAT_VERSION = 1
# every file save_adapter writes (PEFT's README.md model card is not replaced when one exists)
SAVED_FILES = (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, CNTLORA_FILE, INIT_FACTORS_FILE, RESIDUAL_BASE_FILE)


def _plan_of(peft_model) -> Plan:
    plan = getattr(peft_model, "cntlora_plan", None)
    if plan is None:
        raise CNTLoRAError(
            "this model has no cntlora plan (init factors); use the model returned by cntlora.initialize / "
            "cntlora.apply, or reload the folder with cntlora.load_adapter instead of PeftModel.from_pretrained"
        )
    return plan


def _lora_layers(peft_model, plan: Plan, adapter_name: str) -> Dict[str, nn.Module]:
    """The PEFT LoRA layer of every adapted layer in the plan, checked against the plan."""
    if adapter_name not in peft_model.peft_config:
        raise CNTLoRAError(f"no adapter {adapter_name!r}; this model has {sorted(peft_model.peft_config)}")
    modules = dict(peft_model.base_model.model.named_modules())
    layers = {}
    for name in plan.adapted:
        layer = modules.get(name)
        if layer is None or adapter_name not in getattr(layer, "lora_A", {}):
            raise CNTLoRAError(f"layer {name!r} of the plan has no LoRA adapter {adapter_name!r} in this model")
        if layer.merged_adapters:
            raise CNTLoRAError(f"layer {name!r} has merged adapters; call peft_model.unmerge_adapter() first")
        if layer.r[adapter_name] != plan.layers[name].rank:
            raise CNTLoRAError(
                f"layer {name!r} has rank {layer.r[adapter_name]} in the model but {plan.layers[name].rank} in the "
                "plan; the plan belongs to another adapter"
            )
        layers[name] = layer
    return layers


def _config_dict(config: CNTLoRAConfig) -> dict:
    d = config.to_dict()
    if config.constraints is not None:  # a reloaded config holds the descriptions already
        d["constraints"] = [c if isinstance(c, str) else repr(c) for c in config.constraints]
    return d


def _metadata(plan: Plan) -> dict:
    return {
        "format": FORMAT_VERSION,
        "config": _config_dict(plan.config),
        "base": plan.config.base,
        "scale": plan.scale,
        "pretrain_source": plan.pretrain_source,
        "budget": plan.budget,
        "params": plan.params,
        "ranks": {n: lp.rank for n, lp in plan.layers.items()},
        "base_digest": plan.base_digest,
        "layers": {
            n: {
                "spec": lp.spec.to_dict(),
                "rank": lp.rank,
                "singular_values": [float(v) for v in lp.singular_values],
                "delta_energy": lp.delta_energy,
                "w0_norm": lp.w0_norm,
                "cap": lp.cap,
                "input_shift": lp.input_shift,
            }
            for n, lp in plan.layers.items()
        },
    }


def _plan_from_folder(meta: dict, factors: Dict[str, torch.Tensor]) -> Plan:
    if meta.get("format") != FORMAT_VERSION:
        raise CNTLoRAError(f"{CNTLORA_FILE} has format {meta.get('format')!r}; this cntlora reads {FORMAT_VERSION}")
    config = CNTLoRAConfig.from_dict(meta["config"])
    layers = {}
    for name, d in meta["layers"].items():
        spec = LayerSpec.from_dict(d["spec"])
        rank = d["rank"]
        if rank > 0 and (f"{name}.B" not in factors or f"{name}.A" not in factors):
            raise CNTLoRAError(
                f"{INIT_FACTORS_FILE} lacks layer {name!r}; the adapter folder is incomplete, save it again"
            )
        b = factors[f"{name}.B"] if rank > 0 else torch.zeros(spec.out_features, 0)
        a = factors[f"{name}.A"] if rank > 0 else torch.zeros(0, spec.in_features)
        singular_values = torch.tensor(d["singular_values"], dtype=torch.float64)
        layers[name] = LayerPlan(name, spec, rank, b, a, singular_values, d["delta_energy"], d["w0_norm"], d["cap"],
                                 d.get("input_shift"))
    return Plan(config, layers, meta["pretrain_source"], meta["budget"], {}, base_digest=dict(meta.get("base_digest") or {}))


def _hoist_named_adapter(folder: str, adapter_name: str) -> None:
    """PEFT saves a non-default adapter into a subfolder; an adapter folder holds one adapter at its top."""
    if adapter_name == "default":
        return
    sub = os.path.join(folder, adapter_name)
    for entry in os.listdir(sub):
        os.replace(os.path.join(sub, entry), os.path.join(folder, entry))
    os.rmdir(sub)


def save_adapter(peft_model, out_dir: str, adapter_name: str = "default", overwrite: bool = False) -> None:
    """Save a CNTLoRA PeftModel so that `load_adapter` reproduces it exactly.

    The folder is a PEFT adapter folder plus cntlora.json, init_factors.safetensors and, in
    residual mode, residual_base.safetensors (only the changed base weights). The folder is
    written next to `out_dir` and swapped in when complete. Under torch.distributed only rank 0
    writes; call it on every rank (needed when the weights are FSDP2-sharded: the residual base
    is gathered) or on rank 0 alone, and put a barrier after it before other ranks read the folder.

    Args:
        peft_model: a PeftModel made by cntlora.apply / cntlora.initialize (or load_adapter).
        out_dir: the folder; an existing one is replaced only if it is an adapter folder.
        adapter_name: the PEFT adapter to save.
        overwrite: update an existing adapter folder: cntlora's files are replaced, others stay.

    Returns:
        None.

    Raises:
        CNTLoRAError: the model carries no cntlora plan, the adapter does not match it, out_dir
            is a file or a folder that is not an adapter folder, or it exists and overwrite is False.
    """
    peft_model = dist.unwrap(peft_model)
    plan = _plan_of(peft_model)
    layers = _lora_layers(peft_model, plan, adapter_name)
    # The frozen weights as they are now: W0 - s·B0·A0, laid out like the layer's weight (FSDP2:
    # gathered one layer at a time, a collective every rank takes part in).
    residual = {name: dist.full_weight(base_layer(layer).weight).detach().to("cpu", copy=True)
                for name, layer in layers.items()} if plan.config.base == "residual" and (
        dist.is_main() or any(dist.is_sharded(base_layer(m).weight) for m in layers.values())) else None
    if not dist.is_main():  # under torch.distributed only rank 0 writes
        return

    def write(folder: str) -> None:
        peft_model.save_pretrained(folder, selected_adapters=[adapter_name])
        _hoist_named_adapter(folder, adapter_name)
        factors = {}
        for name in plan.adapted:
            factors[f"{name}.B"] = plan.layers[name].B.detach().cpu().contiguous()
            factors[f"{name}.A"] = plan.layers[name].A.detach().cpu().contiguous()
        save_file(factors, os.path.join(folder, INIT_FACTORS_FILE), metadata={"format": "pt"})
        if residual is not None:
            save_file(residual, os.path.join(folder, RESIDUAL_BASE_FILE), metadata={"format": "pt"})
        meta = _metadata(plan)
        meta["checksums"] = {f: file_sha256(os.path.join(folder, f))
                             for f in (INIT_FACTORS_FILE, RESIDUAL_BASE_FILE, PEFT_WEIGHTS_FILE)
                             if os.path.isfile(os.path.join(folder, f))}
        meta["checksum"] = meta_checksum(meta)
        with open(os.path.join(folder, CNTLORA_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    write_directory_atomically(out_dir, write, marker=PEFT_CONFIG_FILE, kind="an adapter folder", owned=SAVED_FILES,
                               overwrite=overwrite)


def _apply_residual_base(base_model: nn.Module, weights: Dict[str, torch.Tensor]) -> None:
    """Overwrite the targeted base weights with the saved W0 - s·B0·A0, after checking all of them."""
    modules = dict(base_model.named_modules())
    for name, w in weights.items():
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise CNTLoRAError(
                f"{RESIDUAL_BASE_FILE} names layer {name!r}, which {type(base_model).__name__} does not have; "
                "pass the base model the adapter was made from"
            )
        if tuple(module.weight.shape) != tuple(w.shape):
            raise CNTLoRAError(
                f"{RESIDUAL_BASE_FILE} holds {name!r} with shape {tuple(w.shape)} but the model's is "
                f"{tuple(module.weight.shape)}; pass the base model the adapter was made from"
            )
    with torch.no_grad():
        for name, w in weights.items():
            modules[name].weight.copy_(w)


def load_adapter(base_model: nn.Module, adapter_dir: str, is_trainable: bool = False):
    """Reload a folder written by `save_adapter` onto a fresh copy of the ORIGINAL base model.

    In residual mode the saved residual weights replace the targeted base weights first. The
    returned PeftModel carries `cntlora_plan` again, so `save_adapter` and `export_plain_lora` work.
    Folders saved with the flat config of earlier versions load too.

    Args:
        base_model: a fresh copy of the base model the adapter was made from (changed in place
            in residual mode).
        adapter_dir: a folder written by save_adapter.
        is_trainable: load the adapter for training.

    Returns:
        The peft.PeftModel.

    Raises:
        CNTLoRAError: not an adapter folder, a base model that already has LoRA layers or
            lacks the saved layers, an incomplete folder, or an unknown format version.
    """
    from peft import PeftModel

    if os.path.isfile(os.path.join(adapter_dir, JOURNAL)):
        recover_directory(adapter_dir)  # a save into this folder was interrupted: finish it first
    if not os.path.isfile(os.path.join(adapter_dir, PEFT_CONFIG_FILE)):
        raise CNTLoRAError(f"{adapter_dir} has no {PEFT_CONFIG_FILE}; pass a folder written by cntlora.save_adapter")
    if isinstance(base_model, PeftModel) or any(hasattr(m, "lora_A") for m in base_model.modules()):
        raise CNTLoRAError("the base model already has LoRA layers; pass a fresh copy of the original base model")
    meta, factors, residual = _read_folder(str(adapter_dir))
    if residual is not None:
        check_base(base_model, meta or {}, residual)
        _apply_residual_base(base_model, residual)
    try:
        peft_model = PeftModel.from_pretrained(base_model, adapter_dir, is_trainable=is_trainable)
    except Exception as e:  # a damaged adapter_model / adapter_config: PEFT's and safetensors' errors
        raise CNTLoRAError(f"PEFT could not load {adapter_dir} ({type(e).__name__}: {str(e)[:200]}); "
                           "the folder is damaged or belongs to another model") from e
    if meta is not None:
        plan = peft_model.cntlora_plan = _plan_from_folder(meta, factors)
        for name, layer in _lora_layers(peft_model, plan, "default").items():  # adapter_config.json agrees
            if not math.isclose(layer.scaling["default"], plan.scale, rel_tol=1e-6):
                raise CNTLoRAError(f"{PEFT_CONFIG_FILE} gives {name!r} the scale {layer.scaling['default']:g}, but the "
                                   f"adapter was made with {plan.scale:g}; the folder is damaged or was edited")
    return peft_model


def _read_folder(adapter_dir: str):
    """(cntlora.json's content or None, init factors, residual base or None), checked before any weight changes."""
    meta, factors, residual = None, {}, None
    meta_path = os.path.join(adapter_dir, CNTLORA_FILE)
    try:
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or not isinstance(meta.get("layers"), dict):
                raise ValueError("not a cntlora.json object")
            if "checksum" in meta and meta["checksum"] != meta_checksum(meta):
                raise CNTLoRAError(f"{meta_path} does not match its checksum (damaged or edited); save the adapter again")
        for name, checksum in ((meta or {}).get("checksums") or {}).items():
            path = os.path.join(adapter_dir, name)
            if name == PEFT_WEIGHTS_FILE:  # PEFT may save trained weights over it: check what it holds instead
                check_weights_file(path, meta, checksum)
            elif not os.path.isfile(path) or file_sha256(path) != checksum:
                raise CNTLoRAError(f"{path} is missing or does not match its checksum in {CNTLORA_FILE}; "
                                   "the folder is damaged: save it again")
        factors_path = os.path.join(adapter_dir, INIT_FACTORS_FILE)
        if meta is not None and os.path.isfile(factors_path):
            factors = load_file(factors_path)
        residual_path = os.path.join(adapter_dir, RESIDUAL_BASE_FILE)
        if os.path.isfile(residual_path):
            residual = load_file(residual_path)
        elif meta is not None and meta.get("base") == "residual":
            raise CNTLoRAError(f"{adapter_dir} is a residual-mode adapter without {RESIDUAL_BASE_FILE}; save it again")
        if meta is not None:
            _plan_from_folder(meta, factors)  # every field readable before the model is touched
    except CNTLoRAError:
        raise
    except Exception as e:  # JSON, safetensors and field errors of a damaged folder
        raise CNTLoRAError(f"{adapter_dir} is damaged ({type(e).__name__}: {str(e)[:200]}); save the adapter again") from e
    return meta, factors, residual


def _doubled_config(lora_config, use_rslora: bool):
    """The LoraConfig for rank 2·r_l everywhere with the scale s unchanged."""
    cfg = copy.deepcopy(lora_config)
    # s = alpha/r (or alpha/sqrt(r)): doubling r needs alpha·2 (or alpha·sqrt 2).
    factor = math.sqrt(2.0) if use_rslora else 2.0
    cfg.r = 2 * cfg.r
    cfg.lora_alpha = factor * cfg.lora_alpha
    cfg.rank_pattern = {k: 2 * v for k, v in (cfg.rank_pattern or {}).items()}
    cfg.alpha_pattern = {k: factor * v for k, v in (cfg.alpha_pattern or {}).items()}
    return cfg


def export_plain_lora(peft_model, out_dir: str, adapter_name: str = "default", overwrite: bool = False) -> None:
    """Write a standard PEFT LoRA folder that works on the ORIGINAL, unmodified base model.

    keep / subspace: the adapter as it is. residual: rank 2·r_l per layer with A' = [A; A0],
    B' = [B, -B0] and doubled alphas, so s is unchanged. modules_to_save come along.
    Load it with plain peft.PeftModel.from_pretrained(original_base, out_dir). Under
    torch.distributed only rank 0 writes (call it on any ranks; it holds no collective).

    Args:
        peft_model: a PeftModel made by cntlora (trained or not).
        out_dir: the folder; an existing one is replaced only if it is an adapter folder.
        adapter_name: the PEFT adapter to export.
        overwrite: update an existing plain adapter folder: its adapter files are replaced, others stay.

    Returns:
        None.

    Raises:
        CNTLoRAError: the model carries no cntlora plan, residual mode with lora_bias, out_dir
            is a file, a folder that is not an adapter folder, a cntlora adapter folder (its
            cntlora.json would no longer match), or it exists and overwrite is False.
    """
    if os.path.isfile(os.path.join(out_dir, CNTLORA_FILE)):
        raise CNTLoRAError(f"{out_dir} holds a cntlora adapter ({CNTLORA_FILE}); exporting over it would leave its "
                           "init factors out of step with the weights: export into another folder")
    from peft import get_peft_model_state_dict

    peft_model = dist.unwrap(peft_model)
    plan = _plan_of(peft_model)
    layers = _lora_layers(peft_model, plan, adapter_name)
    if not dist.is_main():  # under torch.distributed only rank 0 writes (LoRA factors are never sharded)
        return
    lora_config = copy.deepcopy(peft_model.peft_config[adapter_name])
    state = peft_model.state_dict()
    if plan.config.base == "residual":
        if getattr(lora_config, "lora_bias", False):
            raise CNTLoRAError("residual-mode export does not support lora_bias=True; train without it")
        key_of = {id(p): k for k, p in peft_model.named_parameters(remove_duplicate=False)}
        for name, layer in layers.items():
            lp = plan.layers[name]
            a = layer.lora_A[adapter_name].weight.detach()
            b = layer.lora_B[adapter_name].weight.detach()
            # conv2d: lora_A is (r, C_in, kh, kw) and lora_B (m, r, 1, 1); the rank dim is 0 and 1.
            a0 = lp.A.reshape((lp.rank,) + tuple(a.shape[1:])).to(a)
            b0 = lp.B.reshape((b.shape[0], lp.rank) + tuple(b.shape[2:])).to(b)
            state[key_of[id(layer.lora_A[adapter_name].weight)]] = torch.cat([a, a0], dim=0)
            state[key_of[id(layer.lora_B[adapter_name].weight)]] = torch.cat([b, -b0], dim=1)
        lora_config = _doubled_config(lora_config, lora_config.use_rslora)
    # PEFT picks this adapter's entries (LoRA and modules_to_save) and names them as it saves them.
    tensors = get_peft_model_state_dict(peft_model, state_dict=state, adapter_name=adapter_name)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    lora_config.inference_mode = True
    if lora_config.base_model_name_or_path is None:
        lora_config.base_model_name_or_path = peft_model.base_model.model.__dict__.get("name_or_path") or None
    auto_mapping = None
    if lora_config.task_type is None:  # as PeftModel.save_pretrained records it, for AutoPeftModel
        base_class = type(peft_model.base_model.model)
        auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}

    def write(folder: str) -> None:
        lora_config.save_pretrained(folder, auto_mapping_dict=auto_mapping)
        save_file(tensors, os.path.join(folder, PEFT_WEIGHTS_FILE), metadata={"format": "pt"})

    write_directory_atomically(out_dir, write, marker=PEFT_CONFIG_FILE, kind="an adapter folder",
                               owned=(PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE), overwrite=overwrite)
