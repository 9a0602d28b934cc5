"""`python -m bench.quality`: train and compare every init on one task (bench.quality.command)."""

import sys

from ..cli import main

if __name__ == "__main__":  # run_many's spawned workers import this module too
    sys.exit(main("quality"))
