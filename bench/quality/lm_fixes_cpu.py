"""CPU follow-up on lm-fewshot (no device time was left): the uncapped residual variant of
cntlora-self, at lr 3e-4, on seeds 1-4 (seed 0 ran through the CLI; docs/benchmarks.md).

    CNTLORA_BENCH_DATA=.bench_data PYTHONPATH=src python bench/quality/lm_fixes_cpu.py OUT.jsonl
"""

import json
import sys
import time

from cntlora.bench.quality import Spec, run_many


def main():
    out = open(sys.argv[1], "a")
    label = "cntlora-self@base=residual,strength=None"
    specs = [Spec("lm-fewshot", "lm-fewshot", [label], [1, 2, 3, 4], [3e-4], 50)]
    t0 = time.time()
    run_many(specs, 2, "cpu", on_run=lambda n, r: (out.write(json.dumps({"kind": "run", "spec": n, "data": r}) + "\n"), out.flush()),
             on_start=lambda n, meta: (out.write(json.dumps({"kind": "meta", "spec": n, "data": meta}) + "\n"), out.flush()),
             log=lambda line: print(f"[{time.time() - t0:6.1f}s] {line}", flush=True))


if __name__ == "__main__":  # the workers are spawned: they import this file
    main()
