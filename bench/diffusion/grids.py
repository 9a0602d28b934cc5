"""Sample the saved denoiser per class: grids for viewing and samples for checking.

    python -m bench.diffusion.grids --results bench/results/diffusion --guidance 1.5

Writes ``class_grid.png`` (a row per class prompt), ``rare_grid.png`` (the same class
prompts behind the untrained rare token ``sks``, i.e. what a subject prompt gives before
any fine-tuning) and ``class_samples.safetensors`` (uint8 samples per class, for
``check_samples``). DDIM with classifier-free guidance; seeds 1000 + class (grids) and
2000 + class (samples), so the images are the same on every run and device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import assets, data, runtime, tokens

RESULTS = Path(__file__).resolve().parents[1] / "results" / "diffusion"


def main(argv=None) -> dict:
    """Make the grids and the check samples.

    Args:
        argv: command-line arguments.

    Returns:
        A record of what was made (also written to ``grids.json``).
    """
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="artifact folder (default bench/diffusion/artifacts)")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--device", default=None)
    p.add_argument("--guidance", type=float, default=assets.DEFAULT_GUIDANCE)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--grid-per-class", type=int, default=8)
    p.add_argument("--rare-per-class", type=int, default=4)
    p.add_argument("--check-per-class", type=int, default=20)
    args = p.parse_args(argv)
    t0 = runtime.now()
    device = runtime.pick_device(args.device)
    results = Path(args.results)
    unet, table, scheduler = assets.load_base(device, torch.float32, root=args.root)
    n = len(tokens.CLASS_NAMES)
    kw = {"steps": args.steps, "guidance": args.guidance}

    def per_class(prompt_of, k, seed0):
        return [assets.sample_images(unet, table, scheduler, prompt_of(c), k, seed=seed0 + c, **kw) for c in range(n)]

    rows = per_class(tokens.class_prompt, args.grid_per_class, 1000)
    data.save_grid(results / "class_grid.png", rows, list(tokens.CLASS_NAMES))
    print(f"class grid done {runtime.now() - t0:.0f}s", flush=True)
    if args.rare_per_class:
        rare = per_class(lambda c: tokens.subject_prompt("sks", c), args.rare_per_class, 1000)
        data.save_grid(results / "rare_grid.png", rare, [f"sks {c}" for c in tokens.CLASS_NAMES])
        print(f"rare grid done {runtime.now() - t0:.0f}s", flush=True)
    if args.check_per_class:
        checks = per_class(tokens.class_prompt, args.check_per_class, 2000)
        save_file({name: data.to_uint8(x).contiguous() for name, x in zip(tokens.CLASS_NAMES, checks)},
                  str(results / "class_samples.safetensors"),
                  metadata={"guidance": str(args.guidance), "steps": str(args.steps), "seeds": "2000 + class index"})
    record = {"command": "python -m bench.diffusion.grids " + " ".join(sys.argv[1:] if argv is None else argv),
              "guidance": args.guidance, "steps": args.steps, "scheduler": "DDIM", "eta": 0.0,
              "grid_per_class": args.grid_per_class, "rare_per_class": args.rare_per_class,
              "check_per_class": args.check_per_class, "device": runtime.environment()["device"],
              "seconds": round(runtime.now() - t0, 1)}
    runtime.write_json(results / "grids.json", record)
    return record


if __name__ == "__main__":
    main()
