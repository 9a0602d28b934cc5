"""Run one half of the ViT suite on a GPU, logging every run to OUT/runs.jsonl as it finishes.

    python -m bench.vit.run dev --out OUT [--workers 15]
    python -m bench.vit.run confirm --out OUT --labels LABEL ...   # the rule's labels (PREREGISTRATION.md)
    python -m bench.vit.run both --out OUT             # both halves in one call, most needed first (plan.priority_specs)
    python -m bench.vit.run both --out OUT --resume bench/results/vit/runs*.jsonl.xz   # only what no log holds
    python -m bench.vit.run followup --out OUT --resume bench/results/vit/runs*.jsonl.xz   # plan.FOLLOWUP, both halves
    python -m bench.vit.run layers --out OUT --resume bench/results/vit/runs*.jsonl.xz     # plan.LAYERS, both halves
    python -m bench.vit.run edges --out OUT --resume bench/results/vit/runs*.jsonl.xz   # past each lr edge chosen
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..quality.pool import RunLog, run_many
from ..quality.report import load_runs
from . import plan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("half", choices=("dev", "confirm", "both", *plan.STUDIES, "edges"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=15)
    parser.add_argument("--labels", nargs="+", default=None, help="method labels (default: the half's plan)")
    parser.add_argument("--tasks", nargs="+", default=None, help="a subset of the half's tasks")
    parser.add_argument("--regimes", nargs="+", choices=("1k", "fewshot"), default=("1k", "fewshot"))
    parser.add_argument("--sizes", action="store_true", help="add the true-sample size sweep (1k regime)")
    parser.add_argument("--resume", nargs="+", type=Path, default=(), metavar="RUNS_JSONL",
                        help="earlier logs: their runs are not run again, and their lr choices stand")
    args = parser.parse_args(argv)
    tasks = args.tasks or (plan.DEV if args.half == "dev" else plan.CONFIRM)
    labels = args.labels or plan.DEV_LABELS
    missing = [str(p) for p in args.resume if not p.is_file()]
    if missing:
        parser.error(f"--resume: no such log {', '.join(missing)}")
    if args.half == "edges" and not args.resume:
        parser.error("edges: give the logs whose lr choices it extends (--resume bench/results/vit/runs*.jsonl.xz)")
    if args.half == "edges":
        from .report import accuracies

        chosen = {}
        accuracies(args.resume, chosen, lrs=plan.LRS)
        specs, tasks, labels = plan.edge_specs(chosen), plan.TASK_ORDER, plan.DEV_LABELS + plan.FOLLOWUP
    elif args.half == "both":
        specs = plan.priority_specs(plan.SIZES if args.sizes else ())
        tasks, labels = plan.TASK_ORDER, plan.DEV_LABELS
    elif args.half in plan.STUDIES:
        specs, tasks, labels = plan.study_specs(args.half), plan.TASK_ORDER, plan.STUDIES[args.half]
    else:
        specs = plan.specs(tasks, labels, tuple(r == "fewshot" for r in args.regimes), plan.SIZES if args.sizes else ())
    done = {name: results["runs"] for name, results in load_runs(args.resume).items()} if args.resume else None
    args.out.mkdir(parents=True, exist_ok=True)
    log = RunLog(args.out / "runs.jsonl")
    t0 = time.perf_counter()
    n = 0

    def line(text):
        nonlocal n
        n += 1
        print(f"[{time.perf_counter() - t0:6.0f}s #{n}] {text}", flush=True)

    try:
        run_many(specs, workers=args.workers, on_run=log.on_run, on_start=log.on_start, log=line, done=done)
    finally:
        log.close()
    (args.out / "run.json").write_text(json.dumps({"half": args.half, "tasks": list(tasks), "labels": labels,
                                                   "seconds": time.perf_counter() - t0}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
