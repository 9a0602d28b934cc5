"""Integrity of saved adapters: checksums of cntlora's files and the digest of the base they fit."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from typing import Dict

import torch
from torch import nn

from .config import CNTLoRAError
from .layers import LayerSpec
from .statistics import weight_digest


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def meta_checksum(meta: dict) -> str:
    """sha256 of cntlora.json's content without its own checksum (key order does not matter)."""
    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode()).hexdigest()


def check_base(base_model: nn.Module, meta: dict, residual: Dict[str, torch.Tensor]) -> None:
    """A residual adapter fits only the checkpoint it was made from: compare the base's W0 digests."""
    modules = dict(base_model.named_modules())
    for name, want in (meta.get("base_digest") or {}).items():
        spec = LayerSpec.from_dict(meta["layers"][name]["spec"])
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor) or name not in residual or weight.shape != residual[name].shape:
            continue  # _apply_residual_base names the missing layer or the other shape
        got = weight_digest({name: modules[name]}, {name: spec})[name]
        try:
            close = all(math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
                        for a, b in zip(got.split("/"), str(want).split("/", 1)))
        except ValueError:
            raise CNTLoRAError(f"the adapter's metadata holds a damaged base digest of {name!r}; save it again") from None
        if not close:
            raise CNTLoRAError(f"the weights of {name!r} differ from the checkpoint this residual adapter was made "
                               "from; pass that checkpoint (a residual adapter replaces the base weights)")


def check_weights_file(path: str, meta: dict, checksum: str) -> None:
    """The LoRA weights of every adapted layer are there and finite; a changed file is reported."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        for name, rank in meta.get("ranks", {}).items():
            for part in ("lora_A", "lora_B"):
                key = next((k for k in keys if k.endswith(f"{name}.{part}.weight")), None) if rank else ""
                if key is None:
                    raise CNTLoRAError(f"{path} lacks the {part} weight of layer {name!r}; the folder is damaged")
                if key and not bool(torch.isfinite(f.get_tensor(key)).all()):
                    raise CNTLoRAError(f"{path} holds NaN or Inf in {key}; the folder is damaged")
    if file_sha256(path) != checksum:
        warnings.warn(f"{path} changed since cntlora saved it (trained further and saved with PEFT?); loading it as it is",
                      stacklevel=4)
