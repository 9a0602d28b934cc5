"""The suite's base model: a small transformers ViT pre-trained on Fashion-MNIST (bench/vit/pretrain.py).

Its folder, bench/vit/artifacts/vit-fmnist, is a plain save_pretrained folder (fp16 weights,
config.json and preprocessor_config.json), so `ViTForImageClassification.from_pretrained`
and `cntlora init` load it as they load any HF ViT.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "vit-fmnist"
# ViT-Tiny's width on 28×28 grayscale images: 7×7 patches of 4×4 pixels plus [CLS], 8 blocks
CONFIG = dict(image_size=28, patch_size=4, num_channels=1, hidden_size=256, num_hidden_layers=8,
              num_attention_heads=4, intermediate_size=1024, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, qkv_bias=True, num_labels=10)
MEAN, STD = 0.5, 0.5  # pixels in [0, 1] -> [-1, 1]
# the attention projections and the MLP of every block, as transformers >= 5.24 names them and as
# earlier releases (and most checkpoints) do
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
LEGACY_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def targets(model: nn.Module) -> list:
    """TARGETS or LEGACY_TARGETS, whichever names the installed transformers gives the model's layers."""
    return list(TARGETS if any(n.endswith(".q_proj") for n, _ in model.named_modules()) else LEGACY_TARGETS)


def new_vit(num_labels: int = 10) -> nn.Module:
    """A randomly initialized ViTForImageClassification of the suite's shape.

    Args:
        num_labels: the head's classes.

    Returns:
        The model (float32).
    """
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(**{**CONFIG, "num_labels": num_labels}))


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×28×28 images -> the model's float N×1×28×28 pixel_values."""
    return ((images.float() / 255 - MEAN) / STD).unsqueeze(1)


def reset_head(model: nn.Module, num_labels: int) -> None:
    """Replace the classifier with a fresh Linear (normal(0, 0.02) weights, zero bias) from torch's current seed."""
    head = nn.Linear(model.config.hidden_size, num_labels)
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    model.classifier = head
    model.config.num_labels = num_labels
    model.num_labels = num_labels


def load_pretrained(folder: Path = ARTIFACT) -> nn.Module:
    """The pre-trained ViT in float32 and eval mode.

    Args:
        folder: its save_pretrained folder.

    Returns:
        The model, with the 10-class Fashion-MNIST head it was pre-trained with.

    Raises:
        FileNotFoundError: the folder is missing (bench/vit/pretrain.py makes it).
    """
    from transformers import ViTForImageClassification

    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no pre-trained ViT; run python -m bench.vit.pretrain on a GPU")
    return ViTForImageClassification.from_pretrained(folder, dtype=torch.float32).eval()


def head_builder(template: nn.Module, num_labels: int):
    """A factory seed -> a copy of `template` with a fresh `num_labels`-class head drawn from the seed."""

    def build(seed: int) -> nn.Module:
        model = copy.deepcopy(template)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            reset_head(model, num_labels)
        return model

    return build
