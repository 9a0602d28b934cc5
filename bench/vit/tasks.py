"""The suite's tasks as quality-harness Tasks: the pre-trained ViT with a fresh head, LoRA r=8 on every block.

    make_task("vit", suite="rotation")                # the 1k regime: 800 train, 200 val
    make_task("vit", suite="rotation", fewshot=True)  # 100 train, the same 200 val

Every method trains the same LoRA budget (r=8, alpha 8) on the attention projections and the
MLP of all 8 blocks, plus the new head. The reference set, behind
`@pretrain_source=reference`, is a sample of 4,096 of the images the ViT was pre-trained on;
`@ref=N` keeps its first N.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from cntlora.config import CNTLoRAError

from ..quality.task import Task
from .model import head_builder, load_pretrained, pixels, targets
from .suite import N_FEWSHOT, TASK_NAMES

SUITE_FILE = Path(__file__).resolve().parents[2] / ".vit_suite" / "suite.npz"
BATCH = {False: 64, True: 20}  # training batch: 1k regime, few-shot
STEPS = {False: 150, True: 80}  # 12 and 16 epochs
CHECKPOINTS = (10, 25, 50, 80, 100, 150)
CALIBRATION = {False: 128, True: N_FEWSHOT}
REFERENCE_BATCH = 64


def suite_file() -> Path:
    """Where the suite's arrays are: $CNTLORA_VIT_SUITE, else .vit_suite/suite.npz in the clone."""
    return Path(os.environ.get("CNTLORA_VIT_SUITE") or SUITE_FILE)


_ARRAYS = {}
_BASE = {}


def _arrays(path: Path):
    if path not in _ARRAYS:
        if not path.is_file():
            raise CNTLoRAError(f"{path} is missing; build it with python -m bench.vit.suite FASHION_MNIST_FOLDER {path}")
        _ARRAYS[path] = dict(np.load(path))
    return _ARRAYS[path]


def _collate(examples: list) -> dict:
    return {"pixel_values": pixels(torch.stack([x for x, _ in examples])),
            "labels": torch.tensor([y for _, y in examples], dtype=torch.long)}


def accuracy(model, batches) -> float:
    """Top-1 accuracy of an image classifier over {"pixel_values", "labels"} batches."""
    device = next(model.parameters()).device
    right = total = 0
    for batch in batches:
        logits = model(pixel_values=batch["pixel_values"].to(device)).logits
        right += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
        total += len(batch["labels"])
    return right / total


def _loss(model, batch):
    return model(**batch).loss


def vit_task(suite: str, fewshot: bool = False, quick: bool = False, model=None, path=None) -> Task:
    """One suite task in one regime.

    Args:
        suite: a task of bench.vit.suite (TASK_NAMES).
        fewshot: train on the first 100 training images instead of 800.
        quick: 16 examples per split and 8 reference images (smoke tests).
        model: the base model; None loads the pre-trained ViT (bench/vit/model.py).
        path: the suite's .npz; None is suite_file().

    Returns:
        The Task; its name is "vit-<suite>" or "vit-<suite>-fewshot".

    Raises:
        CNTLoRAError: an unknown task or a missing suite file.
    """
    if suite not in TASK_NAMES:
        raise CNTLoRAError(f"unknown suite task {suite!r}; use one of {', '.join(TASK_NAMES)}")
    z = _arrays(Path(path or suite_file()))
    n_train = 16 if quick else N_FEWSHOT if fewshot else len(z[f"{suite}/train_y"])
    n_eval = 16 if quick else None

    def pairs(split, n=None):
        x, y = z[f"{suite}/{split}_x"], z[f"{suite}/{split}_y"]
        n = len(y) if n is None else min(n, len(y))
        return [(torch.from_numpy(x[i].copy()), int(y[i])) for i in range(n)]

    classes = int(z[f"{suite}/train_y"].max()) + 1
    if model is None:
        key = "pretrained"
        if key not in _BASE:
            _BASE[key] = load_pretrained()
        model = _BASE[key]
    ref_x = torch.from_numpy(z["reference_x"][: 8 if quick else None].copy())
    reference = [{"pixel_values": pixels(ref_x[i:i + REFERENCE_BATCH]),
                  "labels": torch.zeros(len(ref_x[i:i + REFERENCE_BATCH]), dtype=torch.long)}
                 for i in range(0, len(ref_x), REFERENCE_BATCH)]
    return Task(
        name=f"vit-{suite}" + ("-fewshot" if fewshot else "") + ("-quick" if quick else ""),
        build_model=head_builder(model, classes), target_modules=targets(model),
        train=pairs("train", n_train), val=pairs("val", n_eval), test=pairs("test", n_eval),
        collate=_collate, loss_fn=_loss, metric_fn=accuracy, metric="accuracy", higher_is_better=True,
        lora_kwargs={"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "modules_to_save": ["classifier"]},
        batch_size=8 if quick else BATCH[fewshot], eval_batch_size=500,
        calibration_size=8 if quick else CALIBRATION[fewshot], reference_batches=reference,
        corda_device="cpu",  # CorDA's per-example device syncs crawl on a GPU shared by 15 workers
    )
