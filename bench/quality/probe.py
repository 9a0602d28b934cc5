"""Measure how long one 200-step run takes, alone and with N workers sharing the device.

    python -m bench.quality.probe --workers 12 --task vision
"""

import argparse
import sys
import time

from .pool import Spec, run_many
from .protocol import train_once
from .tasks import make_task


def main(argv=None) -> int:
    """Time the runs (see the module's docstring) and print each time.

    Returns:
        0.
    """
    p = argparse.ArgumentParser(prog="python -m bench.quality.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return 0


if __name__ == "__main__":  # run_many's spawned workers import this module too
    sys.exit(main())
