"""Run the quality benchmark's plan (headline tables, a_row_norm sweep, sensitivity study) and log every run.

Each finished run is appended to OUT/runs.jsonl at once, so a run cut short by a time limit
still leaves everything it finished; `python -m bench.quality.write_tables` turns the log
into summary.json, the per-task JSON, the plots and the markdown tables. From the repository root:

    python -m bench.quality.run_all --out DIR [--workers 15] [--plan full|smoke|tiny] [--only GROUP|SPEC ...] [--dry-run]

--plan full, in priority order (the groups --only takes; the specs run in the order given):
  a_row_norm   text-fewshot+a_row_norm, vision-fewshot+a_row_norm (folded into the few-shot tables)
  lm-fewshot, text, vision   every method, the headline tables
  sensitivity  TASK-sensitivity+METHOD on text-fewshot and vision-fewshot, each method at the lr
               it chose in TASK's table of the --lr-from logs (the LRS grid when it has none)
  vision-fewshot, text-fewshot   the few-shot headline tables
  lm           SmolLM2 on 800 windows, 100 steps (one epoch), every method
Follow-up groups, built from the --lr-from logs (only with --only; the dry run lists their labels):
  edges        every (table, label) of the headline tables whose lr chosen on the whole LRS grid is
               at its edge: seed 0 at the next lr past that edge (3e-3 -> 1e-2, 3e-4 -> 1e-4),
               spec TABLE+edges; combinations already logged are skipped. One step: a choice already
               past the grid is not extended again
  edges-seeds  every headline (table, label) whose choice (same rule, seed 0's val) now lies past
               the grid: seeds 1..4 at that lr, spec TABLE+edges; give it the edges run's log too:
                 python -m bench.quality.run_all --out $OUT --only edges --lr-from bench/results/quality-runs.jsonl &&
                 python -m bench.quality.run_all --out $OUT --only edges-seeds --lr-from bench/results/quality-runs.jsonl $OUT/runs.jsonl
  TABLE-missing (lm-missing, text-fewshot-missing, ...)   the (METHODS label, seed 0..4) runs of that table at each label's
               chosen lr that the logs lack, spec TABLE+missing; labels whose choice lies past the
               grid are left to edges-seeds (so the two can run together), and labels at an edge of
               the grid whose edges run is not logged yet wait for it (a note says so)
  explore-missing  seeds 0..4 of EXPLORE's labels where missing, at their chosen lrs
  confirm      seeds 5-9 of CONFIRM's labels where missing, at their chosen lrs
  reference-confirm  seeds 5-19 of REFERENCE_CONFIRM's labels where missing, at their chosen lrs
  confirm2     seeds 10-19 (text-fewshot: 5-19 where missing) of CONFIRM2's labels at their chosen lrs
The last groups of --plan full:
  variants     the fixes worth checking where CNTLoRA loses (VARIANTS_GPU): on lm, cntlora-self with A
               at the row norm of PEFT's gaussian init and with the uncapped residual start; on
               vision-fewshot, the uncapped residual start (it ran on text-fewshot and lm-fewshot
               on a CPU before); 5 seeds, lr searched on seed 0
  candidate    cntlora-self-vas@a_row_norm=1 (vision-fewshot's winner) on text, vision, lm-fewshot and lm, where it
               never ran: could it be the default? 5 seeds, lr searched on seed 0 over LRS and one step up
  reference    Cross and Shift with a real reference set (pretrain_source=reference) on every table (REFERENCE); 5
               seeds, lr searched on seed 0 over LRS and one step past the edge the start is likely to choose
  explore      the objective truncation (subspace, VAS, uncapped residual) on every headline table, and the
               settings listed as not tried yet (EXPLORE); 5 seeds, lr searched on seed 0 over
               LRS plus one step past the edge the start is likely to choose
--dry-run prints each spec's jobs (one init, trained at each of its lrs), training runs and a
rough worker-seconds estimate, and exits.
"""

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from .plan import FOLLOW_UPS, chosen_lrs, follow_up_specs, plan, read_logs, select
from .pool import RunLog, Spec, first_seeds, run_many
from .task import parse_label

# rough worker-seconds on the H200 shared by 15 workers, read off an earlier run's log
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
    """Print one line per spec (labels, seeds, lrs, jobs, runs, worker-seconds) and the total; detail adds
    each spec's lrs, seeds and labels."""
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


def main(argv=None) -> int:
    """Print the plan's jobs and, unless --dry-run, run them and log every run (see the module's docstring).

    Returns:
        0.
    """
    p = argparse.ArgumentParser(prog="python -m bench.quality.run_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    if a.only:
        follow_ups = {name: follow_up_specs(name, tables, a.seeds) for name in FOLLOW_UPS if name in a.only}
        specs = select(specs, a.only, follow_ups)
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
    log = RunLog(out / "runs.jsonl")
    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}; "
          f"{sum(len(s.methods) for s in specs)} labels in {len(specs)} specs; {a.workers} workers", flush=True)
    run_many(specs, a.workers, a.device, on_run=log.on_run, on_start=log.on_start,
             log=lambda line: print(f"[{time.time() - t0:6.1f}s] {line}", flush=True))
    log.close()
    print(f"done in {time.time() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":  # run_many's spawned workers import this module too
    sys.exit(main())