"""The quality benchmark's plan: which specs (tables, labels, seeds, lrs) run, and the follow-ups built from run logs.

plan(kind, seeds, steps, chosen) lists the specs of a plan in priority order; select() keeps
the groups asked for; follow_up_specs() builds a follow-up group from the logged runs (the
lrs they chose, the runs they lack). `python -m bench.quality.run_all --help` describes
every group.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from .baselines import METHODS
from .pool import Spec
from .protocol import FRESH_SEEDS, SECOND_FRESH_SEEDS, choose_lr
from .report import load_runs, sensitivity_labels
from .task import parse_label

LRS = [3e-4, 1e-3, 3e-3]
# where CNTLoRA might lose, the settings worth checking: base handling, pre-training source, VAS score
VARIANTS = ["cntlora-cross@base=residual", "cntlora-self@base=residual", "cntlora-cross@base=keep",
            "cntlora-cross@pretrain_source=isotropic", "cntlora-cross-vas@vas_score=weight"]
# A's row norm in subspace mode (PEFT's 1/sqrt(3) by default) against the best PEFT inits on the few-shot tasks
# (the PEFT inits and plain cntlora-self ran with 5 seeds in an earlier headline run of the same code;
# default runs again, as a check that the two runs' numbers agree)
A_ROW_NORM = ["default", "cntlora-self@a_row_norm=1", "cntlora-self@a_row_norm=2", "cntlora-self-vas@a_row_norm=1"]
SENSITIVITY_SEEDS = 3

HEADLINE = ("text-fewshot", "vision-fewshot", "text", "vision", "lm-fewshot", "lm")
MISSING = {f"{t}-missing": t for t in HEADLINE}  # group -> table
FOLLOW_UPS = ("edges", "edges-seeds", *MISSING, "explore-missing", "confirm", "confirm2", "reference-confirm")  # --only groups built from the logs
# Where CNTLoRA loses to PEFT's inits (docs/benchmarks.md), two fixes with a reason behind each:
# - A at the row norm of PEFT's gaussian init, sqrt(n)/r: 3.0 for SmolLM2's n = 576 and r = 8
#   (4.9 for the down projection, n = 1536). On lm, gaussian beat default LoRA by 1.3 perplexity
#   with the same zero B, and differs from it only in A's scale (5.2x PEFT's 1/sqrt(3));
# - the uncapped residual start (a data-aware PiSSA), which closed four fifths of the gap to
#   PiSSA on lm-fewshot on a CPU.
UNCAPPED_RESIDUAL = "cntlora-self@base=residual,strength=None"
VARIANTS_GPU = {"lm": ["cntlora-self@a_row_norm=3", UNCAPPED_RESIDUAL], "vision-fewshot": [UNCAPPED_RESIDUAL],
                # on the GPU too, beside the CPU runs of lm-fewshot and text-fewshot, and on the 800-example tables:
                # the evidence for the default base handling
                "lm-fewshot": [UNCAPPED_RESIDUAL], "text-fewshot": [UNCAPPED_RESIDUAL], "text": [UNCAPPED_RESIDUAL],
                "vision": [UNCAPPED_RESIDUAL]}
# On lm both the uncapped residual start (28.17, from 28.85) and VAS (28.66 with the subspace start)
# helped cntlora-self; the two together, on the language-model tables:
RESIDUAL_VAS = "cntlora-self-vas@base=residual,strength=None"
for _table in ("lm", "lm-fewshot"):
    VARIANTS_GPU[_table] = VARIANTS_GPU[_table] + [RESIDUAL_VAS]

# The `explore` group: the objective truncation (the rank-r update that minimizes the
# constraints' own objective, not the Frobenius distance to ΔW) with the subspace start, with VAS, and with
# the uncapped residual start; and what docs/benchmarks.md listed as not tried yet: the generalized
# directions on the GPU, the uncapped residual start for Cross (and Shift on lm), VAS with it on the
# classifiers. Residual starts search one lr lower and subspace starts one higher, so no edge run follows.
OBJECTIVE = ["cntlora-self@truncation=objective", "cntlora-self-vas@truncation=objective",
             "cntlora-self@base=residual,strength=None,truncation=objective"]
CLASSIFIER_TABLES = ("text-fewshot", "vision-fewshot", "text", "vision")
EXPLORE = {t: OBJECTIVE + ["cntlora-cross-vas@truncation=objective", "cntlora-cross@directions=generalized",
                           "cntlora-self@directions=generalized", "cntlora-cross@base=residual,strength=None",
                           RESIDUAL_VAS] for t in CLASSIFIER_TABLES}
EXPLORE.update({t: OBJECTIVE + ["cntlora-cross@base=residual,strength=None", "cntlora-shift@base=residual,strength=None"]
                for t in ("lm", "lm-fewshot")})


# The explore group's wins over the best PEFT init (seeds 0-4) came out of about ten settings per table, so
# each is checked on fresh seeds (protocol.FRESH_SEEDS, 5-9), decided before those seeds ran, against the PEFT inits that
# could be best there (EVA and CorDA left out on lm, where they trail PiSSA by 0.3 and 0.6 with tight CIs
# and cost 2 min per init) and the settings' own plain forms.
CONFIRM = {"lm": ["default", "gaussian", "pissa_niter_4", "olora", "lora_ga", UNCAPPED_RESIDUAL,
                  "cntlora-cross@base=residual,strength=None"],
           "text": ["default", "gaussian", "eva", "lora_ga", "cntlora-self-vas", "cntlora-cross-vas",
                    "cntlora-self-vas@truncation=objective", "cntlora-cross-vas@truncation=objective"],
           # decided after the lm and text checks, before any seed 5-9 ran here: the vision tables' best
           # settings (5 seeds: ties with the best PEFT init, above it by 0.7-0.9 points)
           "vision": ["default", "gaussian", "eva", "lora_ga", "cntlora-self", "cntlora-cross",
                      "cntlora-self-vas@truncation=objective", "cntlora-self@truncation=objective",
                      "cntlora-cross@directions=generalized"],
           "vision-fewshot": ["default", "gaussian", "pissa_niter_4", "eva", "corda", "lora_ga", "cntlora-self-vas",
                              "cntlora-self-vas@a_row_norm=1"],
           # last, with the device time left: the default against LoRA-GA, the best there, and whether
           # vision-fewshot's winning setting carries over (EVA and CorDA left out for time)
           "text-fewshot": ["default", "gaussian", "olora", "lora_ga", "cntlora-self", "cntlora-self-vas@a_row_norm=1"]}


# The confirm2 checks, fixed here before any of their runs (seeds 10-19 had never run anywhere).
# confirm2: vision-fewshot's winner, cntlora-self-vas@a_row_norm=1, beat the validation-chosen PiSSA on seeds
# 0-9 but tied LoRA-GA (p = 0.05) and EVA (p = 0.07), whose spread over seeds is large; on text-fewshot it beat
# default LoRA and tied LoRA-GA, and the default cntlora-self lost to LoRA-GA. Ten more seeds (SECOND_FRESH_SEEDS)
# for the setting, its plain form and every PEFT init that could be best (OLoRA diverged on vision-fewshot and
# PiSSA trailed on text-fewshot, so those two stay out); EVA and CorDA also get text-fewshot's seeds 5-9,
# which the confirm group left out. The question: does the setting beat each PEFT init over seeds 0-19 with
# Holm's correction over them (report.against_every_baseline), and on seeds 10-19 alone?
CONFIRM2 = {"vision-fewshot": ["default", "gaussian", "pissa_niter_4", "eva", "corda", "lora_ga", "cntlora-self-vas",
                               "cntlora-self-vas@a_row_norm=1"],
            "text-fewshot": ["default", "gaussian", "olora", "eva", "corda", "lora_ga", "cntlora-self",
                             "cntlora-self-vas@a_row_norm=1"]}
CONFIRM2_SEEDS = {"vision-fewshot": SECOND_FRESH_SEEDS, "text-fewshot": range(FRESH_SEEDS.start, SECOND_FRESH_SEEDS.stop)}
# candidate: whether cntlora-self-vas@a_row_norm=1 could be the default, i.e. whether it holds up on the tables it
# never ran on (5 seeds, lr searched on seed 0 as in explore); plain cntlora-self is the comparison.
CANDIDATE = {t: ["cntlora-self-vas@a_row_norm=1"] for t in ("text", "vision", "lm-fewshot", "lm")}


# reference: Cross and Shift against real pre-training-like data (pretrain_source="reference", METHOD.md's first
# source), which no table had measured: every Cross and Shift number so far used the weight proxy C_p = κ·W0ᵀW0.
# The reference sets (tasks.py) are 64 crops of the colour photos bundled with scikit-image and scikit-learn for
# MobileNetV2, and 64 paragraphs of Python's documentation for MiniLM and SmolLM2. The generalized directions (METHOD.md
# direction 1) are the input directions where fine-tuning energy most exceeds pre-training energy, which only means
# what it says with a real C_p. 5 seeds, lr searched on seed 0 as in explore. Fixed before running: a label whose
# seeds 0-4 test mean is above the best PEFT init's gets seeds 5-19 against every PEFT init (reference-confirm).
REFERENCE_LABELS = ["cntlora-cross@pretrain_source=reference", "cntlora-cross-vas@pretrain_source=reference",
                    "cntlora-shift@pretrain_source=reference", "cntlora-cross@pretrain_source=reference,directions=generalized"]
REFERENCE = {t: REFERENCE_LABELS for t in CLASSIFIER_TABLES}
REFERENCE.update({t: ["cntlora-cross@pretrain_source=reference",
                      "cntlora-cross@pretrain_source=reference,base=residual,strength=None"] for t in ("lm", "lm-fewshot")})


# reference-confirm, by the rule above (each label's seeds 0-4 mean is above the best PEFT init's): seeds 5-19 for it
# and seeds 5-19 where missing for every PEFT init that could be best there. text-fewshot had no such label; lm's
# (cntlora-cross@pretrain_source=reference,base=residual,strength=None, 28.21 against PiSSA's 28.32) was left out
# for device time: SmolLM2 travels in five calls, and the weight proxy's form of it already won there (28.18).
REFERENCE_CONFIRM = {
    "text": ["default", "gaussian", "eva", "lora_ga", "cntlora-cross@pretrain_source=reference",
             "cntlora-cross-vas@pretrain_source=reference", "cntlora-cross@pretrain_source=reference,directions=generalized"],
    "vision": ["default", "gaussian", "eva", "lora_ga", "cntlora-cross@pretrain_source=reference",
               "cntlora-cross-vas@pretrain_source=reference", "cntlora-cross@pretrain_source=reference,directions=generalized"],
    "vision-fewshot": ["cntlora-cross-vas@pretrain_source=reference"]}  # its PEFT inits already ran seeds 0-19


def explore_lrs(label: str) -> list:
    """LRS plus the step past the edge that the label's start is likely to choose."""
    return [beyond(LRS[0], up=False), *LRS] if "base=residual" in label else [*LRS, beyond(LRS[-1], up=True)]


def read_logs(logs) -> dict:
    """{table: results} from those of the run logs (oldest first) that exist (report.load_runs)."""
    return load_runs([log for log in logs if Path(log).exists()])


def chosen_lrs(tables: dict) -> dict:
    """{(table, label): (lr chosen on val, the lrs it was chosen from)} from read_logs' tables."""
    out = {}
    for table, results in tables.items():
        for label in dict.fromkeys(r["label"] for r in results["runs"]):
            mine = [r for r in results["runs"] if r["label"] == label]
            out[(table, label)] = (choose_lr(mine, results["higher_is_better"]), {r["lr"] for r in mine})
    return out


def logged_runs(tables: dict) -> set:
    """{(table, label, lr, seed)} of every logged run."""
    return {(table, r["label"], r["lr"], r["seed"]) for table, results in tables.items() for r in results["runs"]}


def beyond(lr: float, up: bool) -> float:
    """The lr half a decade past `lr` on the 1-3-10 series: beyond(3e-3, True) = 1e-2, beyond(3e-4, False) = 1e-4."""
    x = lr * 10 ** (0.5 if up else -0.5)
    exponent = math.floor(math.log10(x))
    mantissa = min((1, 3, 10), key=lambda m: abs(math.log10(x / 10**exponent / m)))
    return float(f"{mantissa}e{exponent}")  # the float of the literal, so it equals the 1e-2 a log holds


def past_grid(lr: float) -> bool:
    return not LRS[0] <= lr <= LRS[-1]


def grouped_specs(part: str, tables: dict, groups: dict) -> list:
    """One Spec TABLE+part per {(table, lr, seeds): labels}, at the table's steps. Several may share a
    name: run_many keys its bookkeeping by name only for select_seeds, which these leave unset."""
    return [Spec(f"{table}+{part}", table, labels, list(seeds), [lr], tables[table]["steps"])
            for (table, lr, seeds), labels in groups.items()]


def edge_specs(tables: dict) -> list:
    """Seed 0 at the lr past the edge of LRS, for every headline (table, label) that chose that edge."""
    logged = logged_runs(tables)
    groups = {}
    for (table, label), (lr, searched) in chosen_lrs(tables).items():
        # a search cut short fixes no edge; a choice already past the grid is edges-seeds' (one step only)
        if table in HEADLINE and set(LRS) <= searched and lr in (LRS[0], LRS[-1]):
            new = beyond(lr, up=lr == LRS[-1])
            if (table, label, new, 0) not in logged:
                groups.setdefault((table, new, (0,)), []).append(label)
    return grouped_specs("edges", tables, groups)


def edge_seed_specs(tables: dict, seeds: int) -> list:
    """Seeds 1.. at the chosen lr of every headline (table, label) whose choice moved past LRS."""
    logged = logged_runs(tables)
    groups = {}
    for (table, label), (lr, searched) in chosen_lrs(tables).items():
        if table not in HEADLINE or not past_grid(lr):
            continue
        if lr in (min(searched), max(searched)):
            print(f"note: {table} {label} chose {lr:g}, again at the edge of {sorted(searched)}; not extended further")
        missing = tuple(s for s in range(1, seeds) if (table, label, lr, s) not in logged)
        if missing:
            groups.setdefault((table, lr, missing), []).append(label)
    return grouped_specs("edges", tables, groups)


def missing_specs(table: str, tables: dict, seeds, labels=METHODS, part: str = "missing", check_edges: bool = True
                  ) -> list:
    """The `table` (label, seed in `seeds`) runs at each label's chosen lr that the logs lack.

    check_edges=False runs them at the chosen lr even at the edge of the grid searched (the explore
    group's labels searched their own grid, one step wider, and get no edge run: a better lr past it
    could only help them)."""
    chosen, logged = chosen_lrs(tables), logged_runs(tables)
    groups = {}
    for label in labels:
        if (table, label) not in chosen:
            print(f"note: {table} {label} has no lr search logged; run the {table} group for it")
            continue
        lr, searched = chosen[(table, label)]
        if check_edges and past_grid(lr):  # edges-seeds runs them
            continue
        if check_edges and set(LRS) <= searched and lr in (LRS[0], LRS[-1]) and (table, label, beyond(lr, lr == LRS[-1]), 0) not in logged:
            print(f"note: {table} {label} chose {lr:g}, the edge of the grid; run the edges group first")
            continue
        missing = tuple(s for s in seeds if (table, label, lr, s) not in logged)
        if missing:
            groups.setdefault((table, lr, missing), []).append(label)
    return grouped_specs(part, tables, groups)


def sensitivity_specs(task: str, steps: int, lrs: list, chosen: dict, **kwargs) -> list:
    """One spec per method of the study, at the lr that method chose from the whole `lrs` grid in the task's
    table if the logs have it (a search cut short does not count), else searching `lrs` on seed 0."""
    by_method = {}
    for sweep in sensitivity_labels().values():
        for _, label in sweep:
            by_method.setdefault(parse_label(label)[0], []).append(label)
    specs = []
    for method, labels in by_method.items():
        lr, searched = chosen.get((task, method), (None, set()))
        fixed = set(lrs) <= searched
        specs.append(Spec(f"{task}-sensitivity+{method}", task, list(dict.fromkeys(labels)), list(range(SENSITIVITY_SEEDS)),
                          [lr] if fixed else lrs, steps, select_seeds=None if fixed else 1, **kwargs))
    return specs


def lr_search_specs(groups: dict, part: str, seeds: list, steps: int) -> list:
    """Specs TABLE+part for {table: labels}, each label searching explore_lrs on seed 0; labels whose grid
    starts below LRS go into TABLE+part-low (run_many counts an lr search's runs by name)."""
    specs = []
    for t, labels in groups.items():
        for lrs in dict.fromkeys(tuple(explore_lrs(label)) for label in labels):
            name = f"{t}+{part}-low" if lrs[0] < LRS[0] else f"{t}+{part}"
            specs.append(Spec(name, t, [label for label in labels if tuple(explore_lrs(label)) == lrs], seeds,
                              list(lrs), steps // 2 if t == "lm-fewshot" else steps, select_seeds=1))
    return specs


def plan(kind: str, seeds: int, steps: int, chosen: Optional[dict] = None) -> list:
    """The specs of a plan, in priority order.

    Args:
        kind: "full" (every group of run_all's --help), "smoke" (every method, a few steps on a slice
            of each task) or "tiny" (the tiny task: checks run_all and write_tables on a CPU in about a minute).
        seeds: seeds per label (0..seeds-1) in the full plan.
        steps: training steps in the full plan (the lm-fewshot table trains half as many).
        chosen: chosen_lrs() of the logs: the sensitivity study runs at the lrs they chose.

    Returns:
        A list of pool.Spec.
    """
    chosen = chosen or {}
    if kind == "tiny":
        tiny = dict(checkpoints=(5, 10))
        return [Spec("tiny", "tiny", ["default", "cntlora-self", "cntlora-cross-vas"], [0, 1, 2], [1e-2, 3e-2], 20,
                      select_seeds=1, **tiny),
                Spec("tiny+a_row_norm", "tiny", ["cntlora-self@a_row_norm=1"], [0, 1, 2], [1e-2, 3e-2], 20,
                     select_seeds=1, **tiny)] + sensitivity_specs("tiny", 20, [1e-2, 3e-2], chosen, **tiny)
    if kind == "smoke":  # every method, a few steps, to check the machine before spending its time
        return [Spec(f"{t}-smoke", t, METHODS, [0], [1e-3], 3, {"quick": True}, (1, 2)) for t in ("text", "vision", "lm")]
    every = list(range(seeds))
    specs = [Spec(f"{t}+a_row_norm", t, A_ROW_NORM, every, LRS, steps, select_seeds=1) for t in ("text-fewshot", "vision-fewshot")]
    # SmolLM2 trains half the steps, to fit the time budget
    specs += [Spec(t, t, METHODS, every, LRS, steps // 2 if t.startswith("lm") else steps, select_seeds=1)
              for t in ("lm-fewshot", "text", "vision")]
    for t in ("text-fewshot", "vision-fewshot"):
        specs += sensitivity_specs(t, steps, LRS, chosen)
    specs += [Spec(t, t, METHODS + VARIANTS, every, LRS, steps, select_seeds=1) for t in ("vision-fewshot", "text-fewshot")]
    # the 800-window lm table: the full steps, one epoch of batch 8 (lm-fewshot's 50 steps are 4 epochs)
    specs.append(Spec("lm", "lm", METHODS, every, LRS, steps, select_seeds=1))
    specs += [Spec(f"{t}+variants", t, labels, every, LRS, steps // 2 if t == "lm-fewshot" else steps, select_seeds=1)
              for t, labels in VARIANTS_GPU.items()]
    specs += lr_search_specs(EXPLORE, "explore", every, steps)
    specs += lr_search_specs(REFERENCE, "reference", every, steps)
    specs += lr_search_specs(CANDIDATE, "candidate", every, steps)
    return specs


def group(spec_name: str) -> str:
    """The --only group of a spec: 'a_row_norm', 'sensitivity', or its own name."""
    if spec_name.endswith("+a_row_norm"):
        return "a_row_norm"
    if spec_name.endswith("+variants"):
        return "variants"
    if spec_name.partition("+")[2].startswith("explore"):
        return "explore"
    if spec_name.endswith("+candidate"):
        return "candidate"
    if spec_name.partition("+")[2].startswith("reference"):
        return "reference"
    return "sensitivity" if "-sensitivity" in spec_name else spec_name


def select(specs: list, only, follow_ups: Optional[dict] = None) -> list:
    """The specs named by `only` (groups or spec names), in that order; follow_ups: {group: specs} built
    from the logs (FOLLOW_UPS), which may be empty when the logs leave nothing to do."""
    follow_ups = follow_ups or {}
    out = []
    for name in only:
        chosen = follow_ups[name] if name in follow_ups else [s for s in specs if name in (s.name, group(s.name))]
        if not chosen and name not in follow_ups:
            names = [group(s.name) for s in specs] + [s.name for s in specs] + list(FOLLOW_UPS)
            raise SystemExit(f"run_all: no spec or group {name!r} in this plan; choose from {', '.join(dict.fromkeys(names))}")
        out += [s for s in chosen if s not in out]
    return out


def follow_up_specs(name: str, tables: dict, seeds: int) -> list:
    """The specs of a follow-up group (FOLLOW_UPS), built from the logged runs.

    Args:
        name: the group.
        tables: read_logs' tables.
        seeds: seeds per label of the headline tables (0..seeds-1).

    Returns:
        A list of pool.Spec; empty when the logs leave nothing to do.

    Raises:
        KeyError: `name` is not a follow-up group.
    """
    if name == "edges":
        return edge_specs(tables)
    if name == "edges-seeds":
        return edge_seed_specs(tables, seeds)
    if name in MISSING:
        return missing_specs(MISSING[name], tables, range(seeds))
    groups = {  # group: ({table: labels}, seeds of a table, spec part)
        "explore-missing": (EXPLORE, lambda t: range(seeds), "missing"),
        "confirm": (CONFIRM, lambda t: FRESH_SEEDS, "confirm"),
        "reference-confirm": (REFERENCE_CONFIRM, lambda t: range(FRESH_SEEDS.start, SECOND_FRESH_SEEDS.stop),
                              "reference-confirm"),
        "confirm2": (CONFIRM2, lambda t: CONFIRM2_SEEDS[t], "confirm2"),
    }
    labels_of, seeds_of, part = groups[name]
    return [s for t, labels in labels_of.items() for s in missing_specs(t, tables, seeds_of(t), labels, part,
                                                                         check_edges=False)]
