"""Where VAS puts the rank budget on each suite task: by energy, or by input shift (plan.LAYERS).

    python -m bench.vit.layers --out bench/results/vit      # CPU, about 15 minutes

For every task (1k regime, seed 0) and every label of plan.LAYERS with its twin (plan.TWINS),
the init's plan: each adapted layer's rank and, under vas_score="shift", its input shift
(cntlora.decompose.input_shift against the true pre-training sample). No training: this shows
what the layers study changes before its runs say whether it helps. Writes layers.json,
layers.md (mean rank per layer kind, layers left without an adapter) and layers.png (the
ranks, task by task).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..quality.protocol import init_model
from . import plan
from .suite import TASK_NAMES
from .tasks import vit_task

def allocations(tasks=TASK_NAMES, labels=None, path: Path | None = None, model_fn=None) -> dict:
    """Each label's ranks (and input shifts) per task.

    Args:
        tasks: suite task names.
        labels: method labels (default: plan.LAYERS and their twins).
        path: the suite's .npz (default: .vit_suite/suite.npz).
        model_fn: builds the ViT (default: the committed pre-trained one); for tests.

    Returns:
        {task: {label: {layer: {"rank": r, "shift": input shift or None}}}}.
    """
    from tqdm import tqdm

    labels = labels or [x for label in plan.LAYERS for x in (plan.TWINS[label], label)]
    out = {}
    for task in tqdm(tasks, desc="layers", unit="task"):
        t = vit_task(task, path=path, **({"model": model_fn()} if model_fn else {}))
        out[task] = {}
        for label in labels:
            model, _ = init_model(t, label, 0, torch.device("cpu"))
            out[task][label] = {name: {"rank": lp.rank, "shift": lp.input_shift}
                                for name, lp in model.cntlora_plan.layers.items()}
    return out


def by_kind(layers: dict) -> dict:
    """{kind: [ranks in block order]} of one label's allocation on one task; a kind is the last part of a
    layer's name (q_proj, ..., fc2 on the suite's ViT), in the order the model first uses it."""
    out = {}
    for name, d in layers.items():
        out.setdefault(name.rsplit(".", 1)[-1], []).append(d["rank"])
    return out


def write(results: dict, out: Path) -> list:
    """layers.json, layers.md and layers.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "layers.json").write_text(json.dumps(results, indent=1))
    tasks = list(results)
    labels = list(next(iter(results.values())))
    kinds_of = list(by_kind(results[tasks[0]][labels[0]]))
    rows = ["| task | method | " + " | ".join(kinds_of) + " | without an adapter |",
            "|---|---|" + "---|" * (len(kinds_of) + 1)]
    for task in tasks:
        for label in labels:
            kinds = by_kind(results[task][label])
            idle = sum(d["rank"] == 0 for d in results[task][label].values())
            rows.append(f"| {task} | {label} | " + " | ".join(f"{np.mean(kinds[k]):.1f}" for k in kinds_of)
                        + f" | {idle} of {len(results[task][label])} |")
    (out / "layers.md").write_text("# Where VAS puts the rank budget (mean rank per layer kind over the blocks)\n\n"
                                   + __doc__.split("\n\n", 2)[2] + "\n" + "\n".join(rows) + "\n")
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 0.45 * len(tasks) + 2.2), squeeze=False)
    top = max(d["rank"] for t in results.values() for lab in t.values() for d in lab.values())
    for ax, label in zip(axes[0], labels):
        grid = np.array([[r for k in kinds_of for r in by_kind(results[t][label])[k]] for t in tasks])
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=top)
        blocks = grid.shape[1] // len(kinds_of)
        ax.set_xticks([blocks * i + (blocks - 1) / 2 for i in range(len(kinds_of))], kinds_of, rotation=45)
        ax.set_yticks(range(len(tasks)), tasks if ax is axes[0][0] else [])
        ax.set_title(label.replace("pretrain_source=reference", "true"), fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), label="rank (blocks in order within each layer kind)")
    fig.savefig(out / "layers.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [out / "layers.json", out / "layers.md", out / "layers.png"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--suite", type=Path, default=None, help="the suite's .npz (default: .vit_suite/suite.npz)")
    args = parser.parse_args(argv)
    write(allocations(path=args.suite), args.out)
    print((args.out / "layers.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
