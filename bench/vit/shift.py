"""How far each suite task's layer inputs move from pre-training's: the room an init has to use.

    python -m bench.vit.shift --out bench/results/vit        # CPU, about two minutes

For every adapted layer input of the pre-trained ViT, with C_p the second moment E[x xᵀ] of
the true pre-training sample (4,096 Fashion-MNIST training images) and C_f that of a task's
calibration images (its first 128 training images), both scaled to unit trace,
**excess** is the mean of the 8 largest generalized eigenvalues of (C_f, C_p + δI), δ = 1e-4 of
C_p's mean eigenvalue: how many times more energy fine-tuning puts in its 8 most
over-represented directions than pre-training did. 8 is the LoRA rank the suite trains.

The control row splits the pre-training sample itself: C_f from its last 128 images, C_p from
the other 3,968. It shows what sampling alone gives, with no shift at all. q, k and v read the
same input, so each block contributes four inputs: attention (q/k/v), o, fc1 and fc2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cntlora import collect_statistics
from cntlora.decompose import input_shift

from .model import load_pretrained, pixels
from .suite import GROUPS, TASK_NAMES
from .tasks import CALIBRATION, REFERENCE_BATCH, _arrays, suite_file

INPUTS = {"attention": "q_proj", "o": "o_proj", "fc1": "fc1", "fc2": "fc2"}  # q/k/v share one input
TOP = 8
RIDGE = 1e-4
CONTROL = "control"


def excess(fine: torch.Tensor, pre: torch.Tensor, top: int = TOP, ridge: float = RIDGE) -> float:
    """The mean of the `top` largest generalized eigenvalues of (C_f, C_p + δI), both at unit trace
    (cntlora.decompose.input_shift, which VAS's "shift" score uses).

    Args:
        fine: C_f, the fine-tuning inputs' d×d second moment.
        pre: C_p, the pre-training inputs' d×d second moment.
        top: how many eigenvalues to average.
        ridge: δ as a share of C_p's mean eigenvalue.

    Returns:
        The mean; 1 where the two agree, larger the more fine-tuning over-represents directions.
    """
    return input_shift(fine, pre, top, ridge)


def _batches(images: np.ndarray) -> list:
    x = torch.from_numpy(np.ascontiguousarray(images))
    return [{"pixel_values": pixels(x[i:i + REFERENCE_BATCH])} for i in range(0, len(x), REFERENCE_BATCH)]


def second_moments(model, images: np.ndarray, names: list) -> dict:
    """The second moment E[x xᵀ] of each named layer's input over `images`.

    Args:
        model: the ViT (bench/vit/model.py).
        images: uint8 images, N × 28 × 28.
        names: the layers' module names.

    Returns:
        {name: d × d second moment}.
    """
    stats = collect_statistics(model, _batches(images), names, progress=False)
    return {name: stats.moments(name).second for name in names}


def measure(path: Path | None = None, calibration: int = CALIBRATION[False]) -> dict:
    """The excess of every suite task and of the control, per block and input.

    Args:
        path: the suite's .npz (default: tasks.suite_file()).
        calibration: fine-tuning images per task (the 1k regime's calibration set).

    Returns:
        {task: {input kind: [per-block excess]}}, the control under "control".
    """
    from tqdm import tqdm

    z = _arrays(Path(path or suite_file()))
    model = load_pretrained()
    suffixes = tuple("." + s for s in INPUTS.values())
    names = [n for n, _ in model.named_modules() if n.endswith(suffixes)]
    ref = z["reference_x"]
    pre = second_moments(model, ref, names)
    sets = {CONTROL: (ref[-calibration:], second_moments(model, ref[:-calibration], names))}
    sets.update({task: (z[f"{task}/train_x"][:calibration], pre) for task in TASK_NAMES})
    out = {}
    for task, (images, pre_of) in tqdm(sets.items(), desc="shift", unit="task"):
        fine = second_moments(model, images, names)
        per_kind = {kind: [] for kind in INPUTS}
        for name in names:
            kind = next(k for k, suffix in INPUTS.items() if name.endswith(suffix))
            per_kind[kind].append(excess(fine[name], pre_of[name]))
        out[task] = per_kind
    return out


def overall(results: dict) -> dict:
    """{task: the median excess over every adapted layer input} (shift.md's "all inputs" column).

    Args:
        results: measure()'s output, or shift.json read back.

    Returns:
        One number per task.
    """
    return {t: float(np.median([x for v in kinds.values() for x in v])) for t, kinds in results.items()}


def write(results: dict, out: Path) -> None:
    """shift.json, shift.md (a table) and shift.png (the excess per task and input kind)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "shift.json").write_text(json.dumps(results, indent=1))
    med = {t: {k: float(np.median(v)) for k, v in kinds.items()} for t, kinds in results.items()}
    total = overall(results)
    groups = {t: g for g, names in GROUPS.items() for t in names}
    rows = ["| task | group | all inputs | " + " | ".join(INPUTS) + " |", "|---|---|---|" + "---|" * len(INPUTS)]
    for task in [CONTROL, *sorted(TASK_NAMES, key=lambda t: -total[t])]:
        rows.append(f"| {task} | {groups.get(task, 'none: pre-training images')} | {total[task]:.1f} | "
                    + " | ".join(f"{med[task][k]:.1f}" for k in INPUTS) + " |")
    (out / "shift.md").write_text("# Excess of each task's layer inputs over pre-training's (median over blocks)\n\n"
                                  + __doc__.split("\n\n", 2)[2] + "\n" + "\n".join(rows) + "\n")
    tasks = [CONTROL, *TASK_NAMES]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(INPUTS)
    for i, kind in enumerate(INPUTS):
        ax.bar(np.arange(len(tasks)) + (i - 1.5) * width, [med[t][kind] for t in tasks], width, label=kind)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel(f"mean of the top {TOP} eigenvalues of (C_f, C_p)\n(median over the 8 blocks)")
    ax.legend(title="layer input")
    ax.set_title("How far each task's layer inputs move from pre-training's (control: pre-training images)")
    fig.tight_layout()
    fig.savefig(out / "shift.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--suite", type=Path, default=None, help="the suite's .npz (default: .vit_suite/suite.npz)")
    args = parser.parse_args(argv)
    results = measure(args.suite)
    write(results, args.out)
    print((args.out / "shift.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
