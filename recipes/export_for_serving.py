"""Turn a saved CNTLoRA adapter into what a server loads: a plain PEFT LoRA, or a merged model.

    python recipes/export_for_serving.py runs/trainer runs/trainer-lora --model smollm2
    python recipes/export_for_serving.py runs/trainer runs/trainer-lora --model smollm2 --merge runs/merged

The plain LoRA folder works on the ORIGINAL base model with peft alone (no cntlora):
peft.PeftModel.from_pretrained(base, folder), or any server that loads PEFT LoRA adapters. A
residual-mode adapter becomes rank 2r there (the trained factors next to the initial ones,
which undo the base change), so a server's maximum LoRA rank must allow 2r. --merge also writes
the base with the adapter merged in, a plain transformers model folder. The script checks that
the exported adapter, loaded without cntlora, gives the logits of the cntlora adapter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recipe_utils as ru  # noqa: E402

import cntlora  # noqa: E402


def main(argv=None):
    """Run the recipe; returns the largest logit difference between the two loadings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", metavar="ADAPTER", help="folder written by cntlora.save_adapter (or cntlora init)")
    parser.add_argument("out", metavar="OUT", help="plain PEFT LoRA folder to write")
    parser.add_argument("--model", default="smollm2", help="the base model: HF folder, or 'smollm2' (default)")
    parser.add_argument("--merge", metavar="DIR", default=None, help="also write the merged model here")
    parser.add_argument("--text", default="To be, or not to be, that is the question.",
                        help="the text the check runs on")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest logit difference accepted")
    args = parser.parse_args(argv)

    import torch
    from peft import PeftModel

    # 1. the CNTLoRA adapter on its base (in residual mode, load_adapter restores the changed base)
    base, tokenizer = ru.load_causal_lm(args.model)
    trained = cntlora.load_adapter(base, args.adapter).eval()
    cntlora.export_plain_lora(trained, args.out)
    print(f"plain PEFT LoRA: {args.out}")

    # 2. the check: a fresh, unmodified base + the exported folder, through peft alone
    fresh, _ = ru.load_causal_lm(args.model)
    plain = PeftModel.from_pretrained(fresh, args.out).eval()
    batch = tokenizer([args.text], return_tensors="pt")
    with torch.no_grad():
        diff = (plain(**batch).logits - trained(**batch).logits).abs().max().item()
    print(f"largest logit difference, cntlora adapter vs plain export: {diff:.2e}")
    if diff > args.tolerance:
        raise SystemExit(f"the exported adapter differs by {diff:.2e} > --tolerance {args.tolerance:g}")

    # 3. optionally, one merged model folder for servers that take no adapters
    if args.merge:
        merged = plain.merge_and_unload()
        merged.save_pretrained(args.merge)
        tokenizer.save_pretrained(args.merge)
        print(f"merged model: {args.merge}")
    return diff


if __name__ == "__main__":
    main()
