"""`cntlora demo` (and `cntlora` alone): CNTLoRA vs PEFT's default LoRA on MiniLM + BBC News."""

from __future__ import annotations

import argparse

from ..demo import DemoSettings
from ._common import add_calibration_size, add_command

DEFAULTS = DemoSettings()


def add_parser(subparsers, common) -> None:
    """Register `demo` on the `cntlora` parser's subparsers; defaults come from DemoSettings."""
    p = add_command(
        subparsers, "demo", common, help="the main job: CNTLoRA vs PEFT's default LoRA on MiniLM + BBC News",
        description="Initialize all-MiniLM-L6-v2 on BBC News with CNTLoRA (library defaults), fine-tune it side by "
                    "side with PEFT's default LoRA (same rank, targets, head, data order, seed, optimizer, steps), "
                    "print losses and test accuracy, and write results.json, loss.png and the trained adapter "
                    "(plain PEFT) to --out. A few minutes on 2 CPU cores.",
        epilog="examples:\n  cntlora demo\n  cntlora demo --steps 40 --out runs/quick --seed 1")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps,
                   help=f"training steps of batch {DEFAULTS.batch_size} (default %(default)s)")
    p.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="default %(default)s")
    add_calibration_size(p, DEFAULTS.calibration_size)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo into args.out.

    Returns:
        0.
    """
    from .. import demo

    settings = DemoSettings(steps=args.steps, seed=args.seed, calibration_size=args.calibration_size)
    demo.run_demo(args.out, settings, progress=not args.quiet)
    return 0
