"""`cntlora inspect`: an adapter folder's ranks, scale and size, read from its files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import CLI_KEY, CliError, add_command


def add_parser(subparsers, common) -> None:
    """Register `inspect` on the `cntlora` parser's subparsers."""
    p = add_command(
        subparsers, "inspect", common, help="show an adapter's ranks, scale and size",
        description="Per-layer ranks, the LoRA scale, the base mode and the size of an adapter folder "
                    "(cntlora or plain PEFT).",
        epilog="example:\n  cntlora inspect runs/minilm-bbc")
    p.add_argument("adapter", metavar="DIR")
    p.set_defaults(func=run)


def read_adapter(folder: Path) -> dict:
    """What an adapter folder holds, without loading its tensors.

    Args:
        folder: an adapter folder (cntlora or plain PEFT).

    Returns:
        {"peft": adapter_config.json, "meta": cntlora.json or None, "shapes": tensor name -> shape}.

    Raises:
        CliError: not an adapter folder, or its weights are missing.
    """
    from safetensors import safe_open

    from ..export import CNTLORA_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE

    if not (folder / PEFT_CONFIG_FILE).is_file():
        raise CliError(f"{folder} is not an adapter folder (no {PEFT_CONFIG_FILE}); pass a folder written by "
                       "cntlora init, cntlora export or save_pretrained")
    weights = folder / PEFT_WEIGHTS_FILE
    if not weights.is_file():
        raise CliError(f"{folder} has no {PEFT_WEIGHTS_FILE}; the adapter is incomplete, save it again")
    try:
        peft_config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
        meta = json.loads((folder / CNTLORA_FILE).read_text()) if (folder / CNTLORA_FILE).is_file() else None
        shapes = {}
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
        _check_fields(peft_config, meta, shapes)
    except CliError:
        raise
    except Exception as e:  # JSON and safetensors errors of a damaged folder
        raise CliError(f"{folder} is damaged ({type(e).__name__}: {str(e)[:200]}); save the adapter again") from e
    return {"peft": peft_config, "meta": meta, "shapes": shapes}


def _check_fields(peft_config, meta, shapes) -> None:
    """The fields inspect reads, of the types it reads them as (else the folder is damaged)."""
    import math

    ok = isinstance(peft_config, dict) and isinstance(peft_config.get("r"), int) and peft_config["r"] > 0
    ok = ok and isinstance(peft_config.get("lora_alpha"), (int, float))
    ok = ok and all(isinstance(s, tuple) and len(s) >= 2 for k, s in shapes.items() if ".lora_" in k)
    if meta is not None:
        ok = ok and isinstance(meta, dict) and isinstance(meta.get("ranks"), dict) and isinstance(meta.get("layers"), dict)
        ok = ok and isinstance(meta.get("scale"), (int, float)) and isinstance(meta.get("config"), dict)
        ok = ok and all(n in meta["layers"] and isinstance(meta["layers"][n].get("spec"), dict) for n in meta["ranks"])
        ok = ok and isinstance(meta.get("budget"), int)
    if not ok:
        raise CliError("the adapter's files lack fields or hold values of the wrong type; the folder is damaged, "
                       "save the adapter again")
    scale = meta["scale"] if meta is not None else peft_config["lora_alpha"]
    if not math.isfinite(scale) or not math.isfinite(peft_config["lora_alpha"]):
        raise CliError(f"the adapter's scale is {scale}; its outputs would not be finite. Make it again with a "
                       "finite --alpha")


def run(args: argparse.Namespace) -> int:
    """Print the per-layer ranks, the LoRA scale, the base mode and the size of args.adapter.

    Returns:
        0.

    Raises:
        CliError: not an adapter folder.
    """
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
    # the input shift behind each rank, when VAS ranked by it (vas_score "shift")
    shifts = {n: d.get("input_shift") for n, d in meta["layers"].items()} if meta is not None else {}
    shown = any(isinstance(v, (int, float)) for v in shifts.values())
    print(f"{'layer':<{width}}  {'shape':>11}  {'rank':>4}  {'params':>9}" + ("  shift" if shown else ""))
    for name, l in layers.items():
        shift = shifts.get(name)
        print(f"{name:<{width}}  {str(l['out']) + 'x' + str(l['in']):>11}  {l['rank']:>4}  "
              f"{l['rank'] * (l['out'] + l['in']):>9,}"
              + ((f"  {shift:5.2f}" if isinstance(shift, (int, float)) else "      –") if shown else ""))
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
