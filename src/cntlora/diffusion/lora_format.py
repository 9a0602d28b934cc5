"""Save a CNTLoRA denoiser adapter in diffusers' LoRA format.

The folder holds pytorch_lora_weights.safetensors: tensors keyed "<prefix>.<module>.lora_A.weight"
/ "lora_B.weight" (prefix "unet" or "transformer") and, in the file's metadata under
"lora_adapter_metadata", the adapter's LoraConfig with every key prefixed the same way. That
metadata carries lora_alpha, rank_pattern and alpha_pattern; without it diffusers rebuilds the
config from the tensor shapes with alpha = rank, i.e. scale 1 instead of alpha/r.

`pipeline.load_lora_weights(folder)` and `denoiser.load_lora_adapter(folder, prefix=...,
use_safetensors=True)` read it without cntlora. A residual-base adapter is written as its
plain-LoRA equivalent on the original weights (cntlora.export_plain_lora): rank 2·r_l with
doubled alphas.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

from ..config import CNTLoRAError
from ..export import PEFT_WEIGHTS_FILE, export_plain_lora
from ..files import write_directory_atomically

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE


def default_prefix(denoiser) -> str:
    """The key prefix diffusers' pipelines load a denoiser's LoRA from: "unet" or "transformer"."""
    model = denoiser.get_base_model() if hasattr(denoiser, "get_base_model") else denoiser
    return "unet" if type(model).__name__.startswith("UNet") else "transformer"


def _plain_adapter(peft_model, adapter_name: str):
    """(LoRA tensors keyed by module, LoraConfig) of the adapter as plain LoRA on the original weights."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "plain")
        export_plain_lora(peft_model, folder, adapter_name)
        config = LoraConfig.from_pretrained(folder)
        tensors = load_file(os.path.join(folder, PEFT_WEIGHTS_FILE))
    state = {}
    for key, value in tensors.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            raise CNTLoRAError(
                f"the adapter holds {key!r}, which is not a LoRA factor (modules_to_save?); diffusers' LoRA files "
                "hold LoRA layers only: initialize without modules_to_save, or save with cntlora.save_adapter"
            )
        state[key.removeprefix("base_model.model.")] = value
    return state, config


def _metadata(config) -> dict:
    """The LoraConfig as diffusers stores it: its to_dict, JSON-able, trainable once loaded."""
    config.inference_mode = False  # a loaded initialization is there to be trained
    meta = config.to_dict()
    meta.pop("auto_mapping", None)  # PEFT's record of the base class, not a LoRA setting
    for key, value in meta.items():
        if isinstance(value, (set, frozenset)):
            meta[key] = sorted(value)
    return meta


def save_diffusers_lora(peft_model, out_dir: str, prefix: Optional[str] = None, adapter_name: str = "default") -> None:
    """Write the adapter of a CNTLoRA denoiser as a diffusers LoRA folder, with its adapter metadata.

    Args:
        peft_model: the PeftModel from initialize_denoiser (or cntlora.apply / load_adapter),
            before or after training.
        out_dir: the folder to write; replaced atomically, and only if it is empty or a folder
            holding pytorch_lora_weights.safetensors.
        prefix: the component name keys and metadata are prefixed with; None picks "unet" for
            UNets and "transformer" otherwise (what the pipelines' load_lora_weights expect).
        adapter_name: which adapter to write.

    Returns:
        None. Load with pipeline.load_lora_weights(out_dir), or
        denoiser.load_lora_adapter(out_dir, prefix=prefix, use_safetensors=True).

    Raises:
        CNTLoRAError: the model has no cntlora plan, holds modules_to_save or merged adapters,
            or out_dir is a file or a foreign non-empty folder.
    """
    from diffusers.loaders.lora_base import LoraBaseMixin

    prefix = prefix or default_prefix(peft_model.base_model.model)
    state, config = _plain_adapter(peft_model, adapter_name)
    metadata = _metadata(config)

    def write(folder: str) -> None:
        LoraBaseMixin.write_lora_layers(
            state_dict={f"{prefix}.{k}": v for k, v in state.items()},
            save_directory=folder,
            is_main_process=True,
            weight_name=LORA_WEIGHTS_FILE,
            save_function=None,
            safe_serialization=True,
            lora_adapter_metadata={f"{prefix}.{k}": v for k, v in metadata.items()},
        )

    write_directory_atomically(out_dir, write, marker=LORA_WEIGHTS_FILE, kind="a diffusers LoRA folder")
