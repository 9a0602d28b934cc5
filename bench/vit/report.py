"""The ViT suite's report: suite averages, the pre-registered comparisons, and two plots.

    python -m bench.vit.report RUNS.jsonl [RUNS.jsonl ...] --out bench/results/vit

Every (label, task, regime) keeps the runs at its lr chosen on seed 0's validation accuracy
(protocol.choose_lr). A suite average is the mean test accuracy over a half's tasks, both
regimes, per seed. Intervals: a paired t-interval over the 5 per-seed suite averages, and a
two-way bootstrap that resamples task-regime cells and seeds (PREREGISTRATION.md).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from ..quality.baselines import PEFT_METHODS
from ..quality.protocol import choose_lr
from ..quality.report import load_runs
from ..quality.stats import holm, mean_std, paired_difference, t_quantile
from . import plan

BOOTSTRAP = 10_000


def accuracies(paths) -> dict:
    """{label: {(task, fewshot): {seed: test accuracy}}} at each label's chosen lr."""
    out = {}
    for spec, results in load_runs(paths).items():
        task = spec.removeprefix("vit-").removesuffix("-sizes").removesuffix("-more")
        fewshot = task.endswith("-fewshot")
        task = task.removesuffix("-fewshot")
        by_label = {}
        for r in results["runs"]:
            by_label.setdefault(r["label"], []).append(r)
        for label, runs in by_label.items():
            lr = choose_lr(runs, True)
            out.setdefault(label, {})[(task, fewshot)] = {r["seed"]: r["test"] for r in runs if r["lr"] == lr}
    return out


def cells(tasks, regimes=(False, True)) -> list:
    return [(t, f) for f in regimes for t in tasks]


def matrix(acc: dict, label: str, cell_list) -> np.ndarray | None:
    """cells × seeds test accuracies; None when a cell or seed is missing."""
    rows = []
    for cell in cell_list:
        seeds = acc.get(label, {}).get(cell)
        if seeds is None or any(s not in seeds for s in plan.SEEDS):
            return None
        rows.append([seeds[s] for s in plan.SEEDS])
    return np.array(rows)


def bootstrap(diff: np.ndarray, seed: int = 0) -> list:
    """95% percentile interval of the mean of a cells × seeds matrix, resampling cells and seeds."""
    rng = np.random.default_rng(seed)
    c, s = diff.shape
    means = [diff[rng.integers(0, c, c)][:, rng.integers(0, s, s)].mean() for _ in range(BOOTSTRAP)]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def compare(acc, a: str, b: str, cell_list) -> dict | None:
    """a − b on a set of cells: mean, bootstrap interval, paired t over per-seed suite averages."""
    ma, mb = matrix(acc, a, cell_list), matrix(acc, b, cell_list)
    if ma is None or mb is None:
        return None
    diff = ma - mb
    t = paired_difference(dict(enumerate(ma.mean(0))), dict(enumerate(mb.mean(0))), True)
    return {"mean": float(diff.mean()), "bootstrap95": bootstrap(diff), "t95": t["ci95"], "p": t["p"]}


def suite_table(acc, tasks, cell_list) -> dict:
    """{label: {"average", "t95", per-cell means}} for labels that have every cell."""
    table = {}
    for label in acc:
        m = matrix(acc, label, cell_list)
        if m is None:
            continue
        mean, std = mean_std(m.mean(0).tolist())  # over the per-seed suite averages
        half = t_quantile(0.975, m.shape[1] - 1) * std / math.sqrt(m.shape[1])
        table[label] = {"average": mean, "t95": [mean - half, mean + half],
                        "cells": {f"{t}{'-fewshot' if f else ''}": float(m[i].mean()) for i, (t, f) in enumerate(cell_list)}}
    return dict(sorted(table.items(), key=lambda kv: -kv[1]["average"]))


def analyse(acc: dict) -> dict:
    """Everything PREREGISTRATION.md names, from the accuracies."""
    halves = {"dev": plan.DEV, "confirm": plan.CONFIRM}
    out = {"tables": {}, "premise": {}}
    for half, tasks in halves.items():
        for regime, regimes in (("both", (False, True)), ("1k", (False,)), ("fewshot", (True,))):
            out["tables"][f"{half}/{regime}"] = suite_table(acc, tasks, cells(tasks, regimes))
    dev = out["tables"]["dev/both"]
    conf = out["tables"]["confirm/both"]
    # candidates: CNTLoRA labels with every run on both halves (a time limit, never a result, decides)
    ours = [label for label in dev if label.startswith("cntlora-") and label in conf]
    fixed = ours[0] if ours else None
    if fixed:
        out["fixed"] = fixed
    peft = [label for label in conf if label in PEFT_METHODS]
    if fixed and peft:
        best = peft[0]
        confirm_cells = cells(plan.CONFIRM)
        out["primary"] = {"baseline": best, **compare(acc, fixed, best, confirm_cells)}
        secondary = {}
        for regime, regimes in (("both", (False, True)), ("1k", (False,)), ("fewshot", (True,))):
            family = {b: compare(acc, fixed, b, cells(plan.CONFIRM, regimes)) for b in PEFT_METHODS}
            family = {b: c for b, c in family.items() if c}
            adjusted = holm({b: c["p"] for b, c in family.items()})
            secondary[regime] = {b: {**c, "p_holm": adjusted[b]} for b, c in family.items()}
        out["secondary"] = secondary
    ref = plan.REF
    pairs = {"cross(true) - self": (f"cntlora-cross@{ref}", "cntlora-self"),
             "shift(true) - self": (f"cntlora-shift@{ref}", "cntlora-self"),
             "cross: true - weight proxy": (f"cntlora-cross@{ref}", "cntlora-cross@pretrain_source=weights"),
             "shift: true - weight proxy": (f"cntlora-shift@{ref}", "cntlora-shift@pretrain_source=weights"),
             "cross: true - isotropic": (f"cntlora-cross@{ref}", "cntlora-cross@pretrain_source=isotropic"),
             "shift: true - isotropic": (f"cntlora-shift@{ref}", "cntlora-shift@pretrain_source=isotropic")}
    for half, tasks in halves.items():
        out["premise"][half] = {name: compare(acc, a, b, cells(tasks)) for name, (a, b) in pairs.items()}
    sizes = {}
    for mode in ("cross", "shift"):
        for n in (*plan.SIZES, 4096):
            label = f"cntlora-{mode}@{ref}" + (f",ref={n}" if n != 4096 else "")
            vals = [np.mean(list(acc.get(label, {}).get((t, False), {}).values()) or [np.nan]) for t in plan.TASK_ORDER]
            sizes.setdefault(mode, {})[n] = {t: float(v) for t, v in zip(plan.TASK_ORDER, vals)}
    out["sizes"] = sizes
    out["seed0"] = {half: seed0_table(acc, tasks) for half, tasks in halves.items()}
    out["complete"] = {}
    for half, tasks in halves.items():  # a look while a half is incomplete: the cells every core label has
        common = [c for c in cells(tasks) if all(matrix(acc, label, [c]) is not None for label in plan.CORE_LABELS)]
        if common:
            out["complete"][half] = {"table": suite_table(acc, tasks, common),
                                     "premise": {name: compare(acc, a, b, common) for name, (a, b) in pairs.items()}}
    return out


def seed0_table(acc: dict, tasks) -> dict:
    """A first look while seeds 1-4 are missing: seed 0's test accuracy at its chosen lr.

    Seed 0 is the lr-selection seed, so every label has it first. The cells are those of the
    half where every core label (plan.CORE_LABELS) has seed 0; a label is listed when it has
    them all. Not a pre-registered comparison: one seed, and its lr was chosen on the same run.

    Args:
        acc: accuracies().
        tasks: the half's tasks.

    Returns:
        {"cells": [...], "labels": {label: {"average", "cells": {cell: accuracy}}}}, best first.
    """
    names = lambda cs: [f"{t}{'-fewshot' if f else ''}" for t, f in cs]  # noqa: E731
    common = [c for c in cells(tasks) if all(0 in acc.get(label, {}).get(c, {}) for label in plan.CORE_LABELS)]
    rows = {}
    for label, by_cell in acc.items():
        if common and all(0 in by_cell.get(c, {}) for c in common):
            vals = [by_cell[c][0] for c in common]
            rows[label] = {"average": float(np.mean(vals)), "cells": dict(zip(names(common), map(float, vals)))}
    return {"cells": names(common), "labels": dict(sorted(rows.items(), key=lambda kv: -kv[1]["average"]))}


def _fmt(c) -> str:
    if not c:
        return "not run"
    lo, hi = c["bootstrap95"]
    return f"{100 * c['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] (t95 [{100 * c['t95'][0]:+.2f}, {100 * c['t95'][1]:+.2f}], p={c['p']:.3f})"


def markdown(result: dict) -> str:
    """The report as markdown."""
    lines = ["# ViT transfer suite", "", "Test accuracy in %, mean over tasks × regimes × 5 seeds; 95% t-interval over "
             "the per-seed suite averages. Produced by `python -m bench.vit.report`.", ""]
    for name, table in result["tables"].items():
        if not table:
            continue
        half, regime = name.split("/")
        cols = list(next(iter(table.values()))["cells"])
        lines += [f"## {half} half, {regime}", "", "| method | suite average | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for label, row in table.items():
            lines.append(f"| {label} | {100 * row['average']:.2f} [{100 * row['t95'][0]:.2f}, {100 * row['t95'][1]:.2f}] | "
                         + " | ".join(f"{100 * v:.1f}" for v in row["cells"].values()) + " |")
        lines.append("")
    if "fixed" in result:
        lines += ["## Pre-registered comparisons", "", f"Fixed setting (best CNTLoRA label on the development half): `{result['fixed']}`.", ""]
    if "primary" in result:
        p = result["primary"]
        lines += [f"Primary, confirmation half, both regimes: fixed − {p['baseline']} (best PEFT init there) = {_fmt(p)}; "
                  "bootstrap interval over task cells × seeds.", ""]
        for regime, family in result["secondary"].items():
            lines += [f"Against every PEFT init, confirmation half, {regime} (Holm over 7):", ""]
            lines += [f"- {b}: {_fmt(c)}, Holm p={c['p_holm']:.3f}" for b, c in family.items()] + [""]
    for half, comps in result.get("premise", {}).items():
        lines += [f"## Premise, {half} half (both regimes)", ""] + [f"- {k}: {_fmt(c)}" for k, c in comps.items()] + [""]
    for half, look in result.get("complete", {}).items():
        table = look["table"]
        cols = list(next(iter(table.values()))["cells"])
        lines += [f"## Complete cells, {half} half: 5 seeds", "",
                  "The cells where every core label has all 5 seeds, while the half is incomplete. Not a "
                  "pre-registered comparison.", "", "| method | average | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        lines += [f"| {label} | {100 * row['average']:.2f} [{100 * row['t95'][0]:.2f}, {100 * row['t95'][1]:.2f}] | "
                  + " | ".join(f"{100 * v:.1f}" for v in row["cells"].values()) + " |" for label, row in table.items()]
        lines += ["", "Premise on these cells (paired):", ""] + [f"- {k}: {_fmt(c)}" for k, c in look["premise"].items()]
        lines.append("")
    for half, look in result.get("seed0", {}).items():
        if not look["labels"]:
            continue
        lines += [f"## First look, {half} half: seed 0 only", "",
                  "Seed 0's test accuracy at the lr its own validation accuracy chose, on the cells where every "
                  "core label has it. One seed, not a pre-registered comparison.", "",
                  "| method | mean | " + " | ".join(look["cells"]) + " |", "|---|---|" + "---|" * len(look["cells"])]
        lines += [f"| {label} | {100 * row['average']:.1f} | " + " | ".join(f"{100 * v:.1f}" for v in row["cells"].values())
                  + " |" for label, row in look["labels"].items()] + [""]
    return "\n".join(lines)


def plot(result: dict, out: Path) -> list:
    """The plots that the logged runs allow: suite-average.png (per method, both halves, error
    bars), seed0-dev.png (the first look) and sample-size.png (two sizes or more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if not any(result["tables"].get(f"{half}/both") for half in ("dev", "confirm")):
        fig = None  # no label has every run of a half yet
    else:
        fig, axes = plt.subplots(1, 2, figsize=(13, 6), sharey=False)
    for ax, half in zip(axes, ("dev", "confirm")) if fig else ():
        table = result["tables"].get(f"{half}/both") or {}
        labels = list(table)[::-1]
        means = [100 * table[k]["average"] for k in labels]
        err = [[100 * (table[k]["average"] - table[k]["t95"][0]) for k in labels],
               [100 * (table[k]["t95"][1] - table[k]["average"]) for k in labels]]
        colors = ["tab:blue" if k.startswith("cntlora-") else "tab:gray" for k in labels]
        ax.barh(range(len(labels)), means, xerr=err, color=colors)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        if means:
            ax.set_xlim(min(means) - 5, max(means) + 3)
        ax.set_title(f"{half} half: suite average (both regimes)")
        ax.set_xlabel("test accuracy (%), 95% t-interval over seeds")
    if fig:
        fig.tight_layout()
        fig.savefig(out / "suite-average.png", dpi=110)
        written.append(out / "suite-average.png")
        plt.close(fig)
    look = result.get("seed0", {}).get("dev", {}).get("labels")
    if look:
        labels = list(look)[::-1]
        fig, ax = plt.subplots(figsize=(7, 6))
        ax.barh(range(len(labels)), [100 * look[k]["average"] for k in labels],
                color=["tab:blue" if k.startswith("cntlora-") else "tab:gray" for k in labels])
        for i, k in enumerate(labels):  # each cell's seed-0 accuracy, as dots
            ax.plot([100 * v for v in look[k]["cells"].values()], [i] * len(look[k]["cells"]), "k.", ms=3)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlim(min(100 * v for k in labels for v in look[k]["cells"].values()) - 2, 100)
        ax.set_xlabel(f"test accuracy (%), seed 0, mean over {len(result['seed0']['dev']['cells'])} development cells (dots: cells)")
        ax.set_title("development half, first look (one seed)")
        fig.tight_layout()
        fig.savefig(out / "seed0-dev.png", dpi=110)
        written.append(out / "seed0-dev.png")
        plt.close(fig)
    sizes = result.get("sizes", {})
    if sizes and sum(any(np.isfinite(v) for v in by_n.values()) for by_n in next(iter(sizes.values())).values()) >= 2:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for mode, by_n in sizes.items():
            ns = sorted(by_n)
            ys = [100 * np.nanmean(list(by_n[n].values())) for n in ns]
            ax.plot(ns, ys, "o-", label=f"{mode}, true sample")
        ax.set_xscale("log")
        ax.set_xlabel("pre-training images in the true sample")
        ax.set_ylabel("test accuracy (%), 1k regime, mean over tasks run")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "sample-size.png", dpi=110)
        written.append(out / "sample-size.png")
        plt.close(fig)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = analyse(accuracies(args.runs))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "suite.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (args.out / "suite.md").write_text(markdown(result) + "\n")
    plot(result, args.out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
