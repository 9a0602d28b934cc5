"""Which input directions each init's A reads, measured against the task's and pre-training's layer inputs.

    python -m bench.vit.directions --out bench/results/vit   # CPU, about 20 minutes

For every suite task (1k regime, seed 0) and init, every adapted module's lora_A (r × n) is
reduced to Q, an orthonormal basis of its row space: the input directions the adapter reads
at step 0 (B = 0 in all four inits, so only this row space and its scale act; the measures
ignore the scale). With C_f the second moment of the module's input over the task's 128
calibration images (its first 128 training images) and C_p that over the true pre-training
sample (4,096 Fashion-MNIST training images), both taken on the pre-trained ViT (q, k and v
share q_proj's input):
**fine_read** = tr(Qᵀ C_f Q) / (sum of the r largest eigenvalues of C_f): the share of the
fine-tuning input energy an r-dimensional row space could read at best that A's does read
(1 when it spans C_f's top-r eigenvectors); **excess_read** = (tr(Qᵀ C_f Q) / tr C_f) /
(tr(Qᵀ C_p Q) / tr C_p): how many times larger A's directions' share of the input energy is in
fine-tuning than in pre-training (1 when equal). Numbers are medians over the 48 modules.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..quality.protocol import init_model
from .model import load_pretrained
from .plan import TASK_ORDER
from .shift import INPUTS, second_moments
from .tasks import CALIBRATION, _arrays, suite_file, vit_task

LABELS = ("default", "cntlora-self", "cntlora-cross@pretrain_source=reference",
          "cntlora-shift@pretrain_source=reference")
SHORT = dict(zip(LABELS, ("default", "self", "cross(true)", "shift(true)")))
MEASURES = ("fine_read", "excess_read")
SHARED = {"k_proj": "q_proj", "v_proj": "q_proj"}  # layers that read q_proj's input


def read_shares(a: torch.Tensor, fine: torch.Tensor, pre: torch.Tensor, r: int | None = None) -> dict:
    """fine_read and excess_read of the row space of `a` (see the module docstring).

    Args:
        a: lora_A's weight, r × n.
        fine: C_f, the fine-tuning inputs' n×n second moment.
        pre: C_p, the pre-training inputs' n×n second moment.
        r: the rank the best case is taken at (default: a's rows).

    Returns:
        {"fine_read": ..., "excess_read": ...}, computed in float64.
    """
    r = a.shape[0] if r is None else r
    q, _ = torch.linalg.qr(a.double().T)  # n × r, orthonormal columns spanning A's row space
    f, p = fine.double(), pre.double()
    f, p = (f + f.T) / 2, (p + p.T) / 2
    read_f = torch.trace(q.T @ f @ q)
    read_p = torch.trace(q.T @ p @ q)
    best = torch.linalg.eigvalsh(f)[-r:].sum()
    return {"fine_read": float(read_f / best),
            "excess_read": float((read_f / torch.trace(f)) / (read_p / torch.trace(p)))}


def measure(path: Path | None = None, labels=LABELS, tasks=TASK_ORDER) -> dict:
    """Per task and label, both measures for every adapted module, their medians and per-kind medians.

    Args:
        path: the suite's .npz (default: tasks.suite_file()).
        labels: method labels to initialize with (seed 0, CPU).
        tasks: suite task names.

    Returns:
        {task: {label: {"layers": {module: {measure: x}}, "median": {measure: x},
        "by_input": {kind: {measure: x}}, "init_seconds": s}}}.
    """
    from tqdm import tqdm

    z = _arrays(Path(path or suite_file()))
    base = load_pretrained()
    names = [n for n, _ in base.named_modules() if n.endswith(tuple("." + s for s in INPUTS.values()))]
    pre = second_moments(base, z["reference_x"], names)
    out = {}
    for task in tqdm(tasks, desc="directions", unit="task"):
        fine = second_moments(base, z[f"{task}/train_x"][:CALIBRATION[False]], names)
        harness_task = vit_task(task, fewshot=False, path=path)
        out[task] = {}
        for label in labels:
            model, seconds = init_model(harness_task, label, 0, torch.device("cpu"))
            layers, kinds = {}, {}
            for name, module in model.named_modules():
                if not name.endswith("lora_A.default"):
                    continue
                layer = name.removeprefix("base_model.model.").removesuffix(".lora_A.default")
                stem, leaf = layer.rsplit(".", 1)
                source = f"{stem}.{SHARED.get(leaf, leaf)}"
                layers[layer] = read_shares(module.weight.detach(), fine[source], pre[source])
                kinds[layer] = next(k for k, s in INPUTS.items() if source.endswith(s))
            med = {m: float(np.median([v[m] for v in layers.values()])) for m in MEASURES}
            by_input = {k: {m: float(np.median([v[m] for n, v in layers.items() if kinds[n] == k])) for m in MEASURES}
                        for k in INPUTS}
            out[task][label] = {"layers": layers, "median": med, "by_input": by_input, "init_seconds": seconds}
            del model
    return out


def write(results: dict, out: Path) -> None:
    """directions.json, directions.md (the medians' table) and directions.png (both measures per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "directions.json").write_text(json.dumps(results, indent=1))
    tasks = [t for t in TASK_ORDER if t in results]
    labels = list(results[tasks[0]])
    head = "| task | " + " | ".join(f"{m} {SHORT.get(lb, lb)}" for m in MEASURES for lb in labels) + " |"
    rows = [head, "|---|" + "---:|" * (len(MEASURES) * len(labels))]
    for task in tasks:
        rows.append(f"| {task} | " + " | ".join(f"{results[task][lb]['median'][m]:.3f}" for m in MEASURES
                                               for lb in labels) + " |")
    (out / "directions.md").write_text("# Which input directions each init's A reads (seed 0, 1k regime)\n\n"
                                       + __doc__.split("\n\n", 2)[2] + "\n" + "\n".join(rows) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, m in zip(axes, MEASURES):
        for i, (lb, marker) in enumerate(zip(labels, "osD^v")):
            ax.plot(np.arange(len(tasks)) + (i - 1.5) * 0.08, [results[t][lb]["median"][m] for t in tasks],
                    marker, label=SHORT.get(lb, lb), linestyle="none")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_ylabel(f"{m} (median over the 48 modules)")
        ax.axhline(1.0, color="grey", lw=0.6)
        if m == "excess_read":
            ax.set_yscale("log")
    axes[0].legend(title="init")
    fig.suptitle("Input energy the row space of lora_A reads: share of the best (left), fine-tuning over pre-training (right)")
    fig.tight_layout()
    fig.savefig(out / "directions.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--suite", type=Path, default=None, help="the suite's .npz (default: .vit_suite/suite.npz)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    write(measure(args.suite), args.out)
    print((args.out / "directions.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
