"""The benchmarks' commands: `cntlora bench quality|cost ...`, `python -m bench.quality ...`, `python -m bench.cost ...`.

Each benchmark has a command module (bench.quality.command, bench.cost.command) with
EXAMPLES, add_arguments(parser) and run(args); this module mounts them under the cntlora
CLI's `bench` command, or runs one on its own.
"""

from __future__ import annotations

import argparse
import importlib

COMMANDS = {
    "quality": ("bench.quality.command", "train CNTLoRA and PEFT's inits side by side and compare quality"),
    "cost": ("bench.cost.command", "time and memory of initialization against a plain forward pass and PEFT's inits"),
}


def _parser_options(module) -> dict:
    return {"description": module.__doc__, "epilog": module.EXAMPLES, "formatter_class": argparse.RawDescriptionHelpFormatter}


def add_bench_commands(subparsers) -> None:
    """Register `bench quality` and `bench cost` on the cntlora CLI's subparsers.

    Each command sets func=run(args), which returns an exit code.

    Args:
        subparsers: what ArgumentParser.add_subparsers returned.

    Raises:
        ImportError: a benchmark dependency is missing (e.g. scipy: pip install -e '.[bench]').
    """
    bench = subparsers.add_parser("bench", help="run a benchmark (quality, cost)")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        parser = kinds.add_parser(name, help=help_text, **_parser_options(module))
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)


def main(name: str, argv=None) -> int:
    """Run one benchmark's command on its own, as `python -m bench.<name>`.

    Args:
        name: "quality" or "cost".
        argv: the command's arguments; None reads sys.argv.

    Returns:
        The command's exit code.
    """
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", **_parser_options(module))
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))
