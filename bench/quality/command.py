"""Train CNTLoRA and PEFT's inits side by side on one task and compare their quality.

Every method gets the same model, LoRA budget, calibration batches, data order per seed,
optimizer and steps; each method's learning rate is picked on the validation split (never
test); test metrics are reported at that rate over the seeds, with paired 95% intervals
against PEFT's default LoRA and the best PEFT init. Writes OUT/quality-<task>.json, merges
the task's entry into OUT/summary.json, draws the plots and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cntlora.files import write_json

from .baselines import METHODS
from .pool import Spec, run_many
from .protocol import DEFAULT_CHECKPOINTS, run_quality
from .report import RESULTS_JSON, format_table, plot_task, summarize, summary_entry, update_summary
from .task import parse_label

EXAMPLES = ("examples:\n"
            "  cntlora bench quality --task text-fewshot --methods default cntlora-self --seeds 5 --device cpu\n"
            "  python -m bench.quality --task tiny --quick")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the quality benchmark's options to `parser`."""
    from .tasks import TASKS

    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="which task to run")
    parser.add_argument("--quick", action="store_true", help="a few steps on a tiny slice, one seed, one lr (smoke test)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"method labels (default: all of {', '.join(METHODS)}); add @key=value,... to override settings")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    parser.add_argument("--select-seeds", type=int, default=None, help="pick each method's lr on the first K seeds only")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="learning-rate grid")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--train-size", type=int, default=None, help="training examples (default: the task's)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON results and plots")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (one device shared)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark as add_arguments' options say; write the results, plots and table.

    Plots are skipped with --quick unless $CNTLORA_BENCH_PLOTS is set.

    Returns:
        0.

    Raises:
        CNTLoRAError: a bad method label (before any training) or an unknown task.
    """
    from .tasks import make_task

    quick = args.quick
    task_kwargs = {"quick": True} if quick else {}
    if args.train_size is not None:
        task_kwargs["train_size"] = args.train_size
    methods = args.methods or list(METHODS)
    seeds = [0] if quick else list(range(args.seeds))
    lrs = args.lrs[:1] if quick else args.lrs
    steps = 3 if quick else args.steps
    checkpoints = (1, 2) if quick else DEFAULT_CHECKPOINTS
    for label in methods:
        parse_label(label)  # fail before any training on a bad label
    if args.workers > 1:
        spec = Spec(args.task, args.task, methods, seeds, lrs, steps, task_kwargs, checkpoints, args.select_seeds)
        results = run_many([spec], args.workers, args.device)[args.task]
    else:
        task = make_task(args.task, **task_kwargs)
        results = run_quality(task, methods, seeds, lrs, steps, checkpoints, args.device, args.select_seeds)
    name = results["task"]
    out = Path(args.out)
    summary = summarize(results)
    write_json(out / f"quality-{name}.json", {"results": results, "summary": summary}, **RESULTS_JSON)
    update_summary(out / "summary.json", name, summary_entry(summary))
    if not quick or os.environ.get("CNTLORA_BENCH_PLOTS"):
        plot_task(summary, out)
    print(format_table(summary))
    return 0
