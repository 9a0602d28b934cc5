"""What the commands share: the error type, the one-line-error parser, small argument types."""

from __future__ import annotations

import argparse
from typing import List, Optional

from ..config import CNTLoRAError

CLI_KEY = "cli"  # the key of cntlora.json where init records how to rebuild the base model


class CliError(CNTLoRAError):
    """A bad command-line input."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"cntlora: error: {message}; see '{self.prog} --help'\n")


def help_formatter(prog):
    """The help layout of every command: descriptions and examples kept as written."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_command(subparsers, name: str, common, **kwargs) -> argparse.ArgumentParser:
    """A subcommand parser with the shared options (--debug) and help layout."""
    return subparsers.add_parser(name, parents=[common], formatter_class=help_formatter, **kwargs)


def calibration_size(text: str) -> Optional[int]:
    """Parse a --calibration-size value.

    Args:
        text: a positive number of examples, or "all".

    Returns:
        The number, or None for all.

    Raises:
        argparse.ArgumentTypeError: anything else (argparse reports it in one line).
    """
    if text.strip().lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a calibration size; write a positive number of "
                                         "examples, e.g. 128, or all")
    return n


def positive_int(text: str) -> int:
    """Parse a count that must be at least 1 (argparse type).

    Raises:
        argparse.ArgumentTypeError: zero, negative or not a whole number.
    """
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return n


def add_overwrite(parser) -> None:
    """The --overwrite option of the commands that write an adapter folder."""
    parser.add_argument("--overwrite", action="store_true",
                        help="update an existing adapter folder: cntlora's files are replaced, every other file stays")


def add_calibration_size(parser, default: Optional[int]) -> None:
    """The --calibration-size option, shared by init and demo."""
    parser.add_argument("--calibration-size", type=calibration_size, default=default, metavar="N",
                        help=f"examples of the data drawn (seeded by --seed) to collect statistics on, or 'all' "
                             f"(default {default if default is not None else 'all'})")


def names(values: List[str]) -> List[str]:
    """Names given space- or comma-separated, as one list."""
    return [n for v in values for n in v.split(",") if n]


def one_line(error: BaseException) -> str:
    """An exception's message on one line (a missing file named as such)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (FileNotFoundError, PermissionError)) and error.filename:
        text = f"{error.strerror}: {error.filename}"
    return text
