"""`python -m bench.cost`: time CNTLoRA's and PEFT's inits (bench.cost.command)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main("cost"))
