"""What the recipes share: loading a causal LM and texts, drawing the calibration sample, and
the CNTLoRA options. Plain transformers and the public cntlora API; copy what you need.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

# the recipes never reach a model hub: models come from folders or from cntlora's packaged ones
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import cntlora  # noqa: E402


def load_causal_lm(name: str):
    """(model, tokenizer): a folder written by save_pretrained, or "smollm2" (packaged with cntlora)."""
    if name == "smollm2":
        from cntlora import zoo

        model, tokenizer = zoo.load_smollm2()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(name, "config.json").is_file():
            raise SystemExit(f"--model {name!r}: not a model folder (no config.json) and not 'smollm2'")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_texts(data: str, lines_per_example: int = 16) -> list:
    """Training texts: a .txt file (one example per line), a .jsonl file with a "text" field, or
    "shakespeare" (packaged with cntlora; every `lines_per_example` non-empty lines are one example)."""
    if data == "shakespeare":
        from cntlora import zoo

        lines = [ln for text in zoo.shakespeare().values() for ln in text.splitlines() if ln.strip()]
        return ["\n".join(lines[i:i + lines_per_example]) for i in range(0, len(lines), lines_per_example)]
    path = Path(data)
    if not path.is_file():
        raise SystemExit(f"--data {data!r}: no such file (a .txt or .jsonl file, or 'shakespeare')")
    if path.suffix == ".jsonl":
        texts = [json.loads(ln)["text"] for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        texts = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not texts:
        raise SystemExit(f"--data {data!r} holds no text")
    return texts


def default_targets(model: nn.Module) -> list:
    """The names of every linear layer kind (nn.Linear, GPT-2's Conv1D) except the output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, Conv1D)) and m is not head}
    return sorted(names)


def calibration_sample(texts: list, size, seed: int) -> list:
    """`size` examples drawn reproducibly (the same on every process), or every one for "all"."""
    if size == "all" or int(size) >= len(texts):
        return list(texts)
    return random.Random(seed).sample(list(texts), int(size))


def tokenize(tokenizer, texts: list, max_length: int) -> list:
    """One dict of input_ids per text, truncated at max_length tokens."""
    return [{"input_ids": ids} for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]


def collator(tokenizer):
    """Pads a list of tokenized examples into one batch; labels are input_ids with padding at -100."""
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


def lm_batches(tokenizer, texts: list, batch_size: int, max_length: int) -> list:
    """Ready batches of `texts`, for cntlora's statistics pass (plain dicts: the collator's
    BatchEncoding is a Mapping but not a dict)."""
    examples, collate = tokenize(tokenizer, texts, max_length), collator(tokenizer)
    return [dict(collate(examples[i:i + batch_size])) for i in range(0, len(examples), batch_size)]


def _strength(text: str):
    return None if text.lower() == "none" else float(text)


def _calibration_size(text: str):
    return "all" if text == "all" else int(text)


def add_arguments(parser: argparse.ArgumentParser, steps: int = 50, lr: float = 1e-3) -> None:
    """The options every recipe takes: model, data, CNTLoRA's main settings, training length."""
    parser.add_argument("--model", default="smollm2", help="HF model folder, or 'smollm2' (default)")
    parser.add_argument("--data", default="shakespeare", help=".txt / .jsonl file, or 'shakespeare' (default)")
    parser.add_argument("--out", required=True, metavar="DIR", help="adapter folder to write")
    c = parser.add_argument_group("CNTLoRA (see cntlora.CNTLoRAConfig)")
    c.add_argument("--mode", choices=("self", "cross", "shift"), default="self")
    c.add_argument("--r", type=int, default=8)
    c.add_argument("--alpha", type=float, default=8.0)
    c.add_argument("--base", choices=("subspace", "residual", "keep"), default="subspace")
    c.add_argument("--strength", type=_strength, default=0.05, help="trust region, or 'none'")
    c.add_argument("--vas", action="store_true", help="variable ranks per layer")
    c.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="layer names to adapt (default: every linear layer but the output head)")
    c.add_argument("--calibration-size", type=_calibration_size, default=128,
                   help="examples the statistics are collected over, drawn reproducibly, or 'all' (default 128)")
    t = parser.add_argument_group("training")
    t.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    t.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr:g})")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    t.add_argument("--seed", type=int, default=0)


def cntlora_config(args) -> "cntlora.CNTLoRAConfig":
    return cntlora.CNTLoRAConfig(mode=args.mode, r=args.r, alpha=args.alpha, base=args.base,
                                 strength=args.strength, vas=args.vas, seed=args.seed)


def lora_state(peft_model) -> dict:
    """A copy of every LoRA factor, by parameter name (to compare adapters or see them change)."""
    return {k: v.detach().cpu().clone() for k, v in peft_model.named_parameters() if "lora_" in k}
