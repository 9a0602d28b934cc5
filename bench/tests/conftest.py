"""The library's test helpers and fixtures (tests/), shared with the benchmark's tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from conftest import one_thread  # noqa: F401 - tests/conftest.py's fixture, for bench/tests too
