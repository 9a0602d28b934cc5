#!/usr/bin/env bash
# The fast test suite (what CI runs). Extra arguments go to pytest, e.g. tests/test_cli.py -x.
# The slow tests: bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "not slow" -q "$@"
