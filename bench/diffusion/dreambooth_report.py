"""The DreamBooth benchmark's records -> lr choices, summaries, paired tables, plots.

    python -m bench.diffusion.dreambooth_report RUNS.jsonl... --out bench/results/diffusion \
        [--primary "attention|cntlora-cross@prior"]

Each method's lr is the one with the best mean validation-view fidelity on the dev phase
(ties: the smaller lr); the tables use the confirm phase at those lrs, paired by
(subject, seed). `--primary` names the pre-registered CNTLoRA setting; it is compared with
every PEFT init on every target set, with Holm's correction over those comparisons.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import metrics
from .methods import PEFT_METHODS

METRICS = ("fidelity", "drift_class", "drift_other", "mse_class", "mse_other")
LOWER_IS_BETTER = {"drift_class", "drift_other", "mse_class", "mse_other", "test_loss"}


def load(paths: Sequence) -> List[dict]:
    """Records from runs.jsonl files; a run recorded twice keeps its last record."""
    runs = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                runs[(r["phase"], r["target_set"], r["label"], r["subject"], r["seed"], r["lr"])] = r
    return list(runs.values())


def _final(r: dict, key: str) -> float:
    return r[key][str(r["steps"])]


def choose_lrs(records: Sequence[dict], phase: str = "dev") -> Dict[str, Dict[str, float]]:
    """{target set: {label: lr}}: the best mean final validation fidelity over the runs every lr has."""
    runs: Dict[tuple, Dict[float, Dict[str, float]]] = {}
    for r in records:
        if r["phase"] == phase and not r.get("error"):
            runs.setdefault((r["target_set"], r["label"]), {}).setdefault(r["lr"], {})[f"{r['subject']}:{r['seed']}"] = \
                _final(r, "fidelity_val")
    out: Dict[str, Dict[str, float]] = {}
    for (ts, label), by_lr in runs.items():
        common = set.intersection(*(set(v) for v in by_lr.values()))
        if common:
            mean = {lr: sum(v[k] for k in common) / len(common) for lr, v in by_lr.items()}
            out.setdefault(ts, {})[label] = max(sorted(mean), key=lambda lr: mean[lr])
    return out


def errors(records: Sequence[dict]) -> Dict[str, Dict[str, str]]:
    """{target set: {label: why it could not run}} for methods with no trained run at all."""
    trained = {(r["target_set"], r["label"]) for r in records if not r.get("error")}
    out: Dict[str, Dict[str, str]] = {}
    for r in records:
        if r.get("error") and (r["target_set"], r["label"]) not in trained:
            out.setdefault(r["target_set"], {})[r["label"]] = r["error"].splitlines()[0]
    return out


def by_pair(records: Sequence[dict], lrs: Dict[str, Dict[str, float]], phase: str, key: str) -> Dict[str, Dict[str, float]]:
    """{"ts|label": {pair: final value of `key`}} at each method's chosen lr."""
    out: Dict[str, Dict[str, float]] = {}
    for r in records:
        if r["phase"] != phase or r.get("error") or lrs.get(r["target_set"], {}).get(r["label"]) != r["lr"]:
            continue
        value = _final(r, key) if key.startswith("fidelity") else r["eval_loss"]["test"][str(r["steps"])] if key == "test_loss" \
            else r[key]
        out.setdefault(f"{r['target_set']}|{r['label']}", {})[metrics.pair_key(r["subject"], r["seed"])] = value
    return out


def summarize(records: Sequence[dict], lrs: Dict[str, Dict[str, float]], phase: str = "confirm",
              reference: str = "default") -> dict:
    """Per target set and method: means, curves, steps to default's final fidelity, paired differences to default."""
    keys = METRICS + ("fidelity_val", "test_loss")
    pairs = {k: by_pair(records, lrs, phase, k) for k in keys}
    out: dict = {}
    for ts, by_label in lrs.items():
        methods = {}
        for label, lr in by_label.items():
            mine = [r for r in records if r["phase"] == phase and not r.get("error") and r["target_set"] == ts
                    and r["label"] == label and r["lr"] == lr]
            if not mine:
                continue
            name = f"{ts}|{label}"
            m = {"lr": lr, "pairs": len(mine), "seeds": len({r["seed"] for r in mine}),
                 "init_seconds": sum(r["init_seconds"] for r in mine) / len(mine),
                 "trainable_params": mine[0]["trainable_params"]}
            for k in keys:
                m[k], m[k + "_std"] = metrics.mean_std(list(pairs[k][name].values()))
            marks = sorted({int(s) for r in mine for s in r["fidelity"]})
            m["fidelity_curve"] = {str(s): metrics.mean_std([r["fidelity"][str(s)] for r in mine])[0] for s in marks}
            loss_marks = sorted({int(s) for r in mine for s in r["eval_loss"]["test"]})
            m["test_loss_curve"] = {str(s): metrics.mean_std([r["eval_loss"]["test"][str(s)] for r in mine])[0]
                                    for s in loss_marks}
            n = len(mine[0]["train_loss"])
            m["train_loss_curve"] = [sum(r["train_loss"][i] for r in mine) / len(mine) for i in range(n)]
            if label != reference and f"{ts}|{reference}" in pairs["fidelity"]:
                m["vs_default"] = {k: metrics.paired_difference(pairs[k][name], pairs[k][f"{ts}|{reference}"],
                                                                k not in LOWER_IS_BETTER) for k in keys}
            methods[label] = m
        if reference in methods:
            target = methods[reference]["fidelity"]
            for m in methods.values():
                m["steps_to_target"] = metrics.steps_to_target({int(s): v for s, v in m["fidelity_curve"].items()}, target)
        out[ts] = {"target": methods.get(reference, {}).get("fidelity"), "methods": methods}
    return out


def against_peft(records: Sequence[dict], lrs, primary: str, phase: str = "confirm") -> Dict[str, dict]:
    """The primary setting ("ts|label") against every PEFT init on every target set, Holm over the PEFT inits."""
    peft = [f"{ts}|{l}" for ts, by_label in lrs.items() for l in by_label if l in PEFT_METHODS]
    out = {}
    for k in METRICS + ("test_loss",):
        pairs = by_pair(records, lrs, phase, k)
        out[k] = metrics.compare(pairs, primary, [p for p in peft if p in pairs], k not in LOWER_IS_BETTER)
    return out


def preregistered_pick(dev: dict, reference: str = "default") -> Optional[str]:
    """The rule PREREGISTRATION.md states, on the dev summary: among CNTLoRA settings (every target set)
    whose mean class drift is at most default LoRA's on the same target set, the best mean
    validation-view fidelity; if none qualifies, the best validation fidelity outright."""
    cands = [(ts, label, m) for ts, s in dev.items() for label, m in s["methods"].items() if label.startswith("cntlora")]
    ok = [c for c in cands if reference in dev[c[0]]["methods"]
          and c[2]["drift_class"] <= dev[c[0]]["methods"][reference]["drift_class"]]
    best = max(ok or cands, key=lambda c: c[2]["fidelity_val"], default=None)
    return None if best is None else f"{best[0]}|{best[1]}"


def format_dev(dev: dict) -> str:
    lines = ["| target set | method | lr | val fidelity | test fidelity | class drift | other drift |", "|---|---|---|---|---|---|---|"]
    for ts, s in dev.items():
        for label, m in sorted(s["methods"].items(), key=lambda kv: -kv[1]["fidelity_val"]):
            lines.append(f"| {ts} | {label} | {m['lr']:g} | {m['fidelity_val']:.4f} | {m['fidelity']:.4f} "
                         f"| {m['drift_class']:.4f} | {m['drift_other']:.4f} |")
    return "\n".join(lines) + "\n"


def summary_entries(summary: dict, steps: int) -> dict:
    """Entries in the shape of bench/results/summary.json's tasks, one per target set."""
    return {f"dreambooth-{ts}": {"metric": "fidelity", "higher_is_better": True, "steps": steps,
                                 "methods": {label: {"lr": m["lr"], "test_mean": m["fidelity"], "test_std": m["fidelity_std"],
                                                     "seeds": m["seeds"], "pairs": m["pairs"],
                                                     "steps_to_target": m.get("steps_to_target"),
                                                     "init_seconds": m["init_seconds"],
                                                     "drift_class": m["drift_class"], "drift_other": m["drift_other"]}
                                             for label, m in s["methods"].items()}}
            for ts, s in summary.items()}


def _ci(d: Optional[dict], digits: int = 4) -> str:
    if not d:
        return "–"
    mark = {"win": " ✓", "loss": " ✗"}.get(d["verdict"], "")
    return f"{d['mean']:+.{digits}f} [{d['ci95'][0]:+.{digits}f}, {d['ci95'][1]:+.{digits}f}]{mark}"


def format_tables(summary: dict, failures: Dict[str, Dict[str, str]], steps: int, lrs: Optional[dict] = None) -> str:
    lrs = lrs or {}
    lines = []
    for ts, s in summary.items():
        lines += [f"### Target set `{ts}`", "",
                  "| method | lr | fidelity (test views) | Δ vs default [95% CI] | class drift | Δ drift vs default "
                  "| other-class drift | class MSE | steps to default's final | test loss |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, m in s["methods"].items():
            vs = m.get("vs_default") or {}
            stt = m.get("steps_to_target")
            lines.append(f"| {label} | {m['lr']:g} | {m['fidelity']:.4f} ± {m['fidelity_std']:.4f} | {_ci(vs.get('fidelity'))} "
                         f"| {m['drift_class']:.4f} | {_ci(vs.get('drift_class'))} | {m['drift_other']:.4f} "
                         f"| {m['mse_class']:.4f} | {stt if stt is not None else f'not in {steps}'} | {m['test_loss']:.4f} |")
        for label, why in sorted(failures.get(ts, {}).items()):
            lines.append(f"| {label} | – | n/a: {why} | | | | | | | |")
        for label in sorted(set(lrs.get(ts, {})) - set(s["methods"])):
            lines.append(f"| {label} | {lrs[ts][label]:g} | not run on these seeds | | | | | | | |")
        lines.append("")
    return "\n".join(lines)


def format_primary(primary: str, comparisons: Dict[str, dict]) -> str:
    show = lambda name: name.replace("|", " · ")
    lines = [f"### `{show(primary)}` against every PEFT init that ran (Holm over those)", "",
             "| against | Δ fidelity [95% CI] | p (Holm) | Δ class drift [95% CI] | p (Holm) | Δ other drift [95% CI] | p (Holm) |",
             "|---|---|---|---|---|---|---|"]
    for other, d in comparisons["fidelity"].items():
        dc, do = comparisons["drift_class"].get(other), comparisons["drift_other"].get(other)
        lines.append(f"| {show(other)} | {_ci(d)} | {d['p_holm']:.3g} | {_ci(dc)} | {dc['p_holm'] if dc else float('nan'):.3g} "
                     f"| {_ci(do)} | {do['p_holm'] if do else float('nan'):.3g} |")
    return "\n".join(lines) + "\n"


def plot_curves(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(summary), 3, figsize=(17, 5 * len(summary)), squeeze=False)
    for row, (ts, s) in zip(axes, summary.items()):
        for label, m in s["methods"].items():
            style = "-" if label.startswith("cntlora") else "--"
            curve = m["train_loss_curve"]
            w = max(1, len(curve) // 30)
            smooth = [sum(curve[i : i + w]) / len(curve[i : i + w]) for i in range(0, len(curve), w)]
            row[0].plot([i * w for i in range(len(smooth))], smooth, style, label=label, lw=1)
            row[1].plot([int(k) for k in m["test_loss_curve"]], list(m["test_loss_curve"].values()), style, lw=1)
            row[2].plot([int(k) for k in m["fidelity_curve"]], list(m["fidelity_curve"].values()), style, marker=".", lw=1)
        if s.get("target") is not None:
            row[2].axhline(s["target"], color="k", lw=0.5)
        for ax, title in zip(row, ("train loss (smoothed)", "held-out (test view) denoising loss", "fidelity (test views)")):
            ax.set_title(f"{ts}: {title}")
            ax.set_xlabel("step")
        row[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(samples: dict, path: Path, target_set: str) -> None:
    """One row per method: its final instance-prompt samples for the same subject, prompt and seed."""
    from .data import save_grid

    rows = {k.split("|")[1]: v for k, v in sorted(samples.items()) if k.split("|")[0] == target_set}
    if rows:
        save_grid(path, list(rows.values()), list(rows))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--primary", default=None, help='the pre-registered setting, "target set|label"')
    ap.add_argument("--samples", type=Path, default=None, help="samples.pt of the confirm phase")
    ap.add_argument("--name", default="dreambooth")
    args = ap.parse_args(argv)
    records = load(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    lrs = choose_lrs(records)
    (args.out / f"{args.name}-lrs.json").write_text(json.dumps(lrs, indent=1))
    failures = errors(records)
    from dataclasses import asdict

    from .dreambooth import Protocol

    result = {"protocol": asdict(Protocol()), "lrs": lrs, "not_run": failures}
    text = ""
    if any(r["phase"] == "dev" for r in records):
        dev = summarize(records, lrs, phase="dev")
        result.update(dev=dev, dev_pick=preregistered_pick(dev))
        text += f"## Development phase (pick by the pre-registered rule: {result['dev_pick']})\n\n" + format_dev(dev) + "\n"
    confirm = [r for r in records if r["phase"] == "confirm"]
    if confirm:
        steps = confirm[0]["steps"]
        summary = summarize(records, lrs)
        result.update(summary=summary, tasks=summary_entries(summary, steps))
        text += "## Confirming seeds\n\n" + format_tables(summary, failures, steps, lrs)
        if args.primary:
            result["primary"] = args.primary
            result["against_peft"] = against_peft(records, lrs, args.primary)
            text += "\n" + format_primary(args.primary, result["against_peft"])
        plot_curves(summary, args.out / f"{args.name}-curves.png")
        if args.samples and args.samples.exists():
            import torch

            samples = torch.load(args.samples)
            for ts in summary:
                plot_grid(samples, args.out / f"{args.name}-samples-{ts}.png", ts)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{args.name}-tables.md").write_text(text)
    print(text or json.dumps(lrs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
