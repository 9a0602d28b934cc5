"""Run the quality benchmark's plan (headline tables, a_row_norm sweep, sensitivity study) and log every run.

Each finished run is appended to OUT/runs.jsonl at once, so a run cut short by a time limit
still leaves everything it finished; bench/quality/report.py turns the log into
summary.json, the per-task JSON, the plots and the markdown tables.

    python bench/quality/run_all.py --out DIR [--workers 15] [--plan full|smoke|tiny] [--only GROUP|SPEC ...] [--dry-run]

--plan full, in priority order (the groups --only takes; the specs run in the order given):
  a_row_norm   text-fewshot+a_row_norm, vision-fewshot+a_row_norm (folded into the few-shot tables)
  lm-fewshot, text, vision   every method, the headline tables
  sensitivity  TASK-sensitivity+METHOD on text-fewshot and vision-fewshot, each method at the lr
               it chose in TASK's table of the --lr-from logs (the LRS grid when it has none)
  vision-fewshot, text-fewshot   the few-shot headline tables (an earlier session ran them)
  lm           SmolLM2 on 800 windows, 100 steps (one epoch), every method
Follow-up groups, built from the --lr-from logs (only with --only; the dry run lists their labels):
  edges        every (table, label) of the headline tables whose lr chosen on the whole LRS grid is
               at its edge: seed 0 at the next lr past that edge (3e-3 -> 1e-2, 3e-4 -> 1e-4),
               spec TABLE+edges; combinations already logged are skipped. One step: a choice already
               past the grid is not extended again
  edges-seeds  every headline (table, label) whose choice (same rule, seed 0's val) now lies past
               the grid: seeds 1..4 at that lr, spec TABLE+edges; give it the edges run's log too:
                 run_all.py --out $OUT --only edges --lr-from bench/results/quality-runs.jsonl &&
                 run_all.py --out $OUT --only edges-seeds --lr-from bench/results/quality-runs.jsonl $OUT/runs.jsonl
  TABLE-missing (lm-missing, text-fewshot-missing, ...)   the (METHODS label, seed 0..4) runs of that table at each label's
               chosen lr that the logs lack, spec TABLE+missing; labels whose choice lies past the
               grid are left to edges-seeds (so the two can run together), and labels at an edge of
               the grid whose edges run is not logged yet wait for it (a note says so)
  reference-confirm  seeds 5-19 of REFERENCE_CONFIRM's labels where missing, at their chosen lrs
  confirm2     seeds 10-19 (text-fewshot: 5-19 where missing) of CONFIRM2's labels at their chosen lrs
The last groups of --plan full:
  variants     the fixes worth checking where CNTLoRA loses (VARIANTS_GPU): on lm, cntlora-self with A
               at the row norm of PEFT's gaussian init and with the uncapped residual start; on
               vision-fewshot, the uncapped residual start (earlier sessions ran it on text-fewshot
               and lm-fewshot on a CPU); 5 seeds, lr searched on seed 0
  candidate    cntlora-self-vas@a_row_norm=1 (vision-fewshot's winner) on text, vision, lm-fewshot and lm, where it
               never ran: could it be the default? 5 seeds, lr searched on seed 0 over LRS and one step up
  reference    Cross and Shift with a real reference set (pretrain_source=reference) on every table (REFERENCE); 5
               seeds, lr searched on seed 0 over LRS and one step past the edge the start is likely to choose
  explore      the objective truncation (subspace, VAS, uncapped residual) on every headline table, and the
               settings earlier sessions listed as not tried (EXPLORE); 5 seeds, lr searched on seed 0 over
               LRS plus one step past the edge the start is likely to choose
--dry-run prints each spec's jobs (one init, trained at each of its lrs), training runs and a
rough worker-seconds estimate, and exits.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from cntlora.bench.baselines import METHODS
from cntlora.bench.quality import (FRESH_SEEDS, SECOND_FRESH_SEEDS, Spec, choose_lr, first_seeds, load_runs, parse_label, run_many,
                                   sensitivity_labels)

LRS = [3e-4, 1e-3, 3e-3]
# where CNTLoRA might lose, the settings worth checking: base handling, pre-training source, VAS score
VARIANTS = ["cntlora-cross@base=residual", "cntlora-self@base=residual", "cntlora-cross@base=keep",
            "cntlora-cross@pretrain_source=isotropic", "cntlora-cross-vas@vas_score=weight"]
# A's row norm in subspace mode (PEFT's 1/sqrt(3) by default) against the best PEFT inits on the few-shot tasks
# (the PEFT inits and plain cntlora-self ran with 5 seeds in the earlier session's headline run of the
# same code; default runs again, as a check that the two sessions' numbers agree)
A_ROW_NORM = ["default", "cntlora-self@a_row_norm=1", "cntlora-self@a_row_norm=2", "cntlora-self-vas@a_row_norm=1"]
SENSITIVITY_SEEDS = 3

# rough worker-seconds on the H200 shared by 15 workers, read off the earlier session's log
# (bench/results/quality-runs.jsonl): EVA and CorDA inits took 46-81 s, the others 1-10 s, and a
# 100-step run with its evaluations about 9 s (the run's wall time less its inits, per run).
# SmolLM2 never ran there, so its numbers are guesses: 3-5× MiniLM's step (3× the FLOPs, 5× the
# layers, and small models on a shared GPU are bound by kernel launches), inits 2× slower.
# New records carry train_seconds, so the next plan can be sized from measurements.
INIT_SECONDS = {"eva": 80, "corda": 60}
OTHER_INIT_SECONDS = 5
TRAIN_SECONDS = {"text": 9, "vision": 9, "lm": 35, "tiny": 1}  # per 100 steps
LM_INIT_FACTOR = 2
STARTUP_SECONDS = 60  # spawning the workers and building each task in every worker


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

# The fifth session's group, `explore`: the objective truncation (the rank-r update that minimizes the
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
# each is checked on fresh seeds (quality.FRESH_SEEDS, 5-9), decided before those seeds ran, against the PEFT inits that
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


# The sixth session's checks, fixed here before any of their runs (seeds 10-19 had never run anywhere).
# confirm2: vision-fewshot's winner, cntlora-self-vas@a_row_norm=1, beat the validation-chosen PiSSA on seeds
# 0-9 but tied LoRA-GA (p = 0.05) and EVA (p = 0.07), whose spread over seeds is large; on text-fewshot it beat
# default LoRA and tied LoRA-GA, and the default cntlora-self lost to LoRA-GA. Ten more seeds (SECOND_FRESH_SEEDS)
# for the setting, its plain form and every PEFT init that could be best (OLoRA diverged on vision-fewshot and
# PiSSA trailed on text-fewshot, so those two stay out); EVA and CorDA also get text-fewshot's seeds 5-9,
# which the fifth session left out. The question: does the setting beat each PEFT init over seeds 0-19 with
# Holm's correction over them (quality.against_every_baseline), and on seeds 10-19 alone?
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
# The reference sets (bench/tasks.py) are 64 crops of the colour photos bundled with scikit-image and scikit-learn for
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
    """{table: results} from those of the run logs (oldest first) that exist (quality.load_runs)."""
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


def plan(kind: str, seeds: int, steps: int, chosen: dict = None) -> list:
    chosen = chosen or {}
    if kind == "tiny":  # checks this script and report.py on a CPU in about a minute
        tiny = dict(checkpoints=(5, 10))
        return [Spec("tiny", "tiny", ["default", "cntlora-self", "cntlora-cross-vas"], [0, 1, 2], [1e-2, 3e-2], 20,
                      select_seeds=1, **tiny),
                Spec("tiny+a_row_norm", "tiny", ["cntlora-self@a_row_norm=1"], [0, 1, 2], [1e-2, 3e-2], 20,
                     select_seeds=1, **tiny)] + sensitivity_specs("tiny", 20, [1e-2, 3e-2], chosen, **tiny)
    if kind == "smoke":  # every method, a few steps, to check the machine before spending its time
        return [Spec(f"{t}-smoke", t, METHODS, [0], [1e-3], 3, {"quick": True}, (1, 2)) for t in ("text", "vision", "lm")]
    every = list(range(seeds))
    specs = [Spec(f"{t}+a_row_norm", t, A_ROW_NORM, every, LRS, steps, select_seeds=1) for t in ("text-fewshot", "vision-fewshot")]
    # SmolLM2 trains half the steps (the issue allows fewer steps for lm to fit the time budget)
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


def select(specs: list, only, follow_ups: dict = None) -> list:
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


def estimate(spec: Spec) -> tuple:
    """(jobs, training runs, worker-seconds) of a spec, assuming each lr search picks one lr."""
    kind = spec.task.split("-")[0]
    first = len(first_seeds(spec))
    rest = len(spec.seeds) - first
    jobs = runs = seconds = 0
    for label in spec.methods:
        init = INIT_SECONDS.get(parse_label(label)[0], OTHER_INIT_SECONDS) * (LM_INIT_FACTOR if kind == "lm" else 1)
        n = first * len(spec.lrs) + rest
        jobs += first + rest
        runs += n
        seconds += (first + rest) * init + n * TRAIN_SECONDS.get(kind, 9) * spec.steps / 100
    return jobs, runs, seconds


def print_plan(specs: list, workers: int, detail: bool = False) -> None:
    print(f"{'spec':44} {'labels':>6} {'seeds':>5} {'lrs':>9} {'jobs':>5} {'runs':>5} {'worker-s':>9}")
    total = [0, 0, 0]
    for s in specs:
        jobs, runs, seconds = estimate(s)
        lrs = f"{len(s.lrs)}" + (f" (sel {s.select_seeds})" if s.select_seeds else f" = {s.lrs[0]:g}" if len(s.lrs) == 1 else "")
        print(f"{s.name:44} {len(s.methods):6} {len(s.seeds):5} {lrs:>9} {jobs:5} {runs:5} {seconds:9.0f}")
        if detail:
            print(f"    lr {', '.join(f'{lr:g}' for lr in s.lrs)}, seeds {list(s.seeds)}: {', '.join(s.methods)}")
        total = [t + x for t, x in zip(total, (jobs, runs, seconds))]
    print(f"total: {total[0]} jobs, {total[1]} training runs, ~{total[2]:.0f} worker-s: "
          f"~{total[2] / workers + STARTUP_SECONDS:.0f} s on {workers} workers (rough; lm is a guess)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for runs.jsonl (required unless --dry-run)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--plan", choices=["full", "smoke", "tiny"], default="full")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--only", nargs="+", default=None, help="groups or spec names to run, in this order (default: the whole plan)")
    p.add_argument("--lr-from", nargs="*", default=["bench/results/quality-runs.jsonl"],
                   help="run logs (oldest first) whose chosen lrs fix the sensitivity study's lrs and the follow-up groups")
    p.add_argument("--dry-run", action="store_true", help="print the jobs and a worker-seconds estimate, run nothing")
    p.add_argument("--device", default=None)
    p.add_argument("--tables", nargs="+", default=None,
                   help="keep only the specs of these tables (e.g. leave lm out where SmolLM2 is not on the machine)")
    p.add_argument("--labels", nargs="+", default=None,
                   help="keep only these labels in the chosen specs (e.g. one new variant of a group already run)")
    a = p.parse_args(argv)
    tables = read_logs(a.lr_from)
    specs = plan(a.plan, a.seeds, a.steps, chosen_lrs(tables))
    builders = {"edges": lambda: edge_specs(tables), "edges-seeds": lambda: edge_seed_specs(tables, a.seeds),
                **{name: (lambda t=table: missing_specs(t, tables, range(a.seeds))) for name, table in MISSING.items()},
                "explore-missing": lambda: [s for t, labels in EXPLORE.items()
                                            for s in missing_specs(t, tables, range(a.seeds), labels, check_edges=False)],
                "confirm": lambda: [s for t, labels in CONFIRM.items()
                                    for s in missing_specs(t, tables, FRESH_SEEDS, labels, "confirm", check_edges=False)],
                "reference-confirm": lambda: [s for t, labels in REFERENCE_CONFIRM.items()
                                              for s in missing_specs(t, tables, range(FRESH_SEEDS.start, SECOND_FRESH_SEEDS.stop),
                                                                     labels, "reference-confirm", check_edges=False)],
                "confirm2": lambda: [s for t, labels in CONFIRM2.items()
                                     for s in missing_specs(t, tables, CONFIRM2_SEEDS[t], labels, "confirm2",
                                                            check_edges=False)]}
    if a.only:
        specs = select(specs, a.only, {name: builders[name]() for name in FOLLOW_UPS if name in a.only})
    if a.tables:
        specs = [s for s in specs if s.task in a.tables]
    if a.labels:
        specs = [replace(s, methods=[m for m in s.methods if m in a.labels]) for s in specs]
        specs = [s for s in specs if s.methods]
    print_plan(specs, a.workers, detail=bool(set(a.only or ()) & set(FOLLOW_UPS)))
    if not specs:  # the logs left nothing to do: succeed without a log, so a chained command goes on
        print("nothing to run")
        return 0
    if a.dry_run:
        return 0
    if not a.out:
        p.error("--out is required")
    import torch

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "runs.jsonl", "a")
    t0 = time.time()

    def write(kind, name, data):
        log.write(json.dumps({"kind": kind, "spec": name, "data": data}) + "\n")
        log.flush()

    print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}; "
          f"{sum(len(s.methods) for s in specs)} labels in {len(specs)} specs; {a.workers} workers", flush=True)
    run_many(specs, a.workers, a.device, on_run=lambda n, r: write("run", n, r),
             on_start=lambda n, meta: write("meta", n, meta),
             log=lambda line: print(f"[{time.time() - t0:6.1f}s] {line}", flush=True))
    print(f"done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
