"""The quality benchmark's results: summaries, summary.json, run logs, markdown tables and plots.

summarize(results) turns run records (protocol.run_quality, pool.run_many, or load_runs on
run logs) into per-method statistics; the format_* functions turn those into markdown tables
and plot_* into PNG figures (matplotlib's Agg backend: no display needed).
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Optional, Sequence

from cntlora.config import CNTLoRAConfig, CNTLoRAError
from cntlora.files import write_json

from .baselines import METHODS
from .protocol import FRESH_SEEDS, choose_lr
from .stats import holm, mean_std, paired_difference, seed_results

# The sensitivity study of the default mode (Self): one setting at a time, the others at their defaults.
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
# how result files are written: cntlora.files.write_json(path, data, **RESULTS_JSON), compact and strict (no NaN)
RESULTS_JSON = {"indent": 1, "allow_nan": False}


def summarize(results: dict, reference: str = "default") -> dict:
    """Per method label: chosen lr, test mean/std, steps-to-target, loss AUC, paired differences.

    Args:
        results: a task's results (protocol.results_dict).
        reference: the label whose final validation metric is the steps-to-target target and
            the `vs_default` comparison.

    Returns:
        {"task", "metric", "higher_is_better", "steps", "train_size", "best_baseline" (the PEFT
        init with the best final val metric), "reference", "methods": {label: statistics}}.
    """
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

    Args:
        summary: summarize()'s output.
        only: the labels that go in; by default the canonical method names, so variants such as
            'cntlora-cross@ridge=0.1' stay in the per-task JSON.

    Returns:
        {"metric", "higher_is_better", "steps", "methods": {label: {"lr", "test_mean", "test_std",
        "seeds", "steps_to_target", "init_seconds"}}}.
    """
    return {"metric": summary["metric"], "higher_is_better": summary["higher_is_better"], "steps": summary["steps"],
            "methods": {label: {"lr": m["lr"], "test_mean": m["test_mean"], "test_std": m["test_std"],
                                "seeds": m["seeds"], "steps_to_target": m.get("steps_to_target"),
                                "init_seconds": m["init_seconds"]}
                        for label, m in summary["methods"].items() if label in only}}


def update_summary(path, task_name: str, entry: dict) -> dict:
    """Merge one task's entry into summary.json (other tasks' entries are kept).

    Args:
        path: summary.json; created if missing.
        task_name: the entry's key under "tasks".
        entry: summary_entry()'s output.

    Returns:
        The whole file's new content.
    """
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"tasks": {}}
    data["tasks"][task_name] = entry
    write_json(path, data, **RESULTS_JSON)
    return data


def table_name(spec_name: str) -> str:
    """'text-fewshot+a_row_norm' -> 'text-fewshot': a spec named TABLE+PART adds its runs to TABLE."""
    return spec_name.partition("+")[0]


def load_runs(paths) -> dict:
    """Read run logs (run_all's runs.jsonl) into results as summarize() takes them.

    Each line is {"kind": "meta"|"run", "spec": NAME, "data": ...}; a log may be xz-compressed
    (NAME.jsonl.xz). Specs named TABLE+PART fold
    into TABLE. A run logged more than once (same table, label, seed and lr, e.g. by an earlier
    run of the plan and by a later one) counts once: the latest line wins.

    Args:
        paths: the logs, oldest first.

    Returns:
        {table: results}, for every table with at least one run.

    Raises:
        CNTLoRAError: specs of one table disagree on metric, direction, steps or train size.
    """
    metas, runs = {}, {}
    for path in paths:
        path = Path(path)
        text = lzma.open(path, "rt").read() if path.suffix == ".xz" else path.read_text()
        for line in text.splitlines():
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


def fresh_seed_check(summary: dict, seeds=FRESH_SEEDS) -> dict:
    """Paired differences on `seeds` alone, for every label that ran all of them.

    Args:
        summary: summarize()'s output.
        seeds: the seeds that ran after the settings they check were chosen.

    Returns:
        {label: {"test_mean", "seeds", "vs_default", "vs_best_baseline"}}; a comparison is None
        where the reference or the best baseline did not run every seed.
    """
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


def against_every_baseline(summary: dict, min_seeds: int = 10) -> dict:
    """Every CNTLoRA label against every PEFT init, with Holm's correction over the PEFT inits.

    A win over the best PEFT init chosen on validation says nothing about the others, and a win
    over each of several needs its p corrected for their number.

    Args:
        summary: summarize()'s output.
        min_seeds: labels (CNTLoRA's and PEFT's) with fewer seeds are left out.

    Returns:
        {cntlora label: {PEFT init: paired_difference + "p_holm"}}.
    """
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


def _delta(d) -> str:
    if not d:
        return "–"
    return f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] {d['verdict']}"


def _direction(summary: dict) -> str:
    return "higher" if summary["higher_is_better"] else "lower"


def format_table(summary: dict) -> str:
    """A markdown table: method, lr, test mean ± std, steps-to-target, init seconds, paired deltas."""
    rows = [f"### {summary['task']} ({summary['metric']}, {_direction(summary)} is better, "
            f"{summary['steps']} steps, {summary.get('train_size')} train examples)", "",
            "| method | lr | test mean ± std | seeds | steps-to-target | loss AUC | init s | Δ vs default [95% CI] | Δ vs best baseline [95% CI] |",
            "|---|---|---|---|---|---|---|---|---|"]
    for label, m in summary["methods"].items():
        stt = m.get("steps_to_target")
        rows.append(f"| {label} | {m['lr']:g} | {m['test_mean']:.4f} ± {m['test_std']:.4f} | {m['seeds']} | "
                    f"{'–' if stt is None else stt} | {m['loss_auc']:.4f} | {m['init_seconds']:.2f} | "
                    f"{_delta(m['vs_default'])} | {_delta(m['vs_best_baseline'])} |")
    return "\n".join(rows)


def format_fresh_table(summary: dict, check: dict, seeds=FRESH_SEEDS) -> str:
    """The markdown table of fresh_seed_check, headed like format_table's with the seeds named."""
    rows = [f"### {summary['task']}, fresh seeds {min(seeds)}-{max(seeds)} ({summary['metric']}, "
            f"{_direction(summary)} is better; best baseline "
            f"{summary['best_baseline']}, chosen on validation over all seeds)", "",
            "| method | test mean | seeds | Δ vs default [95% CI] | Δ vs best baseline [95% CI] |", "|---|---|---|---|---|"]
    for label, c in check.items():
        rows.append(f"| {label} | {c['test_mean']:.4f} | {c['seeds']} | {_delta(c['vs_default'])} | "
                    f"{_delta(c['vs_best_baseline'])} |")
    return "\n".join(rows)


def format_every_baseline_table(summary: dict, comparisons: dict) -> str:
    """The markdown table of against_every_baseline: one row per CNTLoRA label, one column per PEFT init."""
    hib = summary["higher_is_better"]
    theirs = list(dict.fromkeys(b for row in comparisons.values() for b in row))
    rows = [f"### {summary['task']} against every PEFT init ({summary['metric']}, {_direction(summary)} is "
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


def sensitivity_labels() -> dict:
    """The sensitivity study's labels: {sweep: [(value, label), ...]}, sweeps SENSITIVITY's keys plus "r-vas".

    The default value runs as the plain method label ('cntlora-self', not 'cntlora-self@ridge=0.01'),
    so the sweeps of one method share that run instead of repeating it.
    """
    out = {}
    for sweep, method in SENSITIVITY_METHOD.items():
        key = sweep.removesuffix("-vas")
        out[sweep] = [(v, method if v == SENSITIVITY_DEFAULT[key] else f"{method}@{key}={v:g}") for v in SENSITIVITY[key]]
    return out


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
    """Train-loss curves (every method on one figure) and a bar chart of test metric ± std.

    Args:
        summary: summarize()'s output.
        out: the folder; created if missing.

    Returns:
        The two PNG paths: quality-<task>-loss.png and quality-<task>-test.png.
    """
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


def plot_sensitivity(summary: dict, out, reference: Optional[dict] = None) -> Path:
    """Final test metric (mean ± std over seeds) against each swept setting, one panel each.

    Args:
        summary: summarize()'s output for a TASK-sensitivity table.
        out: the folder.
        reference: a summary's entry for PEFT's default LoRA (e.g. from the task's headline
            table), drawn as a line; by default the sensitivity summary's own 'default', if any.

    Returns:
        The PNG path, sensitivity-<task>.png.
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
