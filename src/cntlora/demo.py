"""The main job: CNTLoRA vs PEFT's default LoRA, fine-tuning all-MiniLM-L6-v2 on BBC News.

Both runs share everything except the LoRA initialization: the base model and its seeded
head, rank, target modules, modules_to_save, data order, dropout masks, optimizer, learning
rate and steps. Sized to finish well under 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .apply import initialize
from .config import CNTLoRAConfig
from .data import BATCH_SIZE, CALIBRATION_SIZE, MAX_LENGTH, calibration_subset, calibration_summary, text_batches
from .files import atomic_write, write_json
from .training import batch_order, train_mode, train_step


@dataclass
class DemoSettings:
    """The demo's task and training settings; both runs use all of them."""

    steps: int = 100
    seed: int = 0
    train_size: int = 800
    test_size: int = 400
    max_length: int = MAX_LENGTH
    batch_size: int = BATCH_SIZE
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip: Optional[float] = 1.0  # the max gradient norm, as in the benchmark; None: no clipping
    checkpoint_every: int = 10
    calibration_size: Optional[int] = CALIBRATION_SIZE  # training examples CNTLoRA's statistics see; None: all
    target_modules: List[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])
    head: str = "classifier"


@dataclass
class Run:
    """One fine-tuning run and the RNG stream its dropout draws from."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: List[torch.nn.Parameter]
    rng_state: torch.Tensor
    init_seconds: float
    losses: List[float] = field(default_factory=list)
    train_seconds: float = 0.0


def split_data(texts, labels, settings: DemoSettings):
    """Disjoint train and test sets after a seeded shuffle (BBC News is stored sorted by class).

    Args:
        texts, labels: the whole data set; settings: train_size, test_size and seed.
    Returns:
        ((train texts, train labels), (test texts, test labels)).
    Raises:
        ValueError: train_size + test_size exceeds the data.
    """
    need = settings.train_size + settings.test_size
    if need > len(texts):
        raise ValueError(f"train_size + test_size = {need} exceeds the {len(texts)} BBC News articles")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(settings.seed)).tolist()
    pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    return pick(order[: settings.train_size]), pick(order[settings.train_size : need])


def _encode(tokenizer, texts, labels, max_length) -> Dict[str, torch.Tensor]:
    """Every example as one batch of tensors, padded to max_length (so any rows can be taken together)."""
    return text_batches(tokenizer, texts, len(texts), max_length, labels=labels, padding="max_length")[0]


def _take(data: Dict[str, torch.Tensor], idx) -> Dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in data.items()}


def _lora_config(settings: DemoSettings, cfg: CNTLoRAConfig, init_lora_weights=True):
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, use_rslora=cfg.use_rslora, target_modules=settings.target_modules,
                      modules_to_save=[settings.head], init_lora_weights=init_lora_weights)


def _make_run(name, model, settings: DemoSettings, init_seconds: float) -> Run:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    # both runs start from the same RNG state, so their dropout masks match step for step
    rng = torch.Generator().manual_seed(settings.seed).get_state()
    return Run(name, model, optimizer, params, rng, init_seconds)


def _advance(run: Run, batch: Dict[str, torch.Tensor], settings: DemoSettings) -> float:
    """One training step of `run` on its own RNG stream (its dropout masks)."""
    t0 = time.perf_counter()
    torch.set_rng_state(run.rng_state)
    train_mode(run.model)
    loss = train_step(run.model, batch, lambda m, b: m(**b).loss, run.optimizer, params=run.params, clip=settings.clip)
    run.rng_state = torch.get_rng_state()
    run.losses.append(loss)
    run.train_seconds += time.perf_counter() - t0
    return loss


@torch.no_grad()
def _evaluate(model, data: Dict[str, torch.Tensor], batch_size: int) -> Dict[str, float]:
    model.eval()
    correct, loss_sum, n = 0, 0.0, len(data["labels"])
    for i in range(0, n, batch_size):
        batch = _take(data, slice(i, i + batch_size))
        out = model(**batch)
        loss_sum += float(out.loss) * len(batch["labels"])
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    return {"accuracy": correct / n, "loss": loss_sum / n}


def _plot_losses(runs: List[Run], settings: DemoSettings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    window = max(1, settings.checkpoint_every)
    for run, color in zip(runs, ("tab:red", "tab:blue")):
        steps = range(1, len(run.losses) + 1)
        ax.plot(steps, run.losses, color=color, alpha=0.25, linewidth=1)
        smooth = [sum(run.losses[max(0, i - window + 1) : i + 1]) / min(window, i + 1) for i in range(len(run.losses))]
        ax.plot(steps, smooth, color=color, linewidth=2, label=f"{run.name} ({window}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (cross-entropy)")
    ax.set_title(f"all-MiniLM-L6-v2 on BBC News: LoRA r={runs[0].model.peft_config['default'].r}, "
                 f"batch {settings.batch_size}, lr {settings.lr:g}, seed {settings.seed}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(str(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def run_demo(out_dir="runs/demo", settings: Optional[DemoSettings] = None, config: Optional[CNTLoRAConfig] = None,
             log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Fine-tune CNTLoRA and PEFT's default LoRA side by side on BBC News.

    Args:
        out_dir: where results.json, loss.png and the trained CNTLoRA adapter (plain PEFT,
            adapter/) are written.
        settings: the task and training settings (default DemoSettings()).
        config: CNTLoRA's settings (default: the library's, seeded with settings.seed).
        log: called with each line of the report.
        progress: show progress bars while collecting statistics.

    Returns:
        The results, as written to results.json.

    Raises:
        ValueError: steps < 1, or a data split larger than BBC News.
        RuntimeError: a packaged model or data set is missing (the message has the pip command).
    """
    import peft
    import transformers
    from peft import get_peft_model

    from . import zoo
    from .export import export_plain_lora

    settings = settings or DemoSettings()
    config = config or CNTLoRAConfig(seed=settings.seed)
    if settings.steps < 1:
        raise ValueError(f"steps must be at least 1, got {settings.steps}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    texts, labels, class_names = zoo.bbc_news()
    (train_texts, train_labels), (test_texts, test_labels) = split_data(texts, labels, settings)
    model, tokenizer = zoo.load_minilm(num_labels=len(class_names))
    train = _encode(tokenizer, train_texts, train_labels, settings.max_length)
    test = _encode(tokenizer, test_texts, test_labels, settings.max_length)
    order = batch_order(len(train_labels), settings.steps, settings.batch_size, settings.seed)
    log(f"BBC News: {len(train_labels)} train / {len(test_labels)} test articles, max_length {settings.max_length}; "
        f"{settings.steps} steps of batch {settings.batch_size}, AdamW lr {settings.lr:g}, "
        f"{torch.get_num_threads()} CPU threads")

    # CNTLoRA: statistics of a calibration subset of the training data through the frozen model -> B, A
    t0 = time.perf_counter()
    pick = calibration_subset(range(len(train_labels)), settings.calibration_size, settings.seed)
    stats_data = [_take(train, pick[i:i + settings.batch_size]) for i in range(0, len(pick), settings.batch_size)]
    calibration = calibration_summary(stats_data, len(train_labels))
    log(f"CNTLoRA calibration: {calibration}")
    cnt_model = initialize(model, stats_data, config, target_modules=settings.target_modules,
                           lora_config=_lora_config(settings, config, init_lora_weights=False), progress=progress)
    cnt = _make_run("CNTLoRA", cnt_model, settings, time.perf_counter() - t0)
    plan = cnt_model.cntlora_plan
    log(f"CNTLoRA init: {cnt.init_seconds:.1f} s (collect {plan.timings.get('collect', 0):.1f} s, "
        f"solve {plan.timings['solve']:.1f} s, decompose {plan.timings['decompose']:.1f} s); "
        f"{len(plan.adapted)} layers, mode={config.mode}, base={config.base}, r={config.r}, alpha={config.alpha:g}")

    # PEFT's default LoRA (kaiming-uniform A, zero B) on a fresh copy of the same base and head
    base, _ = zoo.load_minilm(num_labels=len(class_names))
    t0 = time.perf_counter()
    torch.manual_seed(settings.seed)
    lora_model = get_peft_model(base, _lora_config(settings, config))
    lora = _make_run("LoRA (PEFT default)", lora_model, settings, time.perf_counter() - t0)
    runs = [cnt, lora]

    log(f"{'step':>5}  {'CNTLoRA loss':>12}  {'LoRA loss':>10}   (mean train loss since the last checkpoint)")
    checkpoints = []
    for step, idx in enumerate(order, start=1):
        batch = _take(train, idx)
        for run in runs:
            _advance(run, batch, settings)
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            since = (step - 1) // settings.checkpoint_every * settings.checkpoint_every
            means = [sum(r.losses[since:]) / len(r.losses[since:]) for r in runs]
            checkpoints.append({"step": step, "cntlora": means[0], "lora": means[1]})
            log(f"{step:>5}  {means[0]:>12.4f}  {means[1]:>10.4f}")

    scores = [_evaluate(r.model, test, settings.batch_size * 2) for r in runs]
    for run, score in zip(runs, scores):
        log(f"{run.name:<20} test accuracy {score['accuracy']:.2%}  test loss {score['loss']:.4f}  "
            f"(init {run.init_seconds:.2f} s, train {run.train_seconds:.1f} s)")

    export_plain_lora(cnt_model, out / "adapter")
    results = {
        "task": "all-MiniLM-L6-v2 + new 5-class head, BBC News topic classification",
        "settings": asdict(settings),
        "cntlora_config": config.to_dict(),
        "calibration": calibration,
        "runs": {
            key: {"name": r.name, "init_seconds": r.init_seconds, "train_seconds": r.train_seconds,
                  "losses": r.losses, "test": s}
            for key, r, s in zip(("cntlora", "lora"), runs, scores)
        },
        "checkpoints": checkpoints,
        "cntlora_timings": dict(plan.timings),
        "total_seconds": time.perf_counter() - started,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "peft": peft.__version__},
    }
    _plot_losses(runs, settings, out / "loss.png")
    write_json(out / "results.json", results)
    log(f"wrote {out / 'results.json'}, {out / 'loss.png'} and the trained CNTLoRA adapter {out / 'adapter'} "
        f"({results['total_seconds']:.0f} s in all)")
    return results
