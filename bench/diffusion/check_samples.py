"""Check that the denoiser's class samples look like their class, with a pixel classifier.

    python -m bench.diffusion.check_samples --samples bench/results/diffusion/class_samples.safetensors

Fits multinomial logistic regression on the 60,000 training images' pixels (deterministic
full-batch L-BFGS), reports its test-split accuracy as the reference, and the share of
each class's samples that it assigns to the prompted class. Writes ``sample_check.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data, runtime, tokens

RESULTS = Path(__file__).resolve().parents[1] / "results" / "diffusion"


def fit_pixel_classifier(iters: int = 100, l2: float = 1e-4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression on model-space pixels of the training split.

    Args:
        iters: L-BFGS iterations.
        l2: weight penalty.
        seed: seed (the fit itself is deterministic from zeros).

    Returns:
        (weights (1024, 10), bias (10,)).
    """
    torch.manual_seed(seed)
    images, labels = data.load_fashion_mnist("train")
    x = data.to_model_space(images).flatten(1)
    w = torch.zeros(x.shape[1], 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, labels) + l2 * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach(), b.detach()


def main(argv=None) -> dict:
    """Fit the classifier and score the samples.

    Args:
        argv: command-line arguments.

    Returns:
        The record written to ``sample_check.json``.
    """
    from safetensors.torch import load_file, safe_open

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", default=str(RESULTS / "class_samples.safetensors"))
    p.add_argument("--out", default=str(RESULTS / "sample_check.json"))
    args = p.parse_args(argv)
    w, b = fit_pixel_classifier()
    test_x, test_y = data.load_fashion_mnist("test")
    test_acc = float(((data.to_model_space(test_x).flatten(1) @ w + b).argmax(1) == test_y).float().mean())
    samples = load_file(args.samples)
    with safe_open(args.samples, "pt") as f:
        meta = f.metadata()
    per_class, confusion = {}, {}
    total, right = 0, 0
    for c, name in enumerate(tokens.CLASS_NAMES):
        x = samples[name].float().div(127.5).sub(1).flatten(1)
        pred = (x @ w + b).argmax(1)
        per_class[name] = round(float((pred == c).float().mean()), 3)
        confusion[name] = {tokens.CLASS_NAMES[k]: int((pred == k).sum()) for k in range(10) if (pred == k).any()}
        total += len(pred)
        right += int((pred == c).sum())
    record = {"classifier": "logistic regression on pixels (train split)", "classifier_test_accuracy": round(test_acc, 4),
              "sample_accuracy": round(right / total, 4), "per_class": per_class, "predicted": confusion,
              "samples": args.samples, "sampling": meta}
    runtime.write_json(args.out, record)
    print(record)
    return record


if __name__ == "__main__":
    main()
