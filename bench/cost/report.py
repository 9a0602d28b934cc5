"""The cost benchmark's summary: cost-summary.json's rows, markdown tables and the scaling plot."""

from __future__ import annotations

import json
from typing import Dict, List

from cntlora.files import atomic_write

from .inits import METHODS

SUMMARY_KEYS = ["model", "params", "device", "tokens", "method", "init_seconds", "floor_seconds",
                "peak_memory_bytes", "repeats"]


def summarize(paths: List[str]) -> dict:
    """cost-summary.json's rows from result files: one per (model, device, method) that ran without error.

    Where several files hold the same (model, device, method), the last file given wins (e.g. a
    round-robin re-measurement of the floor and CNTLoRA); each row's floor_seconds comes from
    its own file. An EVA run stopped at its cap is named "eva-capped"; its time is the cap it
    hit, a lower bound.

    Args:
        paths: result files of measure.benchmark.

    Returns:
        {"runs": rows}, each row with SUMMARY_KEYS.
    """
    rows: Dict[tuple, dict] = {}
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        floor = res["methods"].get("floor", {}).get("median_seconds")
        for method, entry in res["methods"].items():
            if "error" in entry or not entry.get("runs") or entry.get("complete") is False:
                continue
            name = "eva-capped" if method == "eva" and not entry.get("finished", True) else method
            key = (res["model"], res["device"], method)
            rows.pop(key, None)  # re-insert: the row keeps the last file's place
            rows[key] = {"model": res["model"], "params": int(res["params"]), "device": res["device"],
                         "tokens": int(res["tokens"]), "method": name, "init_seconds": entry["median_seconds"],
                         "floor_seconds": floor, "peak_memory_bytes": int(entry["median_peak_memory_bytes"]),
                         "repeats": int(entry["repeats"])}
    return {"runs": list(rows.values())}


def markdown_table(paths: List[str]) -> str:
    """One markdown table per result file: median time, ratio to the floor, CNTLoRA's phases, extra peak memory.

    Args:
        paths: result files of measure.benchmark.

    Returns:
        The tables, each under a line naming the model, device and data.
    """
    out = []
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        floor = res["methods"].get("floor", {}).get("median_seconds")
        out.append(f"**{res['model']}** ({res['params'] / 1e9:.2f} B parameters, {res['dtype']}) on {res['device']}, "
                   f"{res['seqs']}×{res['seq_len']} = {res['tokens']:,} tokens, r={res['r']}\n")
        out.append("| method | init seconds (median) | × floor | runs | extra peak memory | notes |")
        out.append("|---|---|---|---|---|---|")
        for method, e in res["methods"].items():
            if "error" in e:
                out.append(f"| {method} | – | – | {len(e.get('runs', []))} | – | failed: {e['error']} |")
                continue
            if e.get("complete") is False:
                out.append(f"| {method} | – | – | {len(e['runs'])} | – | cut off by the run's time limit |")
                continue
            notes = ""
            if "median_phases" in e:
                notes = "collect {collect:.2f} + solve {solve:.2f} + decompose {decompose:.2f} + apply {apply:.2f} s".format(
                    **e["median_phases"])
            if method == "eva":
                fwd = e["runs"][0].get("passes_over_data")
                notes = ("converged" if e.get("finished") else f"stopped at the {e.get('cap_seconds'):g} s cap "
                         "(did not converge): a lower bound") + (f"; {fwd:.1f} passes over the data" if fwd else "")
            ratio = f"{e['median_seconds'] / floor:.2f}" if floor else "–"
            gib = e["median_peak_memory_bytes"] / 2**30
            out.append(f"| {method} | {e['median_seconds']:.2f} | {ratio} | {e['repeats']} | {gib:.2f} GiB | {notes} |")
        out.append("")
    return "\n".join(out)


def plot(summary: dict, path: str) -> None:
    """Init time against model size, one line per method, a panel per device.

    Args:
        summary: summarize()'s output.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted({r["device"] for r in summary["runs"]})
    fig, axes = plt.subplots(1, len(devices), figsize=(6 * len(devices), 4.5), squeeze=False)
    for ax, dev in zip(axes[0], devices):
        rows = [r for r in summary["runs"] if r["device"] == dev]
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["params"], r["init_seconds"]) for r in rows if r["method"] == method)
            base = method.replace("-capped", "")
            color = "black" if base == "floor" else f"C{METHODS.index(base) % 10}" if base in METHODS else None
            style = "x--" if base == "floor" else ("o-" if base.startswith("cntlora") else ".-")
            ax.plot([p[0] / 1e9 for p in pts], [p[1] for p in pts], style, color=color, label=method,
                    linewidth=2 if base.startswith("cntlora") else 1, markersize=8 if base != "default" else 5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel("initialization time (s, median)")
        ax.set_title(f"device: {dev}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)

