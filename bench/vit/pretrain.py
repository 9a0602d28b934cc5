"""Pre-train the suite's ViT on the first 50,000 Fashion-MNIST training images (one GPU, about a minute).

    python -m bench.vit.pretrain FASHION_MNIST_FOLDER [--out bench/vit/artifacts/vit-fmnist]

The recipe (all of it fixed here and recorded in the folder's pretrain.json): the first
50,000 of the 60,000 training images (suite.PRETRAIN_IMAGES) and their 10 labels, random translations of up to 2 pixels and horizontal
flips, AdamW (lr 1e-3, weight decay 0.05, betas 0.9/0.999), batch 512, 40 epochs, 2 of them
linear warm-up then cosine decay, label smoothing 0.1, bf16 autocast, seed 0. The weights are
saved in fp16. The test split is only evaluated, never trained on (here when its files are present, else
by `python -m bench.vit.evaluate`); the transfer suite draws its Fashion-MNIST items from it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import ARTIFACT, CONFIG, MEAN, STD, new_vit, pixels
from .suite import PRETRAIN_IMAGES, fashion_mnist

RECIPE = dict(epochs=40, warmup_epochs=2, batch_size=512, lr=1e-3, weight_decay=0.05, label_smoothing=0.1,
              max_shift=2, hflip=True, seed=0, autocast="bfloat16")


def augment(images: torch.Tensor, gen: torch.Generator, shift: int) -> torch.Tensor:
    """Random integer translations (zero fill) of up to `shift` pixels and random horizontal flips."""
    n, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))
    oy = torch.randint(0, 2 * shift + 1, (n,), generator=gen, device=images.device)
    ox = torch.randint(0, 2 * shift + 1, (n,), generator=gen, device=images.device)
    rows = (oy[:, None] + torch.arange(h, device=images.device))[:, :, None]
    cols = (ox[:, None] + torch.arange(w, device=images.device))[:, None, :]
    out = padded[torch.arange(n, device=images.device)[:, None, None], rows, cols]
    flip = torch.rand(n, generator=gen, device=images.device) < 0.5
    return torch.where(flip[:, None, None], out.flip(-1), out)


@torch.no_grad()
def predict(model, images: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    """Top-1 class of each uint8 image (bf16 autocast on a GPU)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        with torch.autocast("cuda", torch.bfloat16, enabled=images.is_cuda):
            out.append(model(pixel_values=pixels(images[i:i + batch])).logits.argmax(-1))
    return torch.cat(out)


def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch: int = 2000) -> float:
    """Top-1 accuracy over uint8 images."""
    return int((predict(model, images, batch) == labels).sum()) / len(images)


def pretrain(folder: Path, out: Path, epochs: int = RECIPE["epochs"]) -> dict:
    """Train the ViT, save it to `out` (fp16) with its recipe, and return the record."""
    from transformers import ViTImageProcessor

    torch.manual_seed(RECIPE["seed"])
    np.random.seed(RECIPE["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    train_x, train_y = (torch.from_numpy(a[:PRETRAIN_IMAGES].copy()).to(device) for a in fashion_mnist(folder, "train"))
    train_y = train_y.long()
    try:  # the test split is optional here (evaluate.py scores the saved model on it)
        test_x, test_y = (torch.from_numpy(a.copy()).to(device) for a in fashion_mnist(folder, "t10k"))
        test_y = test_y.long()
    except FileNotFoundError:
        test_x = test_y = None
    model = new_vit(10).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": RECIPE["weight_decay"]}, {"params": other, "weight_decay": 0.0}],
                            lr=RECIPE["lr"], betas=(0.9, 0.999))
    per_epoch = len(train_x) // RECIPE["batch_size"]
    total, warm = epochs * per_epoch, RECIPE["warmup_epochs"] * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    gen = torch.Generator(device=device).manual_seed(RECIPE["seed"])
    t0, history = time.perf_counter(), []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen, device=device)
        for i in range(per_epoch):
            idx = order[i * RECIPE["batch_size"]:(i + 1) * RECIPE["batch_size"]]
            x = augment(train_x[idx], gen, RECIPE["max_shift"])
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(pixel_values=pixels(x)).logits
            loss = F.cross_entropy(logits.float(), train_y[idx], label_smoothing=RECIPE["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        if epoch % 5 == 4 or epoch == epochs - 1:
            seen = order[:10_000]
            history.append({"epoch": epoch + 1, "loss": float(loss.detach()),
                            "train_accuracy": accuracy(model, train_x[seen], train_y[seen]),
                            "test_accuracy": None if test_x is None else accuracy(model, test_x, test_y)})
            print(json.dumps(history[-1]), flush=True)
    seconds = time.perf_counter() - t0
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out)
    ViTImageProcessor(do_resize=True, size={"height": 28, "width": 28}, image_mean=[MEAN], image_std=[STD],
                      do_convert_rgb=False).save_pretrained(out)
    reloaded = new_vit(10)
    reloaded.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    record = {"recipe": RECIPE | {"epochs": epochs}, "config": CONFIG, "data": f"Fashion-MNIST train, the first {PRETRAIN_IMAGES:,} images, 10 classes",
              "parameters": sum(p.numel() for p in model.parameters()), "train_seconds": seconds,
              "test_accuracy_fp16": None if test_x is None else accuracy(reloaded.to(device), test_x, test_y),
              "history": history,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fashion_folder", type=Path)
    parser.add_argument("--out", type=Path, default=ARTIFACT)
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    args = parser.parse_args()
    print(json.dumps({k: v for k, v in pretrain(args.fashion_folder, args.out, args.epochs).items() if k != "history"}, indent=2))
