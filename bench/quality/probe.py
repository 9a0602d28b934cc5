"""Measure how long one 200-step run takes, alone and with N workers sharing the device.

    python bench/quality/probe.py --workers 12 --task vision
"""

import argparse
import sys
import time

from cntlora.bench.quality import Spec, run_many, train_once
from cntlora.bench.tasks import make_task


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--task", default="vision")
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args(argv)
    task = make_task(a.task)
    for method in ("default", "cntlora-cross", "eva", "corda", "lora_ga"):
        t0 = time.time()
        r = train_once(task, method, 0, 1e-3, a.steps)
        print(f"{a.task} alone {method}: {time.time() - t0:.1f}s (init {r['init_seconds']:.1f}s) test {r['test']:.4f}", flush=True)
    t0 = time.time()
    spec = Spec("probe", a.task, ["default"], list(range(a.workers)), [1e-3], a.steps)
    run_many([spec], a.workers, log=None)
    print(f"{a.task}: {a.workers} runs on {a.workers} workers: {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
