"""The DreamBooth benchmark's plan and its command line.

Phases:
- dev: seed 0 on the development subjects. The PEFT inits and CNTLoRA's plain Self, Cross
  and Shift search the lr grid (the best mean validation-view fidelity wins:
  dreambooth_report.choose_lrs); every other CNTLoRA setting then runs at its mode's lr. The
  CNTLoRA setting called the result is picked here (PREREGISTRATION.md).
- confirm: fresh seeds on the other subjects, every method at its dev lr; the reported numbers.

Groups of runs go to worker processes (one stack of K runs each); every finished group is
appended to runs.jsonl at once, so a run that hits its time budget still leaves its data.

    python -m bench.diffusion.dreambooth_run --phase dev --out runs/dreambooth
    python -m bench.diffusion.dreambooth_run --phase confirm --choices runs/dreambooth/lrs.json --out ...
    python -m bench.diffusion.dreambooth_run --tiny --phase dev --steps 2 --out /tmp/db   # a CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from . import methods
from .dreambooth import Bench, Protocol, RunSpec, run_group

DEV_SEEDS = (0,)
CONFIRM_SEEDS = (1, 2, 3, 4, 5)
# subjects in load_subjects() order: the first three choose lrs and the setting, the others confirm
DEV_SUBJECTS = (0, 3)
CONFIRM_SUBJECTS = (3, None)
LRS = (3e-4, 1e-3, 3e-3)
# development-phase variants on the attention set: what moves CNTLoRA's numbers (ΔW's scale
# entering the weights, the timesteps the statistics come from, A's row norm, the rank cap of
# prompt-only layers)
DIAGNOSTICS = ["cntlora-self@base=keep", "cntlora-cross@prior,base=keep", "cntlora-cross@prior,base=residual",
               "cntlora-cross@prior,weighting=logit_normal,logit_mean=-1.5",
               "cntlora-cross@prior,weighting=logit_normal,logit_mean=1.5", "cntlora-cross@prior,a_row_norm=1.0",
               "cntlora-self@cap_context_rank=false"]


def method_labels(target_set: str, extra: Sequence[str] = ()) -> List[str]:
    """Every method of a target set: PEFT's inits (those that cannot run there report why) and CNTLoRA's settings."""
    return methods.PEFT_METHODS + methods.cntlora_labels() + list(extra)


def representative(label: str) -> str:
    """The method whose lr search a label's lr comes from: PEFT inits and the CNTLoRA modes'
    plain settings (cntlora-self, cntlora-cross@prior, cntlora-shift@prior) search their own;
    every other CNTLoRA setting takes its mode's."""
    m = methods.parse_method(label)
    if not m.is_cntlora:
        return label
    mode = dict(m.config)["mode"]
    return "cntlora-self" if mode == "self" else f"cntlora-{mode}@prior"


def plan_groups(specs: Sequence[RunSpec], max_runs: int, first: Sequence[str] = ()) -> List[List[RunSpec]]:
    """Split runs into groups of one target set, at most max_runs each (as even as that allows).

    Runs of the methods in `first` ("label" or "target set|label") come first, in that order,
    then the rest in the order of `specs`.
    """
    rank = {label: i for i, label in enumerate(first)}
    order = {label: i for i, label in enumerate(dict.fromkeys(s.label for s in specs))}
    key = lambda s: (rank.get(f"{s.target_set}|{s.label}", rank.get(s.label, len(rank))), order[s.label], s.subject,
                     s.seed, s.lr)
    groups = []
    for ts in dict.fromkeys(s.target_set for s in specs):
        runs = sorted((s for s in specs if s.target_set == ts), key=key)
        n = -(-len(runs) // max_runs)
        size = -(-len(runs) // n)
        groups += [runs[i : i + size] for i in range(0, len(runs), size)]
    return sorted(groups, key=lambda g: key(g[0])[:2])


def confirm_specs(subjects: Sequence[str], choices: Dict[str, Dict[str, float]], seeds: Sequence[int] = CONFIRM_SEEDS,
                  phase: str = "confirm") -> List[RunSpec]:
    """choices: {target set: {label: lr}} (dreambooth_report.choose_lrs)."""
    return [RunSpec(ts, label, subj, seed, lr, phase) for ts, by_label in choices.items()
            for label, lr in by_label.items() for subj in subjects for seed in seeds]


# -----------------------------------------------------------------------------
# workers: each holds one Bench (denoiser, encoder, priors) and trains whole groups

_BENCH: dict = {}


def _worker_init(protocol: dict, device: str, cache: str, root: Optional[str], threads: int) -> None:
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    _BENCH["bench"] = Bench(Protocol(**protocol), device, Path(cache), None if root is None else Path(root))


def _work(job: tuple) -> tuple:
    specs, fidelity_at, keep, deadline = job
    try:
        return run_group(_BENCH["bench"], specs, fidelity_at, keep, deadline)
    except Exception as err:  # a failed group is recorded, the others go on
        import traceback

        text = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=6)}"
        return [{**asdict(s), "error": text} for s in specs], {}


def execute(groups: Sequence[list], protocol: Protocol, out: Path, device: str = "cpu", workers: int = 0,
            cache: Optional[Path] = None, root: Optional[Path] = None, fidelity_at=None, keep_samples: Sequence[str] = (),
            deadline: Optional[float] = None, threads: int = 2, log=print) -> List[dict]:
    """Run every group and append its records to out/runs.jsonl as it finishes; samples go to out/samples.pt."""
    out.mkdir(parents=True, exist_ok=True)
    cache = cache or out / "cache"
    init = (asdict(protocol), device, str(cache), None if root is None else str(root), threads)
    jobs = [(g, fidelity_at, tuple(keep_samples), deadline) for g in groups]
    records, samples = [], {}
    t0 = time.time()

    def collect(result):
        recs, smp = result
        records.extend(recs)
        samples.update(smp)
        with open(out / "runs.jsonl", "a") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        if smp:
            torch.save(samples, out / "samples.pt")
        bad = sum(1 for r in recs if r.get("error"))
        log(f"[{time.time() - t0:7.1f}s] group {recs[0]['target_set']} {recs[0]['label']} ... {len(recs)} runs, "
            f"{bad} not trained; {len(records)} runs so far")

    _worker_init(*init)  # the main process makes the cached priors once (and runs the groups itself without workers)
    if workers <= 0:
        for job in jobs:
            collect(_work(job))
        return records
    del _BENCH["bench"]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=init) as pool:
        for result in pool.imap_unordered(_work, jobs):
            collect(result)
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=("dev", "confirm"), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=None, help="class priors and the pre-training sample (default OUT/cache)")
    ap.add_argument("--choices", type=Path, help="lrs.json from the dev phase (confirm)")
    ap.add_argument("--extra", nargs="*", default=[], help="more method labels for the dev phase (attention set)")
    ap.add_argument("--diagnostics", action="store_true", help="add DIAGNOSTICS to --extra")
    ap.add_argument("--first", nargs="*", default=[], help='methods whose runs go first ("label" or "target set|label")')
    ap.add_argument("--only", nargs="*", default=None, help='run only these methods ("label" or "target set|label")')
    ap.add_argument("--target-sets", nargs="*", default=list(methods.TARGET_SETS))
    ap.add_argument("--subject-range", type=int, nargs=2, default=None,
                    help="subjects [START, STOP) of load_subjects(); default: the phase's (DEV_SUBJECTS, CONFIRM_SUBJECTS)")
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--lrs", type=float, nargs="*", default=list(LRS))
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=float, default=None, help="seconds; groups not started by then are skipped")
    ap.add_argument("--tiny", action="store_true", help="tiny random artifacts (a CPU check of the pipeline)")
    for f in fields(Protocol):
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--fidelity-at", type=int, nargs="*", default=None)
    args = ap.parse_args(argv)
    deadline = None if args.budget is None else time.time() + args.budget
    root = None
    if args.tiny:
        from .dreambooth_tiny import make_tiny_artifacts

        root = make_tiny_artifacts(args.out / "tiny_artifacts")
    protocol = Protocol(**{f.name: getattr(args, f.name) for f in fields(Protocol)
                           if hasattr(args, f.name) and f.name != "fidelity_at"})
    if args.fidelity_at is not None:
        protocol.fidelity_at = tuple(args.fidelity_at)
    from . import assets

    names = [s.name for s in assets.load_subjects(root)]
    lo, hi = args.subject_range or (DEV_SUBJECTS if args.phase == "dev" else CONFIRM_SUBJECTS)
    subjects = names[lo:hi]
    run = lambda specs, fidelity_at, keep: execute(
        plan_groups(specs, protocol.max_runs, args.first), protocol, args.out, args.device, args.workers, args.cache,
        root, fidelity_at, keep, deadline, args.threads, log=lambda s: print(s, flush=True))
    t0 = time.time()
    if args.phase == "dev":
        labels = {}
        for ts in args.target_sets:
            extra = (args.extra + (DIAGNOSTICS if args.diagnostics else [])) if ts == "attention" else []
            labels[ts] = [l for l in method_labels(ts, extra) if args.only is None or l in args.only]
        search = [RunSpec(ts, l, subj, seed, lr) for ts, ls in labels.items() for l in ls if representative(l) == l
                  for subj in subjects for seed in (args.seeds or DEV_SEEDS) for lr in args.lrs]
        print(f"lr search: {len(search)} runs", flush=True)
        records = run(search, (), ())
        from .dreambooth_report import choose_lrs

        chosen = choose_lrs(records)
        rest = [RunSpec(ts, l, subj, seed, chosen[ts][representative(l)]) for ts, ls in labels.items() for l in ls
                if representative(l) != l and representative(l) in chosen.get(ts, {})
                for subj in subjects for seed in (args.seeds or DEV_SEEDS)]
        print(f"settings at their mode's lr: {len(rest)} runs", flush=True)
        records += run(rest, (), ())
    else:
        choices = json.loads(args.choices.read_text())
        if args.only is not None:
            choices = {ts: {l: lr for l, lr in c.items() if l in args.only or f"{ts}|{l}" in args.only}
                       for ts, c in choices.items()}
        choices = {ts: c for ts, c in choices.items() if ts in args.target_sets}
        seeds = tuple(args.seeds or CONFIRM_SEEDS)
        specs = confirm_specs(subjects, choices, seeds)
        print(f"{len(specs)} runs", flush=True)
        records = run(specs, None, (f"{subjects[0]}:{seeds[0]}",))
    trained = sum(1 for r in records if not r.get("error"))
    print(f"done: {trained} of {len(records)} runs trained in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
