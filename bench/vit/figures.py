"""The ViT suite report's plots, drawn from report.analyse's result."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import plan


def _short(label: str) -> str:
    """A label as the plots print it: the pre-training statistics named, not their option."""
    return (label.replace("pretrain_source=reference", "true").replace("pretrain_source=weights", "weight proxy")
            .replace("pretrain_source=isotropic", "isotropic"))


def plot(result: dict, out: Path) -> list:
    """The plots that the logged runs allow: suite-average.png (per method, both halves, error
    bars), sample-size.png (two sizes or more) and premise-shift.png (with the shift measure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if not any(result["tables"].get(f"{half}/both") for half in ("dev", "confirm")):
        fig = None  # no label has every run of a half yet
    else:
        fig, axes = plt.subplots(1, 2, figsize=(14, 6.5), sharey=False)
        every = [100 * row["average"] for half in ("dev", "confirm") for row in result["tables"][f"{half}/both"].values()]
    for ax, half in zip(axes, ("dev", "confirm")) if fig else ():
        table = result["tables"].get(f"{half}/both") or {}
        labels = list(table)[::-1]
        means = [100 * table[k]["average"] for k in labels]
        err = [[100 * (table[k]["average"] - table[k]["t95"][0]) for k in labels],
               [100 * (table[k]["t95"][1] - table[k]["average"]) for k in labels]]
        colors = ["tab:blue" if k.startswith("cntlora-") else "tab:gray" for k in labels]
        ax.barh(range(len(labels)), means, xerr=err, color=colors)
        ax.set_yticks(range(len(labels)), [_short(k) + (" (fixed)" if k == result.get("fixed") else "") for k in labels],
                      fontsize=8)
        ax.set_xlim(min(every) - 3, max(every) + 2)
        ax.set_title({"dev": "development", "confirm": "confirmation"}[half] + " half: suite average, both regimes",
                     fontsize=10)
        ax.set_xlabel("test accuracy (%), 95% t-interval over seeds")
    if fig:
        fig.tight_layout()
        fig.savefig(out / "suite-average.png", dpi=110)
        written.append(out / "suite-average.png")
        plt.close(fig)
    sizes = result.get("sizes", {})
    if sum(c is not None for c in sizes.get("cross", {}).values()) >= 2:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for (mode, by_n), color in zip(((m, b) for m, b in sizes.items() if m != "others"), ("tab:blue", "tab:orange")):
            ns = [n for n in sorted(by_n) if by_n[n]]
            ys = np.array([100 * by_n[n]["average"] for n in ns])
            lo, hi = (np.array([100 * by_n[n]["t95"][i] for n in ns]) for i in (0, 1))
            ax.errorbar(ns, ys, yerr=[ys - lo, hi - ys], fmt="o-", capsize=3, color=color, label=f"{mode}, true sample")
            proxy = sizes.get("others", {}).get(f"cntlora-{mode}@pretrain_source=weights")
            if proxy:
                ax.axhline(100 * proxy["average"], color=color, ls=":", label=f"{mode}, weight proxy")
        self_ = sizes.get("others", {}).get("cntlora-self")
        if self_:
            ax.axhline(100 * self_["average"], color="k", ls="--", label="self (no pre-training statistics)")
        ax.set_xscale("log")
        ax.set_xlabel("pre-training images in the true sample")
        ax.set_ylabel("test accuracy (%), confirmation half, 1k regime\n95% t-interval over seeds")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "sample-size.png", dpi=110)
        written.append(out / "sample-size.png")
        plt.close(fig)
    by_task = result.get("premise_by_task", {})
    shown = [k for k in ("cross(true) - self", "shift(true) - self") if k in by_task]
    if shown and "excess" in result:
        fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4.2), squeeze=False)
        for ax, name in zip(axes[0], shown):
            c = by_task[name]
            for task, gain in c["tasks"].items():
                color = "tab:blue" if task in plan.DEV else "tab:green"
                ax.plot(result["excess"][task], 100 * gain, "o", color=color)
                ax.annotate(task, (result["excess"][task], 100 * gain), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.axhline(0, color="k", lw=0.5)
            ax.set_xlabel("shift: excess of the task's layer inputs over pre-training's (shift.md)")
            ax.set_ylabel(f"{name} (accuracy points)")
            ax.set_title(f"{name}: Spearman ρ = {c['spearman']:+.2f} (p = {c['p']:.3f})\nblue: development, green: confirmation",
                         fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "premise-shift.png", dpi=110)
        written.append(out / "premise-shift.png")
        plt.close(fig)
    return written
