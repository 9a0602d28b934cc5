"""The quality benchmark's training protocol: one init, fine-tuning at each lr, the lr choice.

Every method gets the same model, LoRA budget, calibration batches, data order per seed
(cntlora.training.batch_order), optimizer (AdamW, cosine schedule, gradient clipping at 1)
and steps; each method's learning rate is picked on the validation split, never on test.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from cntlora.batches import to_device
from cntlora.config import CNTLoRAError
from cntlora.training import batch_order, train_mode, train_step

from .baselines import init_method
from .task import Task, resolve_label

DEFAULT_CHECKPOINTS = (10, 25, 50, 75, 100, 150, 200, 300, 400)
# Seeds run only after the settings they check were picked on seeds 0-4 (run_all's confirm
# group): differences on them alone are free of that choice.
FRESH_SEEDS = range(5, 10)
# run_all's confirm2 group: seeds 10-19, fixed before they ran, for the settings that had won
# on seeds 0-9 only narrowly or against some PEFT inits and not others.
SECOND_FRESH_SEEDS = range(10, 20)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _evaluate(task: Task, model, batches) -> float:
    was_training = model.training
    model.eval()
    value = float(task.metric_fn(model, batches))
    train_mode(model, task.freeze_batchnorm) if was_training else model.eval()
    return value


def evaluation_batches(task: Task) -> dict:
    """The validation and test splits in evaluation batches: {"val": batches, "test": batches}."""
    return {"val": task.batches(task.val, task.eval_batch_size), "test": task.batches(task.test, task.eval_batch_size)}


def init_model(task: Task, label: str, seed: int, device) -> tuple[nn.Module, float]:
    """Build the seed's model on `device` and initialize it with `label`.

    Args:
        task: the task.
        label: a method label (task.parse_label).
        seed: seeds the model's new head and the init.
        device: where the model goes.

    Returns:
        (the initialized model, the init's wall seconds).

    Raises:
        CNTLoRAError: a bad label, or @pretrain_source=reference on a task without a reference set.
    """
    method, overrides, harness, lora_kwargs = resolve_label(label, task.full_lora_kwargs())
    calibration = task.calibration_batches(harness.get("calib"))
    reference = None
    if overrides.get("pretrain_source") == "reference":
        if not task.reference_batches:
            raise CNTLoRAError(f"{label}: task {task.name!r} has no reference set (Task.reference_batches); give it "
                               "pre-training-like batches, or use pretrain_source=weights")
        reference = task.reference_sample(harness.get("ref"))
    elif "ref" in harness:
        raise CNTLoRAError(f"{label}: ref= sets the size of the reference sample; add pretrain_source=reference")
    torch.manual_seed(seed)
    model = task.build_model(seed).to(device)
    _sync(device)
    t0 = time.perf_counter()
    model = init_method(method, model, lora_kwargs, calibration, forward_fn=task.forward_fn, loss_fn=task.loss_fn,
                        overrides=overrides, seed=seed, reference_batches=reference,
                        corda_device=task.corda_device)
    _sync(device)
    return model.to(device), time.perf_counter() - t0


def fine_tune(task: Task, model: nn.Module, seed: int, lr: float, steps: int, checkpoints, device, eval_sets) -> dict:
    """`steps` AdamW steps at `lr` on an initialized model, in place.

    Args:
        task: the task.
        model: the initialized model, on `device`.
        seed: fixes the data order and the dropout draws (the same for every method).
        lr: the peak learning rate of the cosine schedule.
        steps: optimizer steps of task.batch_size examples.
        checkpoints: steps after which the validation metric is recorded (the last step always is).
        device: where batches go.
        eval_sets: {"val": batches, "test": batches} (evaluation_batches()).

    Returns:
        {"trainable_params", "train_loss": one loss per step, "val": {step: metric} (step 0 before
        training), "test": the final test metric, "train_seconds"}.
    """
    t0 = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    torch.manual_seed(seed + 1)  # dropout draws: the same stream for every method, whatever its init consumed
    marks = sorted({c for c in checkpoints if 0 < c < steps} | {steps})
    val = {0: _evaluate(task, model, eval_sets["val"])}
    losses = []
    train_mode(model, task.freeze_batchnorm)
    for step, idx in enumerate(batch_order(len(task.train), steps, task.batch_size, seed), start=1):
        batch = to_device(task.collate([task.train[i] for i in idx]), device)
        losses.append(train_step(model, batch, task.loss_fn, optimizer, params=params, clip=1.0, schedule=schedule))
        if step in marks:
            val[step] = _evaluate(task, model, eval_sets["val"])
    test = _evaluate(task, model, eval_sets["test"])
    return {"trainable_params": trainable, "train_loss": losses, "val": {str(k): v for k, v in val.items()},
            "test": test, "train_seconds": time.perf_counter() - t0}


def train_lrs(task: Task, label: str, seed: int, lrs: Sequence[float], steps: int, checkpoints=DEFAULT_CHECKPOINTS,
              device=None, eval_sets: Optional[dict] = None) -> list:
    """Initialize with `label` once, then fine-tune a copy of the initialized model at each lr.

    Slow inits (EVA, CorDA) then run once per seed instead of once per lr. The copy is a deep
    copy of the whole model, base weights included, since PiSSA, OLoRA, CorDA, LoRA-GA and
    residual CNTLoRA rewrite them; so each record is the run train_once(label, seed, lr) gives.

    Args:
        task, label, seed: as init_model.
        lrs: the learning rates.
        steps, checkpoints: as fine_tune.
        device: cuda or cpu; None picks cuda when available.
        eval_sets: the task's evaluation_batches(), to share them between calls; None builds them.

    Returns:
        One record per lr: fine_tune's plus label, seed, lr, steps and the one init's init_seconds.

    Raises:
        CNTLoRAError: as init_model.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    eval_sets = eval_sets or evaluation_batches(task)
    model, init_seconds = init_model(task, label, seed, device)
    records = []
    for i, lr in enumerate(lrs):
        run = model if i == len(lrs) - 1 else copy.deepcopy(model)  # the last lr needs no pristine copy
        records.append({"label": label, "seed": seed, "lr": lr, "steps": steps, "init_seconds": init_seconds,
                        **fine_tune(task, run, seed, lr, steps, checkpoints, device, eval_sets)})
    return records


def train_once(task: Task, label: str, seed: int, lr: float, steps: int, checkpoints=DEFAULT_CHECKPOINTS,
               device=None, eval_sets: Optional[dict] = None) -> dict:
    """Initialize with `label` and fine-tune at `lr`: train_lrs with one lr.

    Returns:
        The run's record (train_lrs).
    """
    return train_lrs(task, label, seed, [lr], steps, checkpoints, device, eval_sets)[0]


def run_quality(task: Task, methods: Sequence[str], seeds: Sequence[int], lrs: Sequence[float], steps: int,
                checkpoints=DEFAULT_CHECKPOINTS, device=None, select_seeds: Optional[int] = None,
                log: Optional[Callable[[str], None]] = print) -> dict:
    """Train every method × lr × seed in this process.

    One init per (method, seed) serves all of its lrs (train_lrs).

    Args:
        task: the task.
        methods: method labels.
        seeds: the seeds.
        lrs: the learning-rate grid.
        steps, checkpoints, device: as train_lrs.
        select_seeds: when set, every lr runs on the first `select_seeds` seeds only; the lr with
            the best mean final val metric then runs on the remaining seeds.
        log: called with one line per finished run; None is silent.

    Returns:
        The results (results_dict), which report.summarize takes.

    Raises:
        CNTLoRAError: as init_model.
    """
    sets = evaluation_batches(task)
    runs = []

    def job(label, seed, job_lrs):
        for record in train_lrs(task, label, seed, job_lrs, steps, checkpoints, device, sets):
            runs.append(record)
            if log:
                log(run_line(task.name, record))

    first = list(seeds) if select_seeds is None else list(seeds)[:select_seeds]
    for label in methods:
        for seed in first:
            job(label, seed, lrs)
        if select_seeds is not None:
            best = choose_lr([r for r in runs if r["label"] == label], task.higher_is_better)
            for seed in list(seeds)[select_seeds:]:
                job(label, seed, [best])
    return results_dict(task, steps, runs)


def run_line(name: str, r: dict) -> str:
    """One line on a finished run, for logs."""
    return (f"{name} {r['label']} seed={r['seed']} lr={r['lr']:g}: val {final_val(r):.4f} "
            f"test {r['test']:.4f} init {r['init_seconds']:.2f}s train {r.get('train_seconds', 0):.1f}s")


def results_dict(task: Task, steps: int, runs: list) -> dict:
    """The JSON-able results of a task's runs: the task's description and the run records."""
    return {"task": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better, "steps": steps,
            "train_size": len(task.train), "lora_kwargs": {k: v for k, v in task.full_lora_kwargs().items()
                                                           if isinstance(v, (int, float, str, list, type(None)))},
            "runs": runs}


def final_val(run: dict) -> float:
    """A run record's validation metric after its last step."""
    return run["val"][str(run["steps"])]


def choose_lr(runs: list, higher_is_better: bool) -> float:
    """The lr with the best mean final validation metric (ties: the smaller lr).

    Only the seeds every lr ran on count, so the extra seeds that select_seeds adds at the
    chosen lr cannot change the choice afterwards.

    Args:
        runs: one method's run records.
        higher_is_better: the metric's direction.

    Returns:
        The chosen lr.
    """
    seeds_by_lr = {}
    for r in runs:
        seeds_by_lr.setdefault(r["lr"], set()).add(r["seed"])
    common = set.intersection(*seeds_by_lr.values())
    by_lr = {}
    for r in runs:
        if r["seed"] in common:
            by_lr.setdefault(r["lr"], []).append(final_val(r))
    sign = 1 if higher_is_better else -1
    return max(sorted(by_lr), key=lambda lr: sign * sum(by_lr[lr]) / len(by_lr[lr]))
