"""`cntlora export`: a cntlora adapter folder -> a plain PEFT LoRA adapter for the original base model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import CLI_KEY, CliError, add_command, add_overwrite


def add_parser(subparsers, common) -> None:
    """Register `export` on the `cntlora` parser's subparsers."""
    p = add_command(
        subparsers, "export", common, help="write a plain PEFT LoRA copy",
        description="Load the base model and the cntlora adapter DIR, and write a standard PEFT LoRA adapter to OUT "
                    "that works on the original, unmodified base model (residual mode becomes rank 2r).",
        epilog="example:\n  cntlora export runs/minilm-bbc runs/minilm-bbc-plain\n"
               "  python -c \"import peft; peft.PeftModel.from_pretrained(base, 'runs/minilm-bbc-plain')\"")
    p.add_argument("adapter", metavar="DIR")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--model", default=None, help="the base model, when DIR's cntlora.json does not name it")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Rebuild the base model that args.adapter was made on, load the adapter, write the plain copy to args.out.

    Returns:
        0.

    Raises:
        CliError: not a cntlora adapter, or no way to tell its base model.
    """
    from ..data import load_model
    from ..export import CNTLORA_FILE, export_plain_lora, load_adapter
    from .inspect import read_adapter

    folder = Path(args.adapter)
    if Path(args.out).resolve() == folder.resolve():
        raise CliError("OUT is the adapter folder itself; the export would replace its cntlora files. "
                       "Pick another folder for OUT")
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
    export_plain_lora(peft_model, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: a plain PEFT LoRA adapter for the original {model_name}; load it with "
          f"peft.PeftModel.from_pretrained(base, {str(args.out)!r})")
    return 0
