"""The layer types CNTLoRA attaches to, seen as y = W x with W of shape m × n.

nn.Linear, transformers' Conv1D (weight stored n × m) and nn.Conv2d (inputs unfolded to
patches, n = C_in·k_h·k_w). This is the one place that knows how each type stores W0 and
how its inputs become rows x.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import CNTLoRAError
from .distributed import full_weight, local_weight

try:  # transformers is a dependency, but keep the core importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

SUPPORTED = "nn.Linear, nn.Conv2d (groups=1, dilation=1) and transformers' Conv1D"


@dataclass(frozen=True)
class LayerSpec:
    """How one target layer maps onto the m × n matrix view."""

    kind: str  # "linear" | "conv1d" | "conv2d"
    out_features: int  # m
    in_features: int  # n
    weight_shape: tuple
    kernel: tuple = (1, 1)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)

    @property
    def featurizer(self) -> tuple:
        """Layers that see the same input tensor and have the same featurizer share statistics."""
        return (self.kind == "conv2d", self.kernel, self.stride, self.padding, self.in_features)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "out_features": self.out_features,
            "in_features": self.in_features,
            "weight_shape": list(self.weight_shape),
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "padding": list(self.padding),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        return cls(
            d["kind"],
            d["out_features"],
            d["in_features"],
            tuple(d["weight_shape"]),
            tuple(d["kernel"]),
            tuple(d["stride"]),
            tuple(d["padding"]),
        )


def base_layer(module: nn.Module) -> nn.Module:
    """The frozen layer inside a PEFT wrapper, or the module itself."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def layer_spec(name: str, module: nn.Module) -> LayerSpec:
    module = base_layer(module)
    if isinstance(module, nn.Linear):
        return LayerSpec("linear", module.out_features, module.in_features, tuple(module.weight.shape))
    if Conv1D and isinstance(module, Conv1D):
        n, m = module.weight.shape
        return LayerSpec("conv1d", m, n, tuple(module.weight.shape))
    if isinstance(module, nn.Conv2d):
        padding = module.padding
        if padding == "valid":
            padding = (0, 0)
        if (
            module.groups != 1
            or tuple(module.dilation) != (1, 1)
            or isinstance(padding, str)
            or module.padding_mode != "zeros"
        ):
            raise CNTLoRAError(
                f"layer {name!r} is a Conv2d with groups={module.groups}, dilation={module.dilation}, "
                f"padding={module.padding!r}, padding_mode={module.padding_mode!r}; cntlora supports "
                "groups=1, dilation=1, numeric zero padding. Leave it out of target_modules"
            )
        c_out, c_in, kh, kw = module.weight.shape
        return LayerSpec(
            "conv2d", c_out, c_in * kh * kw, tuple(module.weight.shape), (kh, kw), tuple(module.stride), tuple(padding)
        )
    raise CNTLoRAError(
        f"layer {name!r} is a {type(module).__name__}, which cntlora cannot initialize; it supports "
        f"{SUPPORTED}. Remove it from target_modules"
    )


def weight_matrix(module: nn.Module, spec: LayerSpec) -> torch.Tensor:
    """W0 as an m × n matrix (a view where possible, in the layer's own dtype)."""
    w = full_weight(base_layer(module).weight)  # FSDP2: this layer's weight gathered (every rank calls it)
    if spec.kind == "conv1d":
        return w.T
    return w.reshape(spec.out_features, spec.in_features)


def delta_to_weight(delta: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """An m × n update laid out like the layer's weight tensor."""
    if spec.kind == "conv1d":
        return delta.T
    return delta.reshape(spec.weight_shape)


def input_rows(x: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """The layer's input as rows of length n: tokens for Linear, patches for Conv2d."""
    if spec.kind != "conv2d":
        return x.reshape(-1, spec.in_features)
    if spec.kernel == (1, 1) and spec.stride == (1, 1) and spec.padding == (0, 0):
        return x.permute(0, 2, 3, 1).reshape(-1, spec.in_features)
    patches = F.unfold(x, spec.kernel, padding=spec.padding, stride=spec.stride)  # B × n × L
    return patches.transpose(1, 2).reshape(-1, spec.in_features)


def row_mask(x: torch.Tensor, spec: LayerSpec, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The token mask flattened to the rows of `input_rows`, or None when it does not apply.

    A (batch, seq) mask applies to (batch, seq, n) inputs; conv inputs and inputs of any other
    layout are taken whole.
    """
    if mask is None or spec.kind == "conv2d" or x.dim() != mask.dim() + 1 or x.shape[:-1] != mask.shape:
        return None
    return mask.reshape(-1)


def find_targets(model: nn.Module, target_modules: Union[str, Sequence[str]]) -> Dict[str, nn.Module]:
    """Resolve target names like PEFT does: a regex string must match the whole name; a list
    entry matches a module whose name equals it or ends with '.' + it."""
    if target_modules is None or (not isinstance(target_modules, str) and len(target_modules) == 0):
        raise CNTLoRAError("target_modules is empty; name the layers to adapt, e.g. ['query', 'value']")
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise CNTLoRAError(f"target_modules {target_modules!r} is not a valid regular expression ({e}); pass a "
                               "list of names, e.g. ['query', 'value'], or fix the pattern") from None
    found = {}
    for name, module in model.named_modules():
        if not name or ".lora_" in name or name.endswith(".base_layer"):
            continue
        if isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit:
            found[name] = module
    if not found:
        examples = [
            n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d) + ((Conv1D,) if Conv1D else ()))
        ][:8]
        raise CNTLoRAError(
            f"target_modules {target_modules!r} matched no layer of {type(model).__name__}; "
            f"layer names look like {examples}"
        )
    return found


def check_finite_weights(modules: Dict[str, nn.Module]) -> None:
    """Refuse target layers whose weight holds NaN or Inf (one device sync for all of them)."""
    if not modules:
        return
    finite = torch.stack([torch.isfinite(local_weight(base_layer(m).weight)).all().cpu() for m in modules.values()]).tolist()
    broken = [n for n, ok in zip(modules, finite) if not ok]
    if broken:
        raise CNTLoRAError(f"the weights of {broken[:3]} hold NaN or Inf; load a healthy checkpoint, or leave "
                           "those layers out of target_modules")
