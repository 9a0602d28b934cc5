"""Run the quality benchmark's plan (headline tables + sensitivity study) and log every run.

Each finished run is appended to OUT/runs.jsonl at once, so a run cut short by a time limit
still leaves everything it finished; bench/quality/report.py turns the log into
summary.json, the per-task JSON, the plots and the markdown tables.

    python bench/quality/run_all.py --out DIR [--workers 12] [--plan full|smoke] [--only text vision ...]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cntlora.bench.baselines import METHODS
from cntlora.bench.quality import Spec, run_many, sensitivity_labels

LRS = [3e-4, 1e-3, 3e-3]
# where CNTLoRA might lose, the settings worth checking: base handling, pre-training source, VAS score
VARIANTS = ["cntlora-cross@base=residual", "cntlora-self@base=residual", "cntlora-cross@base=keep",
            "cntlora-cross@pretrain_source=isotropic", "cntlora-cross-vas@vas_score=weight"]


def plan(kind: str, seeds: int, steps: int) -> list:
    if kind == "tiny":  # checks this script on a CPU in seconds
        return [Spec("tiny", "tiny", ["default", "cntlora-cross", "cntlora-cross-vas"], [0, 1, 2], [1e-3, 3e-3], 20,
                     checkpoints=(5, 10), select_seeds=1)]
    if kind == "smoke":  # every method, a few steps, to check the machine before spending its time
        return [Spec(f"{t}-smoke", t, METHODS, [0], [1e-3], 3, {"quick": True}, (1, 2)) for t in ("text", "vision")]
    # priority order: the few-shot tasks discriminate most, the sensitivity study comes last
    specs = [Spec(t, t, METHODS + (VARIANTS if "fewshot" in t else []), list(range(seeds)), LRS, steps, select_seeds=1)
             for t in ("vision-fewshot", "text-fewshot", "vision", "text")]
    labels = ["default", "cntlora-cross"] + [l for sweep in sensitivity_labels().values() for _, l in sweep]
    for t in ("vision", "text-fewshot"):
        specs.append(Spec(f"{t}-sensitivity", t, list(dict.fromkeys(labels)), list(range(2)), LRS, steps, select_seeds=1))
    return specs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--plan", choices=["full", "smoke", "tiny"], default="full")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--only", nargs="+", default=None, help="spec names to run (default: all of the plan)")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    specs = plan(a.plan, a.seeds, a.steps)
    if a.only:
        specs = [s for s in specs if s.name in a.only]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "runs.jsonl", "a")
    t0 = time.time()

    def write(kind, name, data):
        log.write(json.dumps({"kind": kind, "spec": name, "data": data}) + "\n")
        log.flush()

    print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}; "
          f"{sum(len(s.methods) for s in specs)} labels in {len(specs)} specs", flush=True)
    run_many(specs, a.workers, a.device, on_run=lambda n, r: write("run", n, r),
             on_start=lambda n, meta: write("meta", n, meta),
             log=lambda line: print(f"[{time.time() - t0:6.1f}s] {line}", flush=True))
    print(f"done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
