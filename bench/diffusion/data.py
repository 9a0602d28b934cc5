"""Fashion-MNIST in the denoiser's pixel space, fixed augmentations, and image grids.

Images live as float tensors of shape (N, 1, 32, 32) in [-1, 1]: the 28×28 originals
padded by 2 black pixels on each side (black is -1). Augmentations are small affine
maps (integer shifts, a horizontal flip, a scale) and a contrast gain, each fully
described by five numbers per image so that fixed views can be recorded and remade.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 32
PAD = 2
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
AUG_FIELDS = ("dx", "dy", "flip", "scale", "gain")


def _data_dir() -> Path | None:
    candidates = [os.environ.get("CNTLORA_FMNIST_DIR"),
                  Path(__file__).resolve().parents[2] / ".fmnist",
                  "/usr/share/datasets/fashion-mnist",
                  Path(os.environ.get("CNTLORA_CACHE") or "~/.cache/cntlora").expanduser() / "fashion-mnist"]
    for d in candidates:
        if d and (Path(d) / FILES["test"][1]).exists():
            return Path(d)
    return None


def load_fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The raw Fashion-MNIST split.

    Reads the four IDX files from ``$CNTLORA_FMNIST_DIR``, the repository's ``.fmnist/``,
    the Debian package's folder or cntlora's cache, and otherwise fetches them through
    ``cntlora.zoo.fashion_mnist``.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).

    Returns:
        uint8 images of shape (N, 28, 28) and int64 labels of shape (N,).

    Raises:
        ValueError: for another split.
        RuntimeError: when the files are nowhere and cannot be fetched.
    """
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = _data_dir()
    if d is None:
        from cntlora import zoo
        return zoo.fashion_mnist(split)
    img_name, lab_name = FILES[split]
    with gzip.open(d / img_name) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(d / lab_name) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 28×28 images as float32 (N, 1, 32, 32) in [-1, 1], padded with black.

    Args:
        images: uint8 tensor (N, 28, 28).

    Returns:
        The padded, scaled float32 tensor on the same device.
    """
    x = images.float().div(127.5).sub(1.0).unsqueeze(1)
    return F.pad(x, (PAD, PAD, PAD, PAD), value=-1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model-space images (N, 1, H, W) in [-1, 1] as uint8 (N, H, W) on the CPU.

    Args:
        images: float tensor, values outside [-1, 1] are clipped.

    Returns:
        uint8 tensor.
    """
    return images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)[:, 0].cpu()


def random_aug_params(n: int, generator: torch.Generator, *, shift: int = 2, flip_p: float = 0.5,
                      scale: tuple[float, float] = (0.9, 1.1), gain: tuple[float, float] = (0.8, 1.2),
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Random augmentation parameters, one row (dx, dy, flip, scale, gain) per image.

    Args:
        n: number of rows.
        generator: the torch generator that draws them (its device is used).
        shift: largest integer shift in pixels, each axis.
        flip_p: probability of a horizontal flip.
        scale: range of the isotropic scale.
        gain: range of the contrast gain (applied about black).
        device: where to put the result; the generator's device by default.

    Returns:
        float32 tensor (n, 5).
    """
    dev = generator.device
    u = torch.rand(n, 4, generator=generator, device=dev)
    shifts = torch.randint(-shift, shift + 1, (n, 2), generator=generator, device=dev).float()
    params = torch.stack([shifts[:, 0], shifts[:, 1], (u[:, 0] < flip_p).float(),
                          scale[0] + (scale[1] - scale[0]) * u[:, 1],
                          gain[0] + (gain[1] - gain[0]) * u[:, 2]], dim=1)
    return params.to(device) if device is not None else params


def augment(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply augmentation rows to model-space images.

    Each image is flipped, scaled about its centre and shifted by (dx, dy) pixels with
    bilinear resampling (black outside), then its contrast is multiplied by ``gain``
    about black and clipped to [-1, 1]. The identity row is (0, 0, 0, 1, 1).

    Args:
        images: float tensor (N, 1, H, W) in [-1, 1].
        params: tensor (N, 5) as made by ``random_aug_params``.

    Returns:
        The augmented images, same shape, dtype and device.
    """
    n, _, h, w = images.shape
    p = params.to(device=images.device, dtype=torch.float32)
    dx, dy, flip, scale, gain = p.unbind(1)
    sx = torch.where(flip > 0.5, -1.0, 1.0) / scale
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = sx
    theta[:, 1, 1] = 1.0 / scale
    # output pixel u samples input pixel (u - shift) / scale; grids are in [-1, 1] units
    theta[:, 0, 2] = -dx * 2.0 / w * torch.where(flip > 0.5, -1.0, 1.0) / scale
    theta[:, 1, 2] = -dy * 2.0 / h / scale
    grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
    x = F.grid_sample(images.float() + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = (x * gain.view(n, 1, 1, 1)).sub(1.0).clamp(-1.0, 1.0)
    return x.to(images.dtype)


def identity_params(n: int) -> torch.Tensor:
    """n identity augmentation rows.

    Args:
        n: number of rows.

    Returns:
        float32 tensor (n, 5) of (0, 0, 0, 1, 1).
    """
    return torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]]).repeat(n, 1)


def save_grid(path: str | Path, rows: list[torch.Tensor], labels: list[str] | None = None, zoom: int = 3) -> None:
    """Save rows of model-space images as one PNG, with an optional label per row.

    Args:
        path: the PNG file to write.
        rows: each a tensor (K, 1, H, W) in [-1, 1]; rows may differ in K.
        labels: optional text drawn left of each row.
        zoom: integer upscaling (nearest) of every pixel.
    """
    from PIL import Image, ImageDraw

    h = rows[0].shape[-2] * zoom
    w = rows[0].shape[-1] * zoom
    gap = 2
    label_w = 0 if labels is None else 8 + 7 * max(len(s) for s in labels)
    k = max(r.shape[0] for r in rows)
    canvas = Image.new("L", (label_w + k * (w + gap), len(rows) * (h + gap)), color=40)
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        y = i * (h + gap)
        if labels is not None:
            draw.text((4, y + h // 2 - 6), labels[i], fill=255)
        for j, img in enumerate(to_uint8(row)):
            tile = Image.fromarray(img.numpy(), mode="L").resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (w + gap), y))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
