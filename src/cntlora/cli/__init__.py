"""The `cntlora` command line: init, inspect, export, demo, and bench (from a clone).

A thin layer: each command's module turns arguments into models, batches and a
CNTLoRAConfig, then calls the library. Errors are one line on stderr and exit code 2;
--debug shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import warnings
from typing import List, Optional

from ..config import CNTLoRAError
from . import bench, demo, export, init, inspect
from ._common import CliError, Parser, help_formatter, one_line

__all__ = ["CliError", "Parser", "build_parser", "main"]

EPILOG = textwrap.dedent("""\
    examples:
      cntlora                                  # the demo: CNTLoRA vs LoRA on MiniLM + BBC News
      cntlora init minilm bbc-news --out runs/minilm-bbc --modules-to-save classifier
      cntlora inspect runs/minilm-bbc
      cntlora export runs/minilm-bbc runs/minilm-bbc-plain""")


def build_parser(with_bench: bool = False) -> argparse.ArgumentParser:
    """The `cntlora` parser.

    Args:
        with_bench: import the benchmark and register its commands; otherwise `bench` is only
            listed, so that the other commands never import it.

    Returns:
        The parser; each command sets `func` (or `handler`) to a callable(args) -> exit code or None.

    Raises:
        CliError: with_bench, and the benchmark is missing or fails to load.
    """
    common = Parser(add_help=False)
    # SUPPRESS: a subcommand's default must not undo a --debug given before the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser = Parser(
        prog="cntlora", formatter_class=help_formatter, epilog=EPILOG,
        description="Training-free, data-driven LoRA initialization (CNTLoRA). Without a command, runs the demo.")
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in (init, inspect, export, demo):
        command.add_parser(subparsers, common)
    if with_bench:
        bench.add_parser(subparsers)
    else:
        bench.add_placeholder(subparsers)
    return parser


def _command(argv: List[str]) -> Optional[str]:
    """The command word: the first argument that is not an option (`cntlora` itself has only flags)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Optional[List[str]] = None) -> int:
    """Run `cntlora` with argv (default: sys.argv[1:]).

    Returns:
        The exit code: 0, 2 for an error (one line on stderr), 130 when interrupted.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: there is no hub to reach
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser(with_bench=_command(argv) == "bench")
        args = parser.parse_args(argv)
        if args.command is None:
            args = parser.parse_args(["demo"] + (["--debug"] if args.debug else []))
        debug = getattr(args, "debug", False)
        from transformers.utils import logging as hf_logging

        # a command's own progress bars and messages are the output; load reports of a new
        # head and library deprecation notices are noise here
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning)
        command = getattr(args, "handler", None) or args.func  # the benchmark's commands set handler
        return command(args) or 0
    except KeyboardInterrupt:
        print("cntlora: interrupted", file=sys.stderr)
        return 130
    except (CNTLoRAError, ValueError, RuntimeError, OSError, ImportError, KeyError) as e:
        if debug:
            raise
        print(f"cntlora: error: {one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return 2
