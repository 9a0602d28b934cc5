"""The CNTLoRA benchmarks, run from a clone of the repository (not installed with the library).

Two benchmarks, each against PEFT's own LoRA initializations:
- quality (bench.quality): fine-tune from every init under one protocol and compare the metrics;
- cost (bench.cost): wall time and peak memory of the initialization itself.

From the repository root, with the test extras installed (`pip install -e .[test]`):

    cntlora bench quality --task tiny --quick
    python -m bench.quality --task text-fewshot --seeds 5          # the same command
    python -m bench.quality.run_all --out runs/quality --plan tiny  # the whole plan, logged run by run
    python -m bench.quality.write_tables runs/quality/runs.jsonl --out bench/results
    python -m bench.cost --model smollm2 --device cpu --out cost.json

`cntlora bench ...` finds these commands through bench.cli.add_bench_commands.
"""

import os

# before transformers is imported: the models come from packages or an export folder, there is no hub to reach
os.environ.setdefault("HF_HUB_OFFLINE", "1")
