"""Score the pre-trained ViT on Fashion-MNIST's 10k test images (CPU is enough, about a minute).

    python -m bench.vit.evaluate FASHION_MNIST_FOLDER [--model bench/vit/artifacts/vit-fmnist]

Writes evaluation.json beside the weights: the fp16 weights' top-1 test accuracy, overall and
per class. Pre-training never sees these images; the transfer suite draws its Fashion-MNIST
items from them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .model import ARTIFACT, load_pretrained
from .pretrain import predict
from .suite import fashion_mnist


def evaluate(folder: Path, model_dir: Path = ARTIFACT, batch: int = 1000) -> dict:
    """Top-1 accuracy of the saved model on the test split.

    Args:
        folder: a folder with t10k-images-idx3-ubyte(.gz|.xz) and its labels.
        model_dir: the pre-trained ViT's folder.
        batch: images per forward pass.

    Returns:
        {"test_accuracy", "per_class", "n"}.

    Raises:
        FileNotFoundError: the test files or the model are missing.
    """
    model = load_pretrained(model_dir)
    x, y = fashion_mnist(folder, "t10k")
    right = predict(model, torch.from_numpy(x.copy()), batch).numpy() == y
    return {"test_accuracy": float(right.mean()), "n": int(len(y)),
            "per_class": {int(c): float(right[y == c].mean()) for c in range(10)}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fashion_folder", type=Path)
    parser.add_argument("--model", type=Path, default=ARTIFACT)
    args = parser.parse_args()
    record = evaluate(args.fashion_folder, args.model)
    (args.model / "evaluation.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
