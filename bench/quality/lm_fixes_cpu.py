"""CPU follow-up on lm-fewshot: the uncapped residual variant of cntlora-self, at lr 3e-4, on
seeds 1-4 (seed 0 ran through the CLI; docs/benchmarks.md). Appends its runs to a run log.

    CNTLORA_BENCH_DATA=.bench_data python -m bench.quality.lm_fixes_cpu OUT.jsonl
"""

import argparse
import sys
import time

from .pool import RunLog, Spec, run_many


def main(argv=None) -> int:
    """Run the follow-up and append its runs to the log named on the command line.

    Returns:
        0.
    """
    p = argparse.ArgumentParser(prog="python -m bench.quality.lm_fixes_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="the run log to append to (JSON lines)")
    log = RunLog(p.parse_args(argv).log)
    label = "cntlora-self@base=residual,strength=None"
    specs = [Spec("lm-fewshot", "lm-fewshot", [label], [1, 2, 3, 4], [3e-4], 50)]
    t0 = time.time()
    run_many(specs, 2, "cpu", on_run=log.on_run, on_start=log.on_start,
             log=lambda line: print(f"[{time.time() - t0:6.1f}s] {line}", flush=True))
    log.close()
    return 0


if __name__ == "__main__":  # the workers are spawned: they import this module
    sys.exit(main())
