"""Benchmarks: quality against PEFT's own inits (quality.py) and initialization cost (cost.py).

`cntlora bench quality ...` and `cntlora bench cost ...` are thin layers over these modules;
each module provides add_arguments(parser) and run(args).
"""

import argparse
import importlib

COMMANDS = {
    "quality": ("cntlora.bench.quality", "train CNTLoRA and PEFT's inits side by side and compare quality"),
    "cost": ("cntlora.bench.cost", "time and memory of initialization against a plain forward pass and PEFT's inits"),
}
EXAMPLES = {
    "quality": "example:\n  cntlora bench quality --task text-fewshot --methods default cntlora-self --seeds 5 --device cpu\n"
    "  cntlora bench quality --task tiny --quick",
    "cost": "example:\n  cntlora bench cost --model smollm2 --device cpu --seqs 64 --seq-len 256 --r 16 --repeats 3",
}


def add_bench_commands(subparsers) -> None:
    """Register `bench <name>` subcommands on the CLI's subparsers."""
    bench = subparsers.add_parser("bench", help="run a benchmark (quality, cost)")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        parser = kinds.add_parser(
            name, help=help_text, description=module.__doc__, epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(parser)
        parser.set_defaults(handler=module.run)
