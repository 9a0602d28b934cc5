"""The ViT suite report as markdown (suite.md), from report.analyse's result."""

from __future__ import annotations

from . import plan


STUDY_TITLES = {"followup": "Follow-up: the start's function and scale",
                "layers": "Which layers: VAS ranks by input shift"}  # plan.STUDIES' section titles, as PREREGISTRATION.md names them


def _fmt(c) -> str:
    if not c:
        return "not run"
    lo, hi = c["bootstrap95"]
    return f"{100 * c['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] (t95 [{100 * c['t95'][0]:+.2f}, {100 * c['t95'][1]:+.2f}], p={c['p']:.3f})"


def markdown(result: dict) -> str:
    """The report as markdown."""
    lines = ["# ViT transfer suite", "", "Test accuracy in %, mean over tasks × regimes × 5 seeds; 95% t-interval over "
             "the per-seed suite averages, and a 95% two-way bootstrap interval resampling task cells and seeds "
             f"({plan.BOOTSTRAP:,} draws). The second treats the tasks as a sample of possible tasks; it is wide because the "
             "tasks differ in difficulty, so methods are compared paired, in the sections below. Produced by "
             "`python -m bench.vit.report`.", ""]
    for name, table in result["tables"].items():
        if not table:
            continue
        half, regime = name.split("/")
        cols = list(next(iter(table.values()))["cells"])
        lines += [f"## {half} half, {regime}", "",
                  "| method | suite average [t95 over seeds] | tasks × seeds 95% | " + " | ".join(cols) + " |",
                  "|---|---|---|" + "---|" * len(cols)]
        for label, row in table.items():
            lo, hi = row["bootstrap95"]
            lines.append(f"| {label} | {100 * row['average']:.2f} [{100 * row['t95'][0]:.2f}, {100 * row['t95'][1]:.2f}] | "
                         f"[{100 * lo:.2f}, {100 * hi:.2f}] | " + " | ".join(f"{100 * v:.1f}" for v in row["cells"].values()) + " |")
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
    for study in plan.STUDIES:
        if study not in result:
            continue
        f = result[study]
        lines += [f"## {STUDY_TITLES.get(study, study)}", "",
                  f"Its fixed setting (best of its labels on the development half): `{f['fixed']}`.", "",
                  f"- confirmation half, both regimes: − {f['vs_best_peft']['baseline']} (best PEFT init there) = "
                  f"{_fmt(f['vs_best_peft'])}"]
        if "vs_fixed" in f:
            lines.append(f"- − {f['vs_fixed']['baseline']} (the main fixed setting) = {_fmt(f['vs_fixed'])}")
        for half, comps in f.get("vs_twin", {}).items():
            lines += [f"- {half} half: {name} = {_fmt(c)}" for name, c in comps.items()]
        lines.append("")
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
    return "\n".join(lines + _markdown_more(result))


def _pct(c) -> str:
    return f"{100 * c['average']:.2f} [{100 * c['t95'][0]:.2f}, {100 * c['t95'][1]:.2f}]" if c else "not run"


def _markdown_more(result: dict) -> list:
    """The sections past the pre-registered ones: the size sweep, what did not run, what moved the numbers."""
    lines = []
    sizes = result.get("sizes", {})
    if sizes:
        lines += ["## True-sample size, confirmation half, 1k regime", "",
                  "| pre-training images | " + " | ".join(m for m in sizes if m != "others") + " |", "|---|---|---|"]
        ns = sorted(next(iter(sizes.values())))
        lines += [f"| {n} | " + " | ".join(_pct(by_n[n]) for m, by_n in sizes.items() if m != "others") + " |" for n in ns]
        lines += [""] + [f"- {label}: {_pct(c)}" for label, c in sizes.get("others", {}).items()] + [""]
    for half, missing in result.get("incomplete", {}).items():
        if missing:
            lines += [f"## Not complete on the {half} half", "", "Scores held of those planned (cells × 5 seeds); these "
                      "labels are out of the half's tables, the rule and any comparison that needs them.", ""]
            lines += [f"- {label}: {held} of {planned}" for label, (held, planned) in missing.items()] + [""]
    if any(result.get("structure", {}).values()):
        lines += ["## What moves the numbers", "", "A two-way decomposition of the labels × cells matrix of 5-seed "
                  "means (labels complete on the half), in accuracy points: the spread of the methods' suite averages, "
                  "the spread of the method × cell interaction, and the seed noise of one 5-seed cell mean. "
                  "\"Beyond noise\" takes out noise's expected share.", "",
                  "| half | labels | cells | method sd | beyond noise | method × cell sd | beyond noise | cell noise sd |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {half} | {st['labels']} | {st['cells']} | {100 * st['method_sd']:.2f} | "
                  f"{100 * st['method_sd_beyond_noise']:.2f} | {100 * st['interaction_sd']:.2f} | "
                  f"{100 * st['interaction_sd_beyond_noise']:.2f} | {100 * st['cell_noise_sd']:.2f} |"
                  for half, st in result["structure"].items() if st] + [""]
    wide = result.get("edge_extended")
    if wide:
        lines += ["## With the lr grid extended past its edges", "",
                  "The same rule and comparisons, each label's lr chosen over every lr logged (PREREGISTRATION.md, "
                  "\"Learning-rate edges\"); the results above, on the pre-registered grid, stand as reported.", "",
                  f"- fixed setting: `{wide.get('fixed')}`"]
        if "primary" in wide:
            lines.append(f"- primary, fixed − {wide['primary']['baseline']}: {_fmt(wide['primary'])}")
        for study in plan.STUDIES:
            if study in wide:
                lines.append(f"- {study} `{wide[study]['fixed']}` − {wide[study]['vs_best_peft']['baseline']}: "
                             f"{_fmt(wide[study]['vs_best_peft'])}")
        if "secondary" in wide:
            lines += [f"- fixed − {b}, confirmation half, both regimes: {_fmt(c)}, Holm p={c['p_holm']:.3f}"
                      for b, c in wide["secondary"]["both"].items()]
        for half, comps in wide.get("premise", {}).items():
            lines += [f"- premise, {half}: " + "; ".join(f"{k} {_fmt(c)}" for k, c in comps.items())]
        moves = wide.get("moves")
        if moves:
            lines += ["", "Cells that ran seed 0 one step past the edge they chose on the grid, and those whose choice "
                      "moved there:", "", "| method | cells tried | moved | where |", "|---|---|---|---|"]
            lines += [f"| {label} | {m['tried']} | {len(m['moved'])} | "
                      + (", ".join(f"{cell} ({lr:g})" for cell, lr in m["moved"].items()) or "–") + " |"
                      for label, m in moves.items()]
        lines.append("")
    choices = result.get("lr_choices")
    if choices:
        grid = [str(g) for g in plan.LRS]
        lines += ["## Learning rates chosen", "", "Cells (task × regime, both halves) where seed 0's validation accuracy "
                  "chose each lr. A choice at the grid's lowest or highest lr may hide a better one beyond it.", "",
                  "| method | " + " | ".join(grid) + " | at an edge |", "|---|" + "---|" * (len(grid) + 1)]
        lines += [f"| {label} | " + " | ".join(str(c["counts"][g]) for g in grid) + f" | {100 * c['edge']:.0f}% |"
                  for label, c in sorted(choices.items(), key=lambda kv: -kv[1]["edge"])] + [""]
    by_task = result.get("premise_by_task")
    if by_task:
        tasks = [t for t in plan.TASK_ORDER if any(t in c["tasks"] for c in by_task.values())]
        lines += ["## Premise per task, against the task's shift", "",
                  "Each difference is the mean over both regimes and 5 seeds. Shift is shift.md's \"all inputs\" excess. "
                  "Spearman's rank correlation over the tasks; exploratory, not pre-registered.", "",
                  "| comparison | " + " | ".join(tasks) + " | Spearman ρ (p) |", "|---|" + "---|" * (len(tasks) + 1)]
        lines += [f"| {name} | " + " | ".join(f"{100 * c['tasks'][t]:+.2f}" if t in c["tasks"] else "–" for t in tasks)
                  + f" | {c['spearman']:+.2f} ({c['p']:.3f}) |" for name, c in by_task.items()] + [""]
    return lines
