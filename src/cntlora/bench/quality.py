"""Quality benchmark: fine-tune from every init under one protocol and compare the metrics.

Library first: describe a `Task`, call `run_quality(task, methods, seeds, lrs, steps)`, then
`summarize(results)`. `cntlora bench quality --task NAME` is a thin layer over that.

Protocol (docs/benchmarks.md): every method gets the same model, LoRA budget, calibration
batches, data order per seed, optimizer and steps; each method's learning rate is picked on
the validation split (never test); test metrics are reported at that rate over the seeds.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..config import CNTLoRAConfig, CNTLoRAError
from ..batches import to_device
from ..files import atomic_write
from .baselines import METHODS, init_method

DEFAULT_CHECKPOINTS = (10, 25, 50, 75, 100, 150, 200, 300, 400)


@dataclass
class Task:
    """One fine-tuning problem.

    build_model(seed) returns a fresh pretrained model (a new head may depend on the seed).
    train/val/test are sequences of examples; collate(list of examples) -> batch.
    loss_fn(model, batch) -> scalar loss; metric_fn(model, batches) -> float over a split.
    lora_kwargs: peft.LoraConfig arguments shared by every method (r, lora_alpha,
    modules_to_save...); target_modules is added from the field of that name.
    calibration_size: how many training examples the data-driven inits see (the first ones,
    the same for every method and seed).
    reference_batches: ready batches of pre-training-like data (what collate returns), the
    reference set of labels with @pretrain_source=reference; empty when the task has none.
    """

    name: str
    build_model: Callable[[int], nn.Module]
    target_modules: Any
    train: Sequence
    val: Sequence
    test: Sequence
    collate: Callable[[list], Any]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    metric_fn: Callable[[nn.Module, list], float]
    metric: str = "accuracy"
    higher_is_better: bool = True
    lora_kwargs: dict = field(default_factory=lambda: {"r": 8, "lora_alpha": 8})
    batch_size: int = 16
    eval_batch_size: int = 64
    calibration_size: int = 64
    forward_fn: Optional[Callable] = None
    freeze_batchnorm: bool = True
    reference_batches: Sequence = ()

    def batches(self, examples: Sequence, batch_size: int) -> list:
        return [self.collate(list(examples[i : i + batch_size])) for i in range(0, len(examples), batch_size)]

    def calibration_batches(self, size: Optional[int] = None) -> list:
        size = self.calibration_size if size is None else size
        return self.batches(self.train[: min(size, len(self.train))], self.batch_size)

    def full_lora_kwargs(self) -> dict:
        return {**self.lora_kwargs, "target_modules": self.target_modules}


# -----------------------------------------------------------------------------
# method labels: "cntlora-cross@ridge=0.1,base=residual" = a method plus setting overrides

HARNESS_KEYS = ("calib",)  # overrides the harness handles itself (calibration size)
# Seeds run only after the settings they check were picked on seeds 0-4 (bench/quality/run_all.py's
# confirm group): differences on them alone are free of that choice.
FRESH_SEEDS = range(5, 10)
# The sixth session's confirmation (run_all.py's confirm2 group): seeds 10-19, fixed before they ran, for
# the settings that had won on 0-9 only narrowly or against some PEFT inits and not others.
SECOND_FRESH_SEEDS = range(10, 20)


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_label(label: str) -> tuple[str, dict]:
    """'cntlora-cross@ridge=0.1,base=residual' -> ('cntlora-cross', {'ridge': 0.1, 'base': 'residual'})."""
    method, _, rest = label.partition("@")
    if method not in METHODS:
        raise CNTLoRAError(f"unknown method {method!r}; use one of {', '.join(METHODS)} (optionally @key=value,...)")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise CNTLoRAError(f"bad override {item!r} in {label!r}; write key=value, e.g. ridge=0.1")
        overrides[key.strip()] = _parse_value(value.strip())
    return method, overrides


def resolve_label(label: str, lora_kwargs: dict) -> tuple[str, dict, dict, dict]:
    """Split a label's overrides into (method, init overrides, harness settings, LoRA kwargs).

    A rank override keeps the LoRA scale alpha/r, so that only the rank changes; for PEFT's
    methods, r and lora_alpha go into the LoraConfig.
    """
    method, overrides = parse_label(label)
    harness = {k: overrides.pop(k) for k in list(overrides) if k in HARNESS_KEYS}
    lora_kwargs = dict(lora_kwargs)
    ours = method.startswith("cntlora-")
    if "r" in overrides and "alpha" not in overrides and "lora_alpha" not in overrides:
        overrides["alpha" if ours else "lora_alpha"] = overrides["r"] * lora_kwargs.get("lora_alpha", 8) / lora_kwargs.get("r", 8)
    if not ours:
        for key in ("r", "lora_alpha"):
            if key in overrides:
                lora_kwargs[key] = overrides.pop(key)
    return method, overrides, harness, lora_kwargs


# -----------------------------------------------------------------------------
# one training run


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_mode(model: nn.Module, freeze_batchnorm: bool):
    model.train()
    if freeze_batchnorm:  # few-shot batches are too small for batch statistics; keep ImageNet's
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _order(n: int, steps: int, batch_size: int, seed: int) -> list:
    """Example indices for every step: seeded epoch-wise shuffles, the same for every method."""
    g = torch.Generator().manual_seed(seed)
    out, pool = [], []
    for _ in range(steps):
        while len(pool) < batch_size:
            pool += torch.randperm(n, generator=g).tolist()
        out.append(pool[:batch_size])
        pool = pool[batch_size:]
    return out


@torch.no_grad()
def _evaluate(task: Task, model, batches) -> float:
    was_training = model.training
    model.eval()
    value = float(task.metric_fn(model, batches))
    _train_mode(model, task.freeze_batchnorm) if was_training else model.eval()
    return value


def init_model(task: Task, label: str, seed: int, device) -> tuple[nn.Module, float]:
    """Build the seed's model on `device` and initialize it with `label`; returns (model, init seconds)."""
    method, overrides, harness, lora_kwargs = resolve_label(label, task.full_lora_kwargs())
    calibration = task.calibration_batches(harness.get("calib"))
    reference = None
    if overrides.get("pretrain_source") == "reference":
        if not task.reference_batches:
            raise CNTLoRAError(f"{label}: task {task.name!r} has no reference set (Task.reference_batches); give it "
                               "pre-training-like batches, or use pretrain_source=weights")
        reference = list(task.reference_batches)
    torch.manual_seed(seed)
    model = task.build_model(seed).to(device)
    _sync(device)
    t0 = time.perf_counter()
    model = init_method(method, model, lora_kwargs, calibration, forward_fn=task.forward_fn, loss_fn=task.loss_fn,
                        overrides=overrides, seed=seed, reference_batches=reference)
    _sync(device)
    return model.to(device), time.perf_counter() - t0


def fine_tune(task: Task, model: nn.Module, seed: int, lr: float, steps: int, checkpoints, device, eval_sets) -> dict:
    """`steps` AdamW steps at `lr` on an initialized model (in place); the run's losses and metrics."""
    t0 = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    torch.manual_seed(seed + 1)  # dropout draws: the same stream for every method, whatever its init consumed
    marks = sorted({c for c in checkpoints if 0 < c < steps} | {steps})
    val = {0: _evaluate(task, model, eval_sets["val"])}
    losses = []
    _train_mode(model, task.freeze_batchnorm)
    for step, idx in enumerate(_order(len(task.train), steps, task.batch_size, seed), start=1):
        batch = to_device(task.collate([task.train[i] for i in idx]), device)
        loss = task.loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step in marks:
            val[step] = _evaluate(task, model, eval_sets["val"])
    test = _evaluate(task, model, eval_sets["test"])
    return {"trainable_params": trainable, "train_loss": losses, "val": {str(k): v for k, v in val.items()},
            "test": test, "train_seconds": time.perf_counter() - t0}


def train_lrs(task: Task, label: str, seed: int, lrs: Sequence[float], steps: int, checkpoints=DEFAULT_CHECKPOINTS,
              device=None, eval_sets: Optional[dict] = None) -> list:
    """Initialize with `label` once, then fine-tune a copy of the initialized model at each lr; one record per lr.

    Slow inits (EVA, CorDA) then run once per seed instead of once per lr. The copy is a deep
    copy of the whole model, base weights included, since PiSSA, OLoRA, CorDA, LoRA-GA and
    residual CNTLoRA rewrite them; so each record is the run train_once(label, seed, lr) gives.
    Every record carries the one init's time.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    eval_sets = eval_sets or {"val": task.batches(task.val, task.eval_batch_size),
                              "test": task.batches(task.test, task.eval_batch_size)}
    model, init_seconds = init_model(task, label, seed, device)
    records = []
    for i, lr in enumerate(lrs):
        run = model if i == len(lrs) - 1 else copy.deepcopy(model)  # the last lr needs no pristine copy
        records.append({"label": label, "seed": seed, "lr": lr, "steps": steps, "init_seconds": init_seconds,
                        **fine_tune(task, run, seed, lr, steps, checkpoints, device, eval_sets)})
    return records


def train_once(task: Task, label: str, seed: int, lr: float, steps: int, checkpoints=DEFAULT_CHECKPOINTS,
               device=None, eval_sets: Optional[dict] = None) -> dict:
    """Initialize with `label`, fine-tune `steps` AdamW steps at `lr`, return the run's record."""
    return train_lrs(task, label, seed, [lr], steps, checkpoints, device, eval_sets)[0]


def run_quality(task: Task, methods: Sequence[str], seeds: Sequence[int], lrs: Sequence[float], steps: int,
                checkpoints=DEFAULT_CHECKPOINTS, device=None, select_seeds: Optional[int] = None,
                log: Optional[Callable[[str], None]] = print) -> dict:
    """Train every method × lr × seed and return JSON-able results (see summarize()).

    select_seeds: when set, every lr runs on the first `select_seeds` seeds only; the lr with
    the best mean final val metric then runs on the remaining seeds (saves compute, same rule).
    One init per (method, seed) serves all of its lrs (train_lrs).
    """
    eval_sets = {"val": task.batches(task.val, task.eval_batch_size), "test": task.batches(task.test, task.eval_batch_size)}
    runs = []

    def job(label, seed, job_lrs):
        for record in train_lrs(task, label, seed, job_lrs, steps, checkpoints, device, eval_sets):
            runs.append(record)
            if log:
                log(_run_line(task.name, record))

    first = list(seeds) if select_seeds is None else list(seeds)[:select_seeds]
    for label in methods:
        for seed in first:
            job(label, seed, lrs)
        if select_seeds is not None:
            best = choose_lr([r for r in runs if r["label"] == label], task.higher_is_better)
            for seed in list(seeds)[select_seeds:]:
                job(label, seed, [best])
    return results_dict(task, steps, runs)


def _run_line(name: str, r: dict) -> str:
    return (f"{name} {r['label']} seed={r['seed']} lr={r['lr']:g}: val {_final_val(r):.4f} "
            f"test {r['test']:.4f} init {r['init_seconds']:.2f}s train {r.get('train_seconds', 0):.1f}s")


def results_dict(task: Task, steps: int, runs: list) -> dict:
    return {"task": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better, "steps": steps,
            "train_size": len(task.train), "lora_kwargs": {k: v for k, v in task.full_lora_kwargs().items()
                                                           if isinstance(v, (int, float, str, list, type(None)))},
            "runs": runs}


# -----------------------------------------------------------------------------
# statistics


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with df degrees of freedom (Simpson on the density); no scipy needed."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    f = lambda t: math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))
    a = abs(x)
    n = 2000
    h = a / n
    half = (f(0) + f(a) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))) * h / 3
    return 0.5 + half if x >= 0 else 0.5 - half


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile (p >= 1/2) by bisection on t_cdf."""
    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def holm(p_values: dict) -> dict:
    """Holm's step-down adjustment of {name: p}: the family-wise error stays at the level each adjusted p
    is compared with (0.05), however many comparisons the family has."""
    ordered = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for i, name in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - i) * p_values[name]))
        adjusted[name] = running
    return adjusted


def seed_results(method: dict, seeds=None) -> dict:
    """{seed: test metric} of one method's summary entry, on `seeds` only when given."""
    return {int(s): v for s, v in method["test_by_seed"].items() if seeds is None or int(s) in seeds}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def paired_difference(a: dict, b: dict, higher_is_better: bool) -> Optional[dict]:
    """Per-seed a - b over the seeds both have: mean, 95% t-interval, and whether a wins or loses."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, std = mean_std(diffs)
    df = len(diffs) - 1
    half = t_quantile(0.975, df) * std / math.sqrt(len(diffs))
    better = mean - half > 0 if higher_is_better else mean + half < 0
    worse = mean + half < 0 if higher_is_better else mean - half > 0
    # two-sided paired t-test; identical per-seed results (std 0) give p = 1, differing constant ones p = 0
    p = (1.0 if mean == 0 else 0.0) if std == 0 else 2 * (1 - t_cdf(abs(mean) / (std / math.sqrt(len(diffs))), df))
    return {"mean": mean, "ci95": [mean - half, mean + half], "seeds": len(seeds), "p": min(1.0, max(0.0, p)),
            "verdict": "win" if better else "loss" if worse else "tie"}


def _final_val(run) -> float:
    return run["val"][str(run["steps"])]


def choose_lr(runs: list, higher_is_better: bool) -> float:
    """The lr with the best mean final validation metric (ties: the smaller lr).

    Only the seeds every lr ran on count, so the extra seeds that select_seeds adds at the
    chosen lr cannot change the choice afterwards.
    """
    seeds_by_lr = {}
    for r in runs:
        seeds_by_lr.setdefault(r["lr"], set()).add(r["seed"])
    common = set.intersection(*seeds_by_lr.values())
    by_lr = {}
    for r in runs:
        if r["seed"] in common:
            by_lr.setdefault(r["lr"], []).append(_final_val(r))
    sign = 1 if higher_is_better else -1
    return max(sorted(by_lr), key=lambda lr: sign * sum(by_lr[lr]) / len(by_lr[lr]))


def summarize(results: dict, reference: str = "default") -> dict:
    """Per method label: chosen lr, test mean/std, steps-to-target, loss AUC, paired differences."""
    hib = results["higher_is_better"]
    steps = results["steps"]
    labels = list(dict.fromkeys(r["label"] for r in results["runs"]))
    # canonical methods in METHODS order, then variants in the order they ran
    labels.sort(key=lambda l: METHODS.index(l) if l in METHODS else len(METHODS))
    methods = {}
    for label in labels:
        mine = [r for r in results["runs"] if r["label"] == label]
        lr = choose_lr(mine, hib)
        at = [r for r in mine if r["lr"] == lr]
        test_mean, test_std = mean_std([r["test"] for r in at])
        marks = sorted({int(k) for r in at for k in r["val"]})
        val_curve = {m: mean_std([r["val"][str(m)] for r in at if str(m) in r["val"]])[0] for m in marks}
        loss_curve = [sum(r["train_loss"][i] for r in at) / len(at) for i in range(steps)]
        methods[label] = {
            "lr": lr, "test_mean": test_mean, "test_std": test_std, "seeds": len(at),
            "init_seconds": sum(r["init_seconds"] for r in at) / len(at),
            "trainable_params": at[0]["trainable_params"],
            "val_final": val_curve[steps], "val_curve": {str(k): v for k, v in val_curve.items()},
            # area under the train-loss curve per step (trapezoid), i.e. the mean loss over training
            "loss_auc": sum((loss_curve[i] + loss_curve[i + 1]) / 2 for i in range(steps - 1)) / max(steps - 1, 1),
            "loss_curve": loss_curve,
            "test_by_seed": {str(r["seed"]): r["test"] for r in at},
        }
    if reference in methods:
        target = methods[reference]["val_final"]
        for m in methods.values():
            reached = [k for k, v in sorted((int(k), v) for k, v in m["val_curve"].items())
                       if k > 0 and (v >= target if hib else v <= target)]
            m["steps_to_target"] = reached[0] if reached else None
    baselines = [l for l in labels if not l.startswith("cntlora-")]
    sign = 1 if hib else -1
    best = max(baselines, key=lambda l: sign * methods[l]["val_final"]) if baselines else None
    seeds_of = lambda l: seed_results(methods[l])
    for label, m in methods.items():
        m["vs_default"] = paired_difference(seeds_of(label), seeds_of(reference), hib) if reference in methods and label != reference else None
        m["vs_best_baseline"] = paired_difference(seeds_of(label), seeds_of(best), hib) if best and label != best else None
    return {"task": results["task"], "metric": results["metric"], "higher_is_better": hib, "steps": steps,
            "train_size": results.get("train_size"), "best_baseline": best, "reference": reference, "methods": methods}


def summary_entry(summary: dict, only: Sequence[str] = METHODS) -> dict:
    """The task's entry in bench/results/summary.json, in exactly the shape other tools read.

    Only the canonical method names go in (`only`); variants such as 'cntlora-cross@ridge=0.1'
    stay in the per-task JSON.
    """
    return {"metric": summary["metric"], "higher_is_better": summary["higher_is_better"], "steps": summary["steps"],
            "methods": {label: {"lr": m["lr"], "test_mean": m["test_mean"], "test_std": m["test_std"],
                                "seeds": m["seeds"], "steps_to_target": m.get("steps_to_target"),
                                "init_seconds": m["init_seconds"]}
                        for label, m in summary["methods"].items() if label in only}}


def write_json(path, data) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, allow_nan=False)))


def update_summary(path, task_name: str, entry: dict) -> dict:
    """Merge one task's entry into summary.json (other tasks' entries are kept)."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"tasks": {}}
    data["tasks"][task_name] = entry
    write_json(path, data)
    return data


# -----------------------------------------------------------------------------
# several worker processes sharing one device (small models leave a GPU mostly idle)

_WORKER = {}


def _worker_init(threads):
    torch.set_num_threads(threads)


def _worker_job(task_name, task_kwargs, label, seed, lrs, steps, checkpoints, device):
    from .tasks import make_task

    key = (task_name, tuple(sorted(task_kwargs.items())))
    if key not in _WORKER:  # each worker builds a task once (loading models, tokenizing)
        _WORKER[key] = make_task(task_name, **task_kwargs)
    return train_lrs(_WORKER[key], label, seed, lrs, steps, checkpoints, device)


@dataclass
class Spec:
    """One run_quality call on a named task (tasks.TASKS), for run_many."""

    name: str
    task: str
    methods: Sequence[str]
    seeds: Sequence[int]
    lrs: Sequence[float]
    steps: int
    task_kwargs: dict = field(default_factory=dict)
    checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS
    select_seeds: Optional[int] = None


def first_seeds(spec: Spec) -> list:
    """The seeds that run every lr of the spec (all of them unless select_seeds is set)."""
    return list(spec.seeds) if spec.select_seeds is None else list(spec.seeds)[: spec.select_seeds]


def run_many(specs: Sequence[Spec], workers: int = 4, device=None, on_run: Optional[Callable[[str, dict], None]] = None,
             log: Optional[Callable[[str], None]] = print, on_start: Optional[Callable[[str, dict], None]] = None) -> dict:
    """Several run_quality calls on named tasks, spread over `workers` processes sharing one device.

    The same protocol as run_quality (select_seeds included); returns {spec.name: results}.
    on_run(spec_name, record) sees every finished run, e.g. to append it to a log file;
    on_start(spec_name, results without runs) sees each spec's task description first.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from .tasks import make_task

    selecting = [spec.name for spec in specs if spec.select_seeds is not None]
    if len(set(selecting)) < len(selecting):
        raise CNTLoRAError(f"specs that select an lr need their own names (run_many counts their runs by name); "
                           f"rename the repeated ones among {sorted(selecting)}")
    built = {}
    for spec in specs:
        for label in spec.methods:
            parse_label(label)
        key = (spec.task, tuple(sorted(spec.task_kwargs.items())))
        if key not in built:
            built[key] = make_task(spec.task, **spec.task_kwargs)
    task_of = {spec.name: built[(spec.task, tuple(sorted(spec.task_kwargs.items())))] for spec in specs}
    runs = {spec.name: [] for spec in specs}
    if on_start:
        for spec in specs:
            on_start(spec.name, {**results_dict(task_of[spec.name], spec.steps, []), "task": spec.name})
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    # a job is one init, (label, seed), trained at each of its lrs (train_lrs). Jobs run in
    # priority order (earlier specs first, a spec's extra seeds as soon as its lrs are chosen),
    # so a run cut short by a time limit has finished whole specs, not slices of all
    waiting = [(i, spec, label, seed, tuple(spec.lrs)) for i, spec in enumerate(specs) for label in spec.methods
               for seed in first_seeds(spec)]
    left = {spec.name: len(spec.methods) * len(first_seeds(spec)) for spec in specs}
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        running = {}

        def fill():
            waiting.sort(key=lambda job: job[0])
            while waiting and len(running) < workers + 2:
                i, spec, label, seed, lrs = waiting.pop(0)
                f = pool.submit(_worker_job, spec.task, spec.task_kwargs, label, seed, lrs, spec.steps,
                                tuple(spec.checkpoints), device)
                running[f] = (spec, label, seed)

        fill()
        while running:
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in done:
                spec, label, seed = running.pop(f)
                try:
                    records = f.result()
                except Exception as e:  # one failing init (e.g. a PEFT method on a new model) must not end the run
                    records = []
                    if log:
                        log(f"{spec.name} {label} seed={seed}: FAILED: {type(e).__name__}: {e}")
                for r in records:
                    runs[spec.name].append(r)
                    if on_run:
                        on_run(spec.name, r)
                    if log:
                        log(_run_line(spec.name, r))
                left[spec.name] -= 1
                if left[spec.name] == 0 and spec.select_seeds is not None:
                    hib = task_of[spec.name].higher_is_better
                    index = specs.index(spec)
                    for name in spec.methods:
                        mine = [x for x in runs[spec.name] if x["label"] == name]
                        if mine:  # none when every job of this label failed
                            best = choose_lr(mine, hib)
                            waiting.extend((index, spec, name, s, (best,)) for s in list(spec.seeds)[spec.select_seeds :])
            fill()
    out = {}
    for spec in specs:
        out[spec.name] = results_dict(task_of[spec.name], spec.steps, runs[spec.name])
        out[spec.name]["task"] = spec.name
    return out


# -----------------------------------------------------------------------------
# sensitivity study of the default mode (Self): one setting at a time, the others at their defaults

SENSITIVITY = {
    "ridge": [1e-3, 1e-2, 1e-1, 1.0],
    "gamma": [0.1, 1.0, 10.0],
    "calib": [16, 64, 256],
    "r": [4, 8, 16],
}
# which method each sweep varies: γ exists in Cross mode only; "r-vas" is VAS at the uniform rank's budget
SENSITIVITY_METHOD = {"ridge": "cntlora-self", "gamma": "cntlora-cross", "calib": "cntlora-self", "r": "cntlora-self",
                      "r-vas": "cntlora-self-vas"}
# the defaults (CNTLoRAConfig's, and the text and vision tasks' calibration size and rank)
SENSITIVITY_DEFAULT = {"ridge": CNTLoRAConfig.ridge, "gamma": CNTLoRAConfig.gamma, "calib": 64, "r": 8}


def sensitivity_labels() -> dict:
    """{sweep: [(value, label), ...]}; sweeps are SENSITIVITY's keys plus "r-vas".

    The default value runs as the plain method label ('cntlora-self', not 'cntlora-self@ridge=0.01'),
    so the sweeps of one method share that run instead of repeating it.
    """
    out = {}
    for sweep, method in SENSITIVITY_METHOD.items():
        key = sweep.removesuffix("-vas")
        out[sweep] = [(v, method if v == SENSITIVITY_DEFAULT[key] else f"{method}@{key}={v:g}") for v in SENSITIVITY[key]]
    return out


def plot_sensitivity(summary: dict, out, reference: Optional[dict] = None) -> Path:
    """Final test metric (mean ± std over seeds) against each swept setting, one panel each.

    reference: a summary's entry for PEFT's default LoRA (e.g. from the task's headline table),
    drawn as a line; by default the sensitivity summary's own 'default', if it has one.
    """
    plt = _pyplot()
    name = summary["task"].removesuffix("-sensitivity")
    sweeps = sensitivity_labels()
    reference = reference or summary["methods"].get("default")
    fig, axes = plt.subplots(1, len(SENSITIVITY), figsize=(4 * len(SENSITIVITY), 3.6))
    for ax, key in zip(axes, SENSITIVITY):
        for sweep in [key] + (["r-vas"] if key == "r" else []):
            pts = [(v, summary["methods"][l]) for v, l in sweeps[sweep] if l in summary["methods"]]
            if pts:
                ax.errorbar([v for v, _ in pts], [m["test_mean"] for _, m in pts], yerr=[m["test_std"] for _, m in pts],
                            marker="o", capsize=3, label=SENSITIVITY_METHOD[sweep])
        if key in ("ridge", "gamma", "calib"):
            ax.set_xscale("log")
        ax.set_xticks(SENSITIVITY[key], [f"{v:g}" for v in SENSITIVITY[key]])  # the swept values, no log-scale clutter
        ax.minorticks_off()
        if reference:
            ax.axhline(reference["test_mean"], color="gray", ls="--", label="PEFT default")
        ax.set_xlabel(key)
        ax.set_ylabel(f"test {summary['metric']}")
        ax.legend(fontsize=7)
    fig.suptitle(f"{name}: sensitivity of CNTLoRA (Self; γ on Cross)")
    fig.tight_layout()
    path = Path(out) / f"sensitivity-{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------
# run logs (bench/quality/run_all.py appends one JSON line per finished run)


def table_name(spec_name: str) -> str:
    """'text-fewshot+a_row_norm' -> 'text-fewshot': a spec named TABLE+PART adds its runs to TABLE."""
    return spec_name.partition("+")[0]


def load_runs(paths) -> dict:
    """Run logs (oldest first) -> {table: results as summarize() takes them}.

    Each line is {"kind": "meta"|"run", "spec": NAME, "data": ...}. Specs named TABLE+PART fold
    into TABLE (they must agree on metric, steps and train size). A run logged more than once
    (same table, label, seed and lr; e.g. by an earlier session and by this one) counts once:
    the latest line wins.
    """
    metas, runs = {}, {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            name = table_name(row["spec"])
            if row["kind"] == "meta":
                meta = metas.setdefault(name, {**row["data"], "task": name})
                keys = ("metric", "higher_is_better", "steps", "train_size")
                if any(meta.get(k) != row["data"].get(k) for k in keys):
                    raise CNTLoRAError(f"spec {row['spec']!r} in {path} differs from the other specs of table {name!r} "
                                       f"in {', '.join(keys)}; give it a name of its own")
            elif row["kind"] == "run":
                r = row["data"]
                runs.setdefault(name, {})[(r["label"], r["seed"], r["lr"])] = r
    return {name: {**meta, "runs": list(runs[name].values())} for name, meta in metas.items() if runs.get(name)}


# -----------------------------------------------------------------------------
# plots (PNG, matplotlib's Agg backend: no display needed)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values, window):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_task(summary: dict, out) -> list:
    """Train-loss curves (every method on one figure) and a bar chart of test metric ± std."""
    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = summary["task"]
    labels = list(summary["methods"])
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, label in enumerate(labels):
        m = summary["methods"][label]
        style = "-" if label.startswith("cntlora-") else "--"
        curve = _smooth(m["loss_curve"], max(1, summary["steps"] // 20))
        ax.plot(range(1, len(curve) + 1), curve, style, color=plt.cm.tab20(i % 20), label=f"{label} (lr {m['lr']:g})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (moving average, mean over seeds)")
    ax.set_yscale("log")
    ax.set_title(f"{name}: train loss at each method's chosen lr")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    loss_png = out / f"quality-{name}-loss.png"
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    means = [summary["methods"][l]["test_mean"] for l in labels]
    stds = [summary["methods"][l]["test_std"] for l in labels]
    colors = ["tab:blue" if l.startswith("cntlora-") else "tab:gray" for l in labels]
    ax.bar(range(len(labels)), means, yerr=stds, color=colors, capsize=3)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    lo, hi = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
    pad = 0.15 * (hi - lo) + 1e-6
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(f"test {summary['metric']} (mean ± std over seeds)")
    ax.set_title(f"{name}: final test {summary['metric']}")
    fig.tight_layout()
    bar_png = out / f"quality-{name}-test.png"
    fig.savefig(bar_png, dpi=110)
    plt.close(fig)
    return [loss_png, bar_png]


# -----------------------------------------------------------------------------
# CLI


def add_arguments(parser) -> None:
    from .tasks import TASKS

    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="which task to run")
    parser.add_argument("--quick", action="store_true", help="a few steps on a tiny slice, one seed, one lr (smoke test)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"method labels (default: all of {', '.join(METHODS)}); add @key=value,... to override settings")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    parser.add_argument("--select-seeds", type=int, default=None, help="pick each method's lr on the first K seeds only")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="learning-rate grid")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--train-size", type=int, default=None, help="training examples (default: the task's)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON results and plots")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (one device shared)")


def run(args) -> int:
    from .tasks import make_task

    quick = args.quick
    task_kwargs = {"quick": True} if quick else {}
    if args.train_size is not None:
        task_kwargs["train_size"] = args.train_size
    methods = args.methods or list(METHODS)
    seeds = [0] if quick else list(range(args.seeds))
    lrs = args.lrs[:1] if quick else args.lrs
    steps = 3 if quick else args.steps
    checkpoints = (1, 2) if quick else DEFAULT_CHECKPOINTS
    for label in methods:
        parse_label(label)  # fail before any training on a bad label
    if args.workers > 1:
        spec = Spec(args.task, args.task, methods, seeds, lrs, steps, task_kwargs, checkpoints, args.select_seeds)
        results = run_many([spec], args.workers, args.device)[args.task]
    else:
        task = make_task(args.task, **task_kwargs)
        results = run_quality(task, methods, seeds, lrs, steps, checkpoints, args.device, args.select_seeds)
    name = results["task"]
    out = Path(args.out)
    summary = summarize(results)
    write_json(out / f"quality-{name}.json", {"results": results, "summary": summary})
    update_summary(out / "summary.json", name, summary_entry(summary))
    if not quick or os.environ.get("CNTLORA_BENCH_PLOTS"):
        plot_task(summary, out)
    print(format_table(summary))
    return 0


def fresh_seed_check(summary: dict, seeds=FRESH_SEEDS) -> dict:
    """{label: paired differences against default and the best baseline on `seeds` alone}, for every label
    that ran all of them, the reference and the best baseline included where they did."""
    hib = summary["higher_is_better"]
    by_seed = {label: seed_results(m, seeds) for label, m in summary["methods"].items()}
    ran = {label: b for label, b in by_seed.items() if set(b) >= set(seeds)}
    out = {}
    for label, b in ran.items():
        out[label] = {"test_mean": sum(b.values()) / len(b), "seeds": len(b),
                      **{key: paired_difference(b, ran[other], hib) if other in ran and other != label else None
                         for key, other in (("vs_default", summary["reference"]),
                                            ("vs_best_baseline", summary["best_baseline"]))}}
    return out


def format_fresh_table(summary: dict, check: dict, seeds=FRESH_SEEDS) -> str:
    """The markdown table of fresh_seed_check, headed like format_table's with the seeds named."""
    rows = [f"### {summary['task']}, fresh seeds {min(seeds)}-{max(seeds)} ({summary['metric']}, "
            f"{'higher' if summary['higher_is_better'] else 'lower'} is better; best baseline "
            f"{summary['best_baseline']}, chosen on validation over all seeds)", "",
            "| method | test mean | seeds | Δ vs default [95% CI] | Δ vs best baseline [95% CI] |", "|---|---|---|---|---|"]
    for label, c in check.items():
        rows.append(f"| {label} | {c['test_mean']:.4f} | {c['seeds']} | {_delta(c['vs_default'])} | "
                    f"{_delta(c['vs_best_baseline'])} |")
    return "\n".join(rows)


def against_every_baseline(summary: dict, min_seeds: int = 10) -> dict:
    """{cntlora label: {PEFT init: paired difference + Holm's p over that label's PEFT inits}} for every
    CNTLoRA label and PEFT init (labels without 'cntlora-') that ran at least `min_seeds` seeds: a win
    over the best PEFT init chosen on validation says nothing about the others, and a win over each of
    several needs its p corrected for their number."""
    hib = summary["higher_is_better"]
    seeds_of = {label: seed_results(m) for label, m in summary["methods"].items() if m["seeds"] >= min_seeds}
    ours = [label for label in seeds_of if label.startswith("cntlora-")]
    theirs = [label for label in seeds_of if not label.startswith("cntlora-")]
    out = {}
    for label in ours:
        diffs = {b: paired_difference(seeds_of[label], seeds_of[b], hib) for b in theirs}
        diffs = {b: d for b, d in diffs.items() if d}
        adjusted = holm({b: d["p"] for b, d in diffs.items()})
        out[label] = {b: {**d, "p_holm": adjusted[b]} for b, d in diffs.items()}
    return out


def format_every_baseline_table(summary: dict, comparisons: dict) -> str:
    """The markdown table of against_every_baseline: one row per CNTLoRA label, one column per PEFT init."""
    hib = summary["higher_is_better"]
    theirs = list(dict.fromkeys(b for row in comparisons.values() for b in row))
    rows = [f"### {summary['task']} against every PEFT init ({summary['metric']}, {'higher' if hib else 'lower'} is "
            "better; Δ over the seeds both ran, two-sided paired t-test p, Holm's p over the row's PEFT inits)", "",
            "| method | " + " | ".join(theirs) + " |", "|---|" + "---|" * len(theirs)]
    for label, row in comparisons.items():
        cells = []
        for b in theirs:
            d = row.get(b)
            if not d:
                cells.append("–")
                continue
            good = d["mean"] > 0 if hib else d["mean"] < 0
            mark = (" **win**" if good else " **loss**") if d["p_holm"] < 0.05 else ""
            cells.append(f"{d['mean']:+.4f} ({d['seeds']} seeds, p {d['p']:.2g}, Holm {d['p_holm']:.2g}){mark}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _delta(d) -> str:
    if not d:
        return "–"
    return f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] {d['verdict']}"


def format_table(summary: dict) -> str:
    """A markdown table: method, lr, test mean ± std, steps-to-target, init seconds, paired deltas."""
    rows = [f"### {summary['task']} ({summary['metric']}, {'higher' if summary['higher_is_better'] else 'lower'} is better, "
            f"{summary['steps']} steps, {summary.get('train_size')} train examples)", "",
            "| method | lr | test mean ± std | seeds | steps-to-target | loss AUC | init s | Δ vs default [95% CI] | Δ vs best baseline [95% CI] |",
            "|---|---|---|---|---|---|---|---|---|"]

    for label, m in summary["methods"].items():
        stt = m.get("steps_to_target")
        rows.append(f"| {label} | {m['lr']:g} | {m['test_mean']:.4f} ± {m['test_std']:.4f} | {m['seeds']} | "
                    f"{'–' if stt is None else stt} | {m['loss_auc']:.4f} | {m['init_seconds']:.2f} | "
                    f"{_delta(m['vs_default'])} | {_delta(m['vs_best_baseline'])} |")
    return "\n".join(rows)
