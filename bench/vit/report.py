"""The ViT suite's report: suite averages, the pre-registered comparisons, and what moved the numbers.

    python -m bench.vit.report RUNS.jsonl [RUNS.jsonl ...] --out bench/results/vit [--shift bench/results/vit/shift.json]

Every (label, task, regime) keeps the runs at its lr chosen on seed 0's validation accuracy
(protocol.choose_lr). A suite average is the mean test accuracy over a half's tasks, both
regimes, per seed. Intervals: a paired t-interval over the 5 per-seed suite averages, and a
two-way bootstrap that resamples task-regime cells and seeds (PREREGISTRATION.md). The results
use the registered lr grid (plan.LRS); runs at other lrs (the edge pass, run.py edges) feed a
section of their own, "With the lr grid extended past its edges".
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
from .figures import plot
from .markdown import markdown
from .shift import overall as shift_overall

REF_IMAGES = 4096  # the full true sample (suite.REFERENCE_IMAGES)
PAIRS = {"cross(true) - self": (f"cntlora-cross@{plan.REF}", "cntlora-self"),
         "shift(true) - self": (f"cntlora-shift@{plan.REF}", "cntlora-self"),
         "cross: true - weight proxy": (f"cntlora-cross@{plan.REF}", "cntlora-cross@pretrain_source=weights"),
         "shift: true - weight proxy": (f"cntlora-shift@{plan.REF}", "cntlora-shift@pretrain_source=weights"),
         "cross: true - isotropic": (f"cntlora-cross@{plan.REF}", "cntlora-cross@pretrain_source=isotropic"),
         "shift: true - isotropic": (f"cntlora-shift@{plan.REF}", "cntlora-shift@pretrain_source=isotropic")}


def cell_of(spec: str) -> tuple:
    """A run log's spec name ("vit-letters-fewshot-followup") -> its cell ("letters", True)."""
    task = spec.removeprefix("vit-").removesuffix("-sizes").removesuffix("-more")
    for study in plan.STUDIES:
        task = task.removesuffix(f"-{study}")
    return task.removesuffix("-fewshot"), task.endswith("-fewshot")


def accuracies(paths, chosen: dict | None = None, lrs=None) -> dict:
    """{label: {(task, fewshot): {seed: test accuracy}}} at each label's chosen lr.

    Args:
        paths: run logs (.jsonl or .jsonl.xz), or what quality.report.load_runs read from them.
        chosen: if given, filled with {label: {(task, fewshot): the chosen lr}}.
        lrs: keep only runs at these lrs (plan.LRS: the pre-registered grid); None keeps every run.

    Returns:
        The accuracies.
    """
    out = {}
    for spec, results in (paths if isinstance(paths, dict) else load_runs(paths)).items():
        task, fewshot = cell_of(spec)
        by_label = {}
        for r in results["runs"]:
            if lrs is None or r["lr"] in lrs:
                by_label.setdefault(r["label"], []).append(r)
        for label, runs in by_label.items():
            lr = choose_lr(runs, True)
            out.setdefault(label, {})[(task, fewshot)] = {r["seed"]: r["test"] for r in runs if r["lr"] == lr}
            if chosen is not None:
                chosen.setdefault(label, {})[(task, fewshot)] = lr
    return out


def edge_moves(loaded: dict, wide_chosen: dict) -> dict:
    """Per label, the cells (task × regime, both halves) that ran an lr past the grid and those whose choice moved there.

    Args:
        loaded: quality.report.load_runs of the logs.
        wide_chosen: the lrs accuracies(loaded, chosen) chose over every logged lr.

    Returns:
        {label: {"tried": cells with a seed-0 run off the grid, "moved": {"task/regime": the lr chosen}}}.
    """
    tried = {}
    for spec, results in loaded.items():
        for r in results["runs"]:
            if r["seed"] == 0 and r["lr"] not in plan.LRS:
                tried.setdefault(r["label"], set()).add(cell_of(spec))
    return {label: {"tried": len(cells_), "moved": {f"{t}/{'fewshot' if f else '1k'}": wide_chosen[label][(t, f)]
                                                    for t, f in sorted(cells_)
                                                    if wide_chosen[label][(t, f)] not in plan.LRS}}
            for label, cells_ in sorted(tried.items())}


def lr_choices(chosen: dict) -> dict:
    """{label: {"counts": {lr: cells that chose it}, "edge": share of cells at the grid's lowest or highest lr}},
    over the cells of both halves (plan.LRS is the grid)."""
    out = {}
    for label, by_cell in chosen.items():
        lrs = [lr for cell, lr in by_cell.items() if cell[0] in plan.TASK_ORDER]
        if lrs:
            out[label] = {"counts": {str(g): lrs.count(g) for g in plan.LRS},
                          "edge": sum(lr in (min(plan.LRS), max(plan.LRS)) for lr in lrs) / len(lrs)}
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
    means = [diff[rng.integers(0, c, c)][:, rng.integers(0, s, s)].mean() for _ in range(plan.BOOTSTRAP)]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def compare(acc, a: str, b: str, cell_list) -> dict | None:
    """a − b on a set of cells: mean, bootstrap interval, paired t over per-seed suite averages."""
    ma, mb = matrix(acc, a, cell_list), matrix(acc, b, cell_list)
    if ma is None or mb is None:
        return None
    diff = ma - mb
    t = paired_difference(dict(enumerate(ma.mean(0))), dict(enumerate(mb.mean(0))), True)
    return {"mean": float(diff.mean()), "bootstrap95": bootstrap(diff), "t95": t["ci95"], "p": t["p"]}


def summary(m: np.ndarray) -> dict:
    """The mean of a cells × seeds matrix, a 95% t-interval over its per-seed averages, and a 95%
    two-way bootstrap interval over its cells (tasks × regimes) and seeds (VTAB's headline interval)."""
    mean, std = mean_std(m.mean(0).tolist())
    half = t_quantile(0.975, m.shape[1] - 1) * std / math.sqrt(m.shape[1])
    return {"average": mean, "t95": [mean - half, mean + half], "bootstrap95": bootstrap(m)}


def suite_table(acc, tasks, cell_list) -> dict:
    """{label: {"average", "t95", per-cell means}} for labels that have every cell."""
    table = {}
    for label in acc:
        m = matrix(acc, label, cell_list)
        if m is None:
            continue
        table[label] = {**summary(m),
                        "cells": {f"{t}{'-fewshot' if f else ''}": float(m[i].mean()) for i, (t, f) in enumerate(cell_list)}}
    return dict(sorted(table.items(), key=lambda kv: -kv[1]["average"]))


def incomplete(acc, tasks) -> dict:
    """{label: [scores held, scores planned]} for the plan's labels (and the follow-up's, once any has run) that
    miss a cell or seed on these tasks."""
    planned = len(cells(tasks)) * len(plan.SEEDS)
    planned_labels = plan.DEV_LABELS + [label for labels in plan.STUDIES.values() if any(x in acc for x in labels)
                                        for label in labels]
    held = {label: sum(len(set(acc.get(label, {}).get(c, {})) & set(plan.SEEDS)) for c in cells(tasks))
            for label in planned_labels}
    return {label: [n, planned] for label, n in held.items() if n < planned}


def structure(acc, tasks, leave_out=()) -> dict | None:
    """How far the method moves a half's numbers, and how far the method on one cell does.

    A two-way decomposition of the labels × cells matrix of 5-seed means (labels complete on
    the half): the spread of the methods' main effects (their suite averages), the spread of
    the method × cell interaction, and the seed noise of one 5-seed cell mean. Noise inflates
    both spreads; the "beyond noise" values take out its expected share. `leave_out` drops
    labels (an outlier such as CorDA would otherwise dominate the main effects).
    """
    cell_list = cells(tasks)
    labels = [label for label in acc if label not in leave_out and matrix(acc, label, cell_list) is not None]
    if len(labels) < 3:
        return None
    runs = np.stack([matrix(acc, label, cell_list) for label in labels])  # labels × cells × seeds
    means = runs.mean(2)
    n_labels, n_cells = means.shape
    main = means.mean(1) - means.mean()
    inter = means - means.mean(1, keepdims=True) - means.mean(0, keepdims=True) + means.mean()
    noise2 = float(runs.var(2, ddof=1).mean() / runs.shape[2])
    main2 = float(main.var(ddof=1))
    inter2 = float((inter ** 2).sum() / ((n_labels - 1) * (n_cells - 1)))
    return {"labels": n_labels, "cells": n_cells, "method_sd": math.sqrt(main2),
            "method_sd_beyond_noise": math.sqrt(max(0.0, main2 - noise2 / n_cells)),
            "interaction_sd": math.sqrt(inter2), "interaction_sd_beyond_noise": math.sqrt(max(0.0, inter2 - noise2)),
            "cell_noise_sd": math.sqrt(noise2)}


def premise_by_task(acc, excess: dict) -> dict:
    """Per task (both regimes, 5 seeds), each premise difference, set against the task's shift.

    Args:
        acc: accuracies().
        excess: {task: how far its layer inputs move from pre-training} (shift.overall).

    Returns:
        {comparison: {"tasks": {task: mean difference}, "spearman": rho, "p": p}} over the tasks
        where both labels are complete.
    """
    from scipy.stats import spearmanr

    out = {}
    for name, (a, b) in PAIRS.items():
        gains = {}
        for task in plan.TASK_ORDER:
            ma, mb = matrix(acc, a, cells([task])), matrix(acc, b, cells([task]))
            if ma is not None and mb is not None and task in excess:
                gains[task] = float((ma - mb).mean())
        if len(gains) >= 3:
            rho = spearmanr([excess[t] for t in gains], list(gains.values()))
            out[name] = {"tasks": gains, "spearman": float(rho.statistic), "p": float(rho.pvalue)}
    return out


def size_sweep(acc) -> dict:
    """Cross and Shift against the true sample's size, on the confirmation half's 1k cells
    (where the sweep ran), beside Self and the weight proxy on the same cells."""
    cell_list = cells(plan.CONFIRM, (False,))
    out = {}
    for mode in ("cross", "shift"):
        for n in (*plan.SIZES, REF_IMAGES):
            m = matrix(acc, f"cntlora-{mode}@{plan.REF}" + (f",ref={n}" if n != REF_IMAGES else ""), cell_list)
            out.setdefault(mode, {})[n] = summary(m) if m is not None else None
    for label in ("cntlora-self", "cntlora-cross@pretrain_source=weights", "cntlora-shift@pretrain_source=weights"):
        m = matrix(acc, label, cell_list)
        out.setdefault("others", {})[label] = summary(m) if m is not None else None
    return out


def analyse(acc: dict, excess: dict | None = None, chosen: dict | None = None) -> dict:
    """Everything PREREGISTRATION.md names, and what moved the numbers.

    Args:
        acc: accuracies().
        excess: {task: shift} (shift.overall of shift.json), for the premise per task; None skips it.
        chosen: the lrs accuracies() chose, for the table of lr choices; None skips it.

    Returns:
        The tables, the rule's fixed setting, the primary and secondary comparisons, the
        premise, the size sweep, the labels that did not finish, and the structure of the spread.
    """
    halves = {"dev": plan.DEV, "confirm": plan.CONFIRM}
    out = {"tables": {}, "premise": {}}
    for half, tasks in halves.items():
        for regime, regimes in (("both", (False, True)), ("1k", (False,)), ("fewshot", (True,))):
            out["tables"][f"{half}/{regime}"] = suite_table(acc, tasks, cells(tasks, regimes))
    dev = out["tables"]["dev/both"]
    conf = out["tables"]["confirm/both"]
    # candidates: CNTLoRA labels with every run on both halves (a time limit, never a result, decides)
    ours = [label for label in dev if label in plan.DEV_LABELS and label.startswith("cntlora-") and label in conf]
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
    for study, labels in plan.STUDIES.items():  # each study's own rule (PREREGISTRATION.md), applied the same way
        follow = [label for label in dev if label in labels and label in conf]
        if not (follow and peft):
            continue
        out[study] = {"fixed": follow[0], "vs_best_peft": {"baseline": peft[0],
                                                            **compare(acc, follow[0], peft[0], cells(plan.CONFIRM))}}
        if fixed:
            out[study]["vs_fixed"] = {"baseline": fixed, **compare(acc, follow[0], fixed, cells(plan.CONFIRM))}
        twins = {label: plan.TWINS[label] for label in labels if label in plan.TWINS}
        if twins:  # each label against the setting it changes, on both halves
            out[study]["vs_twin"] = {half: {f"{label} − {twin}": compare(acc, label, twin, cells(tasks))
                                            for label, twin in twins.items()} for half, tasks in halves.items()}
    for half, tasks in halves.items():
        out["premise"][half] = {name: compare(acc, a, b, cells(tasks)) for name, (a, b) in PAIRS.items()}
    out["sizes"] = size_sweep(acc)
    out["complete"] = {}
    for half, tasks in halves.items():  # a look while a half is incomplete: the cells every core label has
        common = [c for c in cells(tasks) if all(matrix(acc, label, [c]) is not None for label in plan.CORE_LABELS)]
        if common and any(label in incomplete(acc, tasks) for label in plan.CORE_LABELS):
            out["complete"][half] = {"table": suite_table(acc, tasks, common),
                                     "premise": {name: compare(acc, a, b, common) for name, (a, b) in PAIRS.items()}}
    out["incomplete"] = {half: incomplete(acc, tasks) for half, tasks in halves.items()}
    out["structure"] = {**{half: structure(acc, tasks) for half, tasks in halves.items()},
                        **{f"{half} without corda": structure(acc, tasks, ["corda"]) for half, tasks in halves.items()}}
    if chosen:
        out["lr_choices"] = lr_choices(chosen)
    if excess:
        out["excess"] = excess
        out["premise_by_task"] = premise_by_task(acc, excess)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shift", type=Path, default=None, help="shift.json (python -m bench.vit.shift), for the premise per task")
    args = parser.parse_args(argv)
    excess = shift_overall(json.loads(args.shift.read_text())) if args.shift else None
    loaded, chosen = load_runs(args.runs), {}
    acc = accuracies(loaded, chosen, lrs=plan.LRS)
    result = analyse(acc, excess, chosen)
    wide_chosen = {}
    every_lr = accuracies(loaded, wide_chosen)  # the grid's edges extended included
    if every_lr != acc:  # only runs past the grid's edges make the two differ
        wide = analyse(every_lr)
        if wide["tables"] != result["tables"]:
            result["edge_extended"] = {k: wide[k] for k in ("fixed", "primary", "secondary", "premise", *plan.STUDIES)
                                       if k in wide}
            result["edge_extended"]["moves"] = edge_moves(loaded, wide_chosen)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (args.out / "suite.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (args.out / "suite.md").write_text(text + "\n")
    plot(result, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
