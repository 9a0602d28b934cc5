"""`cntlora bench`: the benchmark's commands, from the repository's top-level bench/ package.

The benchmark is not part of the installed package. bench.cli is imported only when
`cntlora bench` is asked for: from the import path, else from the source checkout this
cntlora was installed from (an editable install). Without it, the command says where the
benchmark lives.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from ._common import CliError, one_line

MODULE = "bench.cli"
MISSING = ("the benchmark is not part of the installed cntlora: it lives in the repository's bench/ folder and runs "
           "from a clone (e.g. python -m bench.quality.run_all from the repository root)")


def add_placeholder(subparsers) -> None:
    """List `bench` in the help without importing the benchmark."""
    subparsers.add_parser("bench", help="run a benchmark (quality, cost); needs a clone of the repository")


def add_parser(subparsers) -> None:
    """Register the benchmark's commands: bench.cli.add_bench_commands(subparsers).

    Raises:
        CliError: the benchmark is not importable (the message says where it lives), or it
            failed to load (the message names the failure; --debug shows the traceback).
    """
    missing = None
    root = _checkout_root()
    for path in [None] + ([str(root)] if root is not None and str(root) not in sys.path else []):
        if path is not None:
            sys.path.insert(0, path)
        try:
            importlib.import_module(MODULE).add_bench_commands(subparsers)
            return
        except ModuleNotFoundError as e:
            if e.name not in ("bench", MODULE):
                raise _broken(e) from e
            missing = e
        except Exception as e:  # noqa: BLE001 - any failure inside the benchmark's code is one line
            raise _broken(e) from e
    raise CliError(MISSING) from missing


def _broken(e: Exception) -> CliError:
    return CliError(f"the benchmarks could not be loaded ({type(e).__name__}: {one_line(e)}); run with --debug "
                    "(the benchmark's own dependencies: pip install -e '.[bench]')")


def _checkout_root():
    """The source checkout cntlora was installed from (src/cntlora under it), if it has bench/."""
    root = Path(__file__).resolve().parents[3]
    if (root / "bench" / "cli.py").is_file() and (root / "src" / "cntlora").is_dir():
        return root
    return None
