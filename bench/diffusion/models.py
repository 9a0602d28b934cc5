"""Architectures: the conditional denoiser (a diffusers UNet) and the fidelity encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import tokens

CROSS_ATTENTION_DIM = 128


def unet_config() -> dict:
    """The denoiser's ``UNet2DConditionModel`` configuration (about 10M parameters).

    Three resolutions (32, 16, 8) with 64, 128 and 128 channels; cross-attention to the
    prompt at 16×16, 8×8 and in the middle block, none at 32×32.

    Returns:
        Keyword arguments for ``UNet2DConditionModel``.
    """
    return {
        "sample_size": 32, "in_channels": 1, "out_channels": 1,
        "block_out_channels": (64, 128, 128), "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": CROSS_ATTENTION_DIM, "attention_head_dim": 8, "norm_num_groups": 32,
    }


def scheduler_config() -> dict:
    """The training noise schedule: DDPM, 1000 steps, linear betas, epsilon prediction.

    Returns:
        Keyword arguments for ``DDPMScheduler``.
    """
    return {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
            "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0}


def build_unet(config: dict | None = None):
    """A freshly initialised denoiser.

    Args:
        config: a ``UNet2DConditionModel`` config; ``unet_config()`` by default.

    Returns:
        The ``UNet2DConditionModel``.
    """
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**(config or unet_config()))


def build_token_table(dim: int = CROSS_ATTENTION_DIM) -> nn.Embedding:
    """The learned prompt-token table, one row per ``tokens.VOCAB`` entry, rows ~ N(0, 1).

    Args:
        dim: embedding width, the UNet's ``cross_attention_dim``.

    Returns:
        An ``nn.Embedding``; initialise it under a fixed seed for reproducibility.
    """
    table = nn.Embedding(len(tokens.VOCAB), dim)
    nn.init.normal_(table.weight, std=1.0)
    return table


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.SiLU())


class FidelityEncoder(nn.Module):
    """A small CNN that embeds (N, 1, 32, 32) images in [-1, 1] as unit vectors.

    Trained contrastively (two augmented views of the same item close, every other item
    far), so cosine similarity of embeddings measures whether two images show the same
    item. ``backbone`` ends in global average pooling (``width * 4`` features); ``head``
    is the projection MLP that the contrastive loss saw. ``embedding`` chooses which of
    the two ``forward`` returns.
    """

    def __init__(self, width: int = 48, proj_dim: int = 128, embedding: str = "head"):
        super().__init__()
        if embedding not in ("head", "backbone"):
            raise ValueError(f"embedding must be 'head' or 'backbone', got {embedding!r}")
        w = width
        self.backbone = nn.Sequential(
            _block(1, w, 1), _block(w, w, 1),
            _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1),
            _block(4 * w, 4 * w, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(4 * w, 4 * w), nn.SiLU(), nn.Linear(4 * w, proj_dim))
        self.embedding = embedding
        self.config = {"width": width, "proj_dim": proj_dim, "embedding": embedding}

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both representations, unnormalised.

        Args:
            images: (N, 1, 32, 32) in [-1, 1].

        Returns:
            (backbone features (N, 4w), head outputs (N, proj_dim)).
        """
        h = self.backbone(images)
        return h, self.head(h)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings of images.

        Args:
            images: (N, 1, 32, 32) in [-1, 1].

        Returns:
            (N, D) float tensor, each row of norm 1.
        """
        h, z = self.features(images)
        return F.normalize(z if self.embedding == "head" else h, dim=1)
