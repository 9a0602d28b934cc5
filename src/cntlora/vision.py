"""Vision transformers: their default target layers, and images read the way the model expects.

Families: transformers' ViT, DeiT, ViT-MSN and DINOv2 (by the config's model_type), and timm's
VisionTransformer, recognised by its layer names (blocks.N.attn.qkv, blocks.N.mlp.fc1, ...)
without importing timm. The targets are the attention and MLP projections of every block;
never the patch embedding (a strided convolution), a pooler or a classifier head.

An HF vision transformer reads images at its config's image_size with num_channels channels,
normalized by the image_mean / image_std of the folder's preprocessor_config.json (transformers'
ViT default 0.5 / 0.5 without one). Every token, [CLS] and patches alike, is a row of the
statistics: image batches carry no attention mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .config import CNTLoRAError

HF_VIT_TYPES = ("vit", "deit", "vit_msn", "dinov2")
# name suffixes of the projections, in the layer naming of transformers 5 and then the earlier one
# (attention.attention.query, attention.output.dense, intermediate.dense, output.dense); only the
# suffixes that name a layer of the model are returned
HF_VIT_SUFFIXES = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                   "mlp.fc1", "mlp.fc2", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",  # DINOv2 SwiGLU
                   "attention.attention.query", "attention.attention.key", "attention.attention.value",
                   "output.dense", "intermediate.dense", "mlp.weights_in", "mlp.weights_out")
# timm: fused qkv (or separate projections), the attention output, and the MLP (SwiGLU variants too);
# "attn.proj" rather than "proj", which would also name the patch embedding's patch_embed.proj
TIMM_SUFFIXES = ("attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj",
                 "mlp.fc1", "mlp.fc1_g", "mlp.fc1_x", "mlp.fc2")
VIT_MEAN = VIT_STD = 0.5  # transformers' ViTImageProcessor default (IMAGENET_STANDARD_MEAN/STD)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


def _linear_names(model) -> List[str]:
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _present(suffixes: Sequence[str], names: Sequence[str]) -> List[str]:
    return [s for s in suffixes if any(n == s or n.endswith("." + s) for n in names)]


def is_timm_vit(model) -> bool:
    """Whether a model has timm's VisionTransformer layer names (attention qkv and MLP fc1 linears).

    Args:
        model: any torch module.

    Returns:
        True when some linear layer's name ends in attn.qkv (or attn.q_proj) and another's in
        mlp.fc1 (or mlp.fc1_g).

    Raises:
        Nothing.
    """
    names = _linear_names(model)
    return bool(_present(("attn.qkv", "attn.q_proj"), names)) and bool(_present(("mlp.fc1", "mlp.fc1_g"), names))


def default_targets(model) -> Optional[List[str]]:
    """The attention and MLP projections of a known vision transformer.

    Args:
        model: a transformers model (vit, deit, vit_msn, dinov2 by config.model_type) or a module
            with timm's VisionTransformer layer names.

    Returns:
        Name suffixes for `target_modules` (each names at least one linear layer of the model),
        or None for a model of another kind.

    Raises:
        CNTLoRAError: a known vision transformer family in which none of the expected layers exist.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in HF_VIT_TYPES:
        found = _present(HF_VIT_SUFFIXES, _linear_names(model))
        if not found:
            raise CNTLoRAError(f"found none of the usual attention/MLP layers in this {model_type} model; name the "
                               f"targets with --target-modules (its linear layers: {_linear_names(model)[:6]})")
        return found
    if is_timm_vit(model):
        return _present(TIMM_SUFFIXES, _linear_names(model))
    return None


# -----------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class ImagePreprocessing:
    """How image files become a vision model's pixel_values: resized to `size` (height, width),
    `channels` of 1 (grayscale) or 3 (RGB), then (x - mean) / std per channel."""

    size: Tuple[int, int]
    channels: int = 3
    mean: Tuple[float, ...] = (VIT_MEAN,) * 3
    std: Tuple[float, ...] = (VIT_STD,) * 3

    def from_pixels(self, x):
        """Pixels in [0, 1] as model input.

        Args:
            x: float N×C×H×W with C of 1 or 3.

        Returns:
            Float N×channels×size, normalized.

        Raises:
            Nothing.
        """
        import torch
        import torch.nn.functional as F

        if x.shape[1] != self.channels:
            x = (x * torch.tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True) if self.channels == 1 \
                else x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != tuple(self.size):
            x = F.interpolate(x, size=tuple(self.size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def read(self, files: Sequence[Path]):
        """Image files as one model-input tensor.

        Args:
            files: image files, read as grayscale or RGB per `channels`.

        Returns:
            Float N×channels×height×width.

        Raises:
            CNTLoRAError: a file cannot be read as an image.
        """
        import torch

        return torch.cat([self.from_pixels(read_pixels(p, self.channels).unsqueeze(0)) for p in files])


def read_pixels(path: Path, channels: int = 3):
    """One image file as float pixels in [0, 1].

    Args:
        path: the file (PIL reads it; without PIL, matplotlib reads PNG and JPEG).
        channels: 3 for RGB, 1 for grayscale (PIL's luma weights).

    Returns:
        A float32 tensor channels×H×W.

    Raises:
        CNTLoRAError: the file is not an image that can be read (corrupt, truncated, too large).
    """
    import numpy
    import torch

    try:
        try:
            from PIL import Image
        except ImportError:
            import matplotlib.image

            pixels = torch.from_numpy(matplotlib.image.imread(path).copy()).float()
            pixels = pixels / 255 if pixels.max() > 1 else pixels  # PNG reads as [0, 1], JPEG as uint8
            pixels = pixels.unsqueeze(-1) if pixels.dim() == 2 else pixels
            pixels = pixels[..., :3].expand(-1, -1, 3) if pixels.shape[-1] == 1 else pixels[..., :3]
            if channels == 1:
                pixels = (pixels * torch.tensor(LUMA)).sum(-1, keepdim=True)
        else:
            with Image.open(path) as im:
                array = numpy.asarray(im.convert("L" if channels == 1 else "RGB")).copy()
            pixels = torch.from_numpy(array).float() / 255
            pixels = pixels.unsqueeze(-1) if pixels.dim() == 2 else pixels
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        fix = ("downscale it" if "exceeds limit" in first or "decompression bomb" in first.lower()
               else "remove it from the folder or re-save it as PNG or JPEG")
        raise CNTLoRAError(f"{path} cannot be read as an image ({type(e).__name__}: {first}); {fix}") from e
    if min(pixels.shape[:2]) < 1:
        raise CNTLoRAError(f"{path} has no pixels ({pixels.shape[1]}×{pixels.shape[0]}); remove it from the folder")
    return pixels.permute(2, 0, 1)


def _values(raw, channels: int, what: str, where: str) -> Tuple[float, ...]:
    values = [raw] if isinstance(raw, (int, float)) else raw
    ok = isinstance(values, list) and values and all(isinstance(v, (int, float)) for v in values)
    if ok and len(values) != channels and len(set(values)) == 1:
        values = values[:1] * channels  # one value for every channel, whatever its count
    if not ok or len(values) != channels or (what == "image_std" and min(values) <= 0):
        raise CNTLoRAError(f"{where} has {what}={raw!r}, but the model takes {channels} channel(s); write {channels} "
                           f"number(s){' > 0' if what == 'image_std' else ''} there, or delete the file to use "
                           f"{VIT_MEAN}")
    return tuple(float(v) for v in values)


def preprocessing_for(model, folder=None) -> Optional[ImagePreprocessing]:
    """How an HF vision transformer expects its images, or None for any other model.

    Args:
        model: a loaded model; only transformers models of the HF_VIT_TYPES families get one.
        folder: the model folder, whose preprocessor_config.json (if any) gives image_mean and
            image_std (do_normalize false: none).

    Returns:
        The ImagePreprocessing (config.image_size, config.num_channels, the mean and deviation),
        or None: the caller keeps its default (3×64×64, ImageNet-normalized, for CNNs).

    Raises:
        CNTLoRAError: the config lacks image_size, takes neither 1 nor 3 channels, or the
            preprocessor file is not JSON or holds a mean/deviation of the wrong length.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in HF_VIT_TYPES:
        return None
    size = getattr(config, "image_size", None)
    size = (size, size) if isinstance(size, int) else tuple(size or ())
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise CNTLoRAError(f"the {model_type} config has image_size={getattr(config, 'image_size', None)!r}; set it "
                           "to the side the model was trained at (e.g. 224) in config.json")
    channels = getattr(config, "num_channels", 3)
    if channels not in (1, 3):
        raise CNTLoRAError(f"the model takes {channels} image channels; image folders are read as 1 (grayscale) "
                           "or 3 (RGB) channels, so pass your own pixel_values batches from Python")
    mean, std = [VIT_MEAN] * channels, [VIT_STD] * channels
    path = Path(folder) / "preprocessor_config.json" if folder is not None else None
    if path is not None and path.is_file():
        try:
            pre = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CNTLoRAError(f"{path} is not JSON ({e}); fix or delete it (then images are normalized with "
                               f"mean {VIT_MEAN}, std {VIT_STD})") from None
        if not isinstance(pre, dict):
            raise CNTLoRAError(f"{path} is not a JSON object; fix or delete it")
        if pre.get("do_normalize", True) is False:
            mean, std = [0.0] * channels, [1.0] * channels
        else:
            mean = _values(pre.get("image_mean", mean), channels, "image_mean", str(path))
            std = _values(pre.get("image_std", std), channels, "image_std", str(path))
    return ImagePreprocessing(size, channels, tuple(mean), tuple(std))
