"""`cntlora init`: collect statistics of MODEL on DATA, solve, write a CNTLoRA adapter folder."""

from __future__ import annotations

import argparse
import os
import textwrap
from dataclasses import fields
from pathlib import Path

from .. import data, vision
from ..config import (BASES, DIRECTIONS, MODES, PRETRAIN_SOURCES, SHIFT_ALIGNMENTS, SHIFT_FLOORS, TRUNCATIONS,
                      VAS_SCORES, AdvancedConfig, CNTLoRAConfig)
from ..plan import RANDOMIZED_SVD_ABOVE
from ..units import byte_size
from ._common import CLI_KEY, CliError, add_calibration_size, add_command, add_overwrite, names, positive_int

DEFAULTS = CNTLoRAConfig()
# the config fields the command line does not set
NOT_FLAGS = ("constraints", "advanced")

EPILOG = textwrap.dedent("""\
    examples:
      cntlora init minilm bbc-news --out runs/minilm-bbc --modules-to-save classifier
      cntlora init smollm2 shakespeare --out runs/smol --vas --calibration-size 64 --max-length 256
      cntlora init ./my-bert notes.jsonl --out runs/bert --mode shift --base residual
      cntlora init mobilenetv2 ./photos --out runs/cnn --save-stats runs/cnn-stats.safetensors
      cntlora init ./my-vit ./photos --out runs/vit --reference ./pretraining-photos --mode cross

    MODEL: an HF model folder, or minilm | smollm2 | mobilenetv2
    DATA:  a .txt file (one example per line), a .jsonl file with a "text" field,
           a folder of images (resized to 64x64; for a vision transformer, to its
           config's image_size), or bbc-news | shakespeare | fashion-mnist""")


def _strength(text: str):
    return None if text.lower() == "none" else float(text)


def add_parser(subparsers, common) -> None:
    """Register `init`; every CNTLoRAConfig field has a flag of the same name, defaulting to the config's default.

    Args:
        subparsers: the `cntlora` parser's subparsers.
        common: the parent parser with the shared options.
    """
    p = add_command(
        subparsers, "init", common, help="initialize a LoRA adapter from activation statistics", epilog=EPILOG,
        description="Collect activation statistics of MODEL on a calibration subset of DATA, solve for ΔW and write "
                    "a PEFT adapter folder (plus cntlora.json) to --out. Prints the per-layer rank table.")
    p.add_argument("model", metavar="MODEL", help="HF model folder or packaged model name")
    p.add_argument("data", metavar="DATA", nargs="?", help="text file, .jsonl, image folder or packaged data name")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="adapter folder to write; an existing one needs --overwrite")
    add_overwrite(p)

    c = p.add_argument_group("CNTLoRA options (see CNTLoRAConfig)")
    c.add_argument("--mode", choices=MODES, default=DEFAULTS.mode)
    c.add_argument("--r", type=int, default=DEFAULTS.r, help="LoRA rank (default %(default)s)")
    c.add_argument("--alpha", type=float, default=DEFAULTS.alpha,
                   help="LoRA alpha; the scale is s = alpha/r (default %(default)s)")
    c.add_argument("--base", choices=BASES, default=DEFAULTS.base)
    c.add_argument("--gamma", type=float, default=DEFAULTS.gamma,
                   help="weight of 'zero on pre-training inputs' (cross; default %(default)s)")
    c.add_argument("--pretrain-source", choices=PRETRAIN_SOURCES, default=DEFAULTS.pretrain_source,
                   help="default: reference if --reference is given, else weights")
    c.add_argument("--ridge", type=float, default=DEFAULTS.ridge, help="relative ridge (default %(default)s)")
    c.add_argument("--strength", type=_strength, default=DEFAULTS.strength,
                   help="trust region tau, or 'none' (default %(default)s)")
    c.add_argument("--rslora", dest="use_rslora", action="store_true", default=DEFAULTS.use_rslora,
                   help="scale alpha/sqrt(r) instead of alpha/r")
    c.add_argument("--vas", action="store_true", default=DEFAULTS.vas, help="variable ranks under a parameter budget")
    c.add_argument("--budget", type=int, default=DEFAULTS.budget, help="VAS parameter budget (default: uniform rank r)")
    c.add_argument("--r-min", type=int, default=DEFAULTS.r_min, help="VAS's lowest rank (default %(default)s)")
    c.add_argument("--r-max", type=int, default=DEFAULTS.r_max, help="VAS's highest rank (default: 2r with --vas)")
    c.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="seeds the SVD, the calibration draw and new layers (default %(default)s)")

    a = p.add_argument_group("advanced (research options)")
    adv = DEFAULTS.advanced
    a.add_argument("--shift-alignment", choices=SHIFT_ALIGNMENTS, default=adv.shift_alignment)
    a.add_argument("--shift-floor", choices=SHIFT_FLOORS, default=adv.shift_floor,
                   help="Shift's eigenvalue floor: ridge·tr(C_f)/n (trace) or ridge·λ_max(C_f) (max)")
    a.add_argument("--vas-score", choices=VAS_SCORES, default=adv.vas_score,
                   help="what VAS ranks components by: their share of ΔW's energy (energy), σ²/||W0||² (weight), "
                        "or the share times how far the layer's inputs moved from pre-training (shift; give --reference)")
    a.add_argument("--directions", choices=DIRECTIONS, default=adv.directions,
                   help="A's directions in subspace mode: ΔW's singular vectors (delta) or the system's "
                        "generalized eigenvectors (generalized; Self or Cross, no VAS)")
    a.add_argument("--truncation", choices=TRUNCATIONS, default=adv.truncation,
                   help="how ΔW becomes rank r: its top singular components (frobenius) or the rank-r update "
                        "that minimizes the constraints' own objective (objective)")
    a.add_argument("--a-row-norm", type=float, default=adv.a_row_norm,
                   help="row norm of A in subspace mode (default: PEFT's 1/sqrt(3))")
    a.add_argument("--randomized-svd-above", type=int, default=adv.randomized_svd_above, metavar="N",
                   help=f"layers with min(m, n) above N use a seeded randomized SVD (default: {RANDOMIZED_SVD_ABOVE})")
    a.add_argument("--svd-niter", type=int, default=adv.svd_niter,
                   help="power iterations of the randomized SVD (default %(default)s)")

    d = p.add_argument_group("model and data")
    d.add_argument("--target-modules", nargs="+", type=str, default=None, metavar="NAME",
                   help="layer names (space or comma separated); default: per model family")
    d.add_argument("--modules-to-save", nargs="+", default=None, metavar="NAME",
                   help="extra modules trained in full and saved with the adapter, e.g. a new head")
    add_calibration_size(d, data.CALIBRATION_SIZE)
    d.add_argument("--max-batches", type=positive_int, default=None, metavar="N",
                   help="at most N batches of the calibration set (default: all of them)")
    d.add_argument("--batch-size", type=positive_int, default=data.BATCH_SIZE, help="default %(default)s")
    d.add_argument("--max-length", type=positive_int, default=data.MAX_LENGTH,
                   help="tokens per text example (default %(default)s)")
    g = p.add_argument_group("diffusion models (a diffusers pipeline or denoiser folder as MODEL, images as DATA)")
    g.add_argument("--prompt", default=None, help="the instance prompt, e.g. 'a photo of sks dog'")
    g.add_argument("--class-prompt", default=None, help="the prompt of the --reference (class) images")
    g.add_argument("--targets", choices=("attention", "attention+conv", "attention+ff", "all"), default="attention",
                   help="layer set (default %(default)s; --target-modules overrides)")
    g.add_argument("--timesteps-per-image", type=positive_int, default=4, help="noise levels per image (default 4)")
    g.add_argument("--weighting", choices=("uniform", "logit_normal", "mode", "cosmap"), default=None,
                   help="the timestep density (default: uniform for DDPM-style, logit_normal for flow matching)")
    g.add_argument("--resolution", type=positive_int, default=None, help="resize and center-crop the images")
    g.add_argument("--diffusers-out", metavar="DIR", default=None,
                   help="also write the adapter in diffusers' LoRA format (pipeline.load_lora_weights)")
    d.add_argument("--reference", metavar="DATA", default=None,
                   help="pre-training-like data for pretrain_source=reference (drawn like DATA)")
    d.add_argument("--save-stats", metavar="FILE", default=None, help="also save the statistics (safetensors)")
    d.add_argument("--load-stats", metavar="FILE", default=None, help="reuse saved statistics instead of collecting")
    d.add_argument("--max-stats-memory", type=byte_size, default=None, metavar="SIZE",
                   help="bound the statistics held at once, e.g. 16GiB: one pass over DATA per group of layers, "
                        "each solved as its pass ends (with --save-stats, kept in host memory instead)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> CNTLoRAConfig:
    """The CNTLoRAConfig the flags describe (each field from the flag of the same name).

    Raises:
        CNTLoRAError: an invalid value or combination; the message names it.
    """
    advanced = AdvancedConfig(**{f.name: getattr(args, f.name) for f in fields(AdvancedConfig)})
    top = {f.name: getattr(args, f.name) for f in fields(CNTLoRAConfig) if f.name not in NOT_FLAGS}
    return CNTLoRAConfig(**top, advanced=advanced)


def run(args: argparse.Namespace) -> int:
    """Write the adapter to args.out and print the rank table.

    Returns:
        0.

    Raises:
        CNTLoRAError: bad arguments, data or model (CliError for the command line's own checks).
    """
    from peft import LoraConfig

    from ..apply import apply, initialize
    from ..collect import collect_statistics
    from ..export import CNTLORA_FILE, save_adapter
    from ..plan import solve
    from ..statistics import Statistics

    if args.data is None and args.load_stats is None:
        raise CliError("init needs DATA (or --load-stats FILE); e.g. cntlora init minilm bbc-news --out adapter")
    if args.pretrain_source == "reference" and args.reference is None and args.load_stats is None:
        raise CliError("--pretrain-source reference needs pre-training-like data: add --reference DATA, "
                       "or leave --pretrain-source out to use the weight proxy")
    if args.save_stats and os.path.exists(args.save_stats):
        raise CliError(f"{args.save_stats} already exists; statistics never overwrite statistics, pick another path")
    _check_out(args.out, args.overwrite)
    config = config_from_args(args)
    if _is_diffusers_folder(args.model):
        return _run_diffusion(args, config)
    if args.prompt or args.class_prompt or args.diffusers_out:
        raise CliError("--prompt, --class-prompt and --diffusers-out are for diffusers pipeline or denoiser folders")
    model, tokenizer = data.load_model(args.model, seed=args.seed)
    lora_config = LoraConfig(modules_to_save=args.modules_to_save) if args.modules_to_save else None
    if args.load_stats:
        stats = Statistics.load(args.load_stats)
    else:
        targets = names(args.target_modules) if args.target_modules else data.default_target_modules(model)
        image = vision.preprocessing_for(model, args.model)
        batches = _calibration(args.data, "calibration", tokenizer, args, image)
        reference = _calibration(args.reference, "reference", tokenizer, args, image) if args.reference else None
        collection = dict(reference_dataloader=reference, forward_fn=_forward_fn(model), progress=not args.quiet,
                          max_stats_memory=args.max_stats_memory)
        # statistics to save are kept whole (on the host when capped); otherwise initialize streams the passes
        stats = (collect_statistics(model, batches, targets, offload=bool(args.max_stats_memory), **collection)
                 if args.save_stats else None)
    if stats is None:
        peft_model = initialize(model, batches, config, target_modules=targets, lora_config=lora_config, **collection)
        plan = peft_model.cntlora_plan
    else:
        if args.save_stats:
            stats.save(args.save_stats)
        plan = solve(model, stats, config, progress=not args.quiet)
        peft_model = apply(model, plan, lora_config=lora_config)
    save_adapter(peft_model, args.out, overwrite=args.overwrite)
    record_model(Path(args.out) / CNTLORA_FILE, args)
    print(plan.summary())
    print(f"wrote {args.out}: load it with cntlora.load_adapter(base, {str(args.out)!r}); "
          f"plain-PEFT copy: cntlora export {args.out} OUT")
    return 0


def _check_out(out: str, overwrite: bool) -> None:
    """Refuse an existing folder before any work, unless --overwrite (the save checks it is an adapter)."""
    path = Path(out)
    if path.is_file():
        raise CliError(f"--out {out} is a file; pass a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CliError(f"--out {out} exists and is not empty; pass --overwrite to replace cntlora's files in it "
                       "(other files stay), or pick a new folder")


def _is_diffusers_folder(model: str) -> bool:
    """A diffusers pipeline folder (model_index.json) or a bare diffusers model folder; no diffusers import."""
    import json

    folder = Path(model)
    if (folder / "model_index.json").is_file():
        return True
    cfg = folder / "config.json"
    try:
        return cfg.is_file() and "_diffusers_version" in json.loads(cfg.read_text())
    except ValueError:
        return False


def _run_diffusion(args: argparse.Namespace, config: CNTLoRAConfig) -> int:
    """init for a diffusers pipeline or denoiser: DATA is the instance images, --reference the class images."""
    from ..diffusion import initialize_denoiser, load_denoiser_and_batches, save_diffusers_lora
    from ..export import CNTLORA_FILE, save_adapter

    if args.data is None:
        raise CliError("a diffusion model needs DATA: a folder of images")
    if args.load_stats or args.save_stats or args.modules_to_save:
        raise CliError("--load-stats, --save-stats and --modules-to-save are not supported for diffusion models")
    loaded = load_denoiser_and_batches(args.model, args.data, args.prompt, args.reference, args.class_prompt,
                                       resolution=args.resolution, seed=args.seed)
    print(f"calibration: {len(loaded.latents)} images x {args.timesteps_per_image} noise levels"
          + (f"; reference: {len(loaded.reference[0])} images" if loaded.reference is not None else ""))
    peft_model = initialize_denoiser(
        loaded.denoiser, loaded.latents, loaded.conditioning, config, scheduler=loaded.scheduler,
        reference=loaded.reference, targets=names(args.target_modules) if args.target_modules else args.targets,
        timesteps_per_image=args.timesteps_per_image, weighting=args.weighting, batch_size=args.batch_size,
        seed=args.seed, max_stats_memory=args.max_stats_memory, progress=not args.quiet)
    save_adapter(peft_model, args.out, overwrite=args.overwrite)
    record_model(Path(args.out) / CNTLORA_FILE, args)
    if args.diffusers_out:
        save_diffusers_lora(peft_model, args.diffusers_out, prefix=loaded.prefix)
    print(peft_model.cntlora_plan.summary())
    print(f"wrote {args.out}" + (f" and {args.diffusers_out} (diffusers: pipeline.load_lora_weights)"
                                 if args.diffusers_out else ""))
    return 0


def _calibration(name: str, what: str, tokenizer, args, image=None) -> list:
    """The batches of a calibration draw from `name`, after a line saying how much they hold
    (images read as `image` says: an HF vision transformer's size, channels and normalization)."""
    size = args.calibration_size
    if args.max_batches:
        cap = args.max_batches * args.batch_size
        size = cap if size is None else min(size, cap)
    drawn = data.load_batches(name, tokenizer, size, args.batch_size, args.max_length, args.seed, image=image)
    print(f"{what}: {drawn.summary()}")
    return drawn.batches


def _forward_fn(model):
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel) and getattr(model, "main_input_name", "") == "pixel_values":
        return lambda m, batch: m(pixel_values=batch)
    return None


def record_model(meta_path: Path, args: argparse.Namespace) -> None:
    """Note in cntlora.json how to rebuild the base model, so `cntlora export` needs no --model.

    Args:
        meta_path: the adapter's cntlora.json.
        args: the init arguments (model, seed, data).
    """
    import json

    from ..files import write_json
    from ..integrity import meta_checksum

    meta = json.loads(meta_path.read_text())
    model = args.model if args.model in data.PACKAGED_MODELS else str(Path(args.model).resolve())
    meta[CLI_KEY] = {"model": model, "model_seed": args.seed, "data": args.data,
                     "calibration_size": args.calibration_size}
    if "checksum" in meta:  # the file's checksum covers its whole content, this record included
        meta["checksum"] = meta_checksum(meta)
    write_json(meta_path, meta)
