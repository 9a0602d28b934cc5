"""Supervised fine-tuning with TRL's SFTTrainer, starting from a CNTLoRA initialization.

    pip install -e '.[trl]'                                              # TRL is an optional extra
    python recipes/sft_trl.py --out runs/sft                             # SmolLM2 + Shakespeare
    python recipes/sft_trl.py --model path/to/hf-folder --data train.jsonl --out runs/sft

SFTTrainer gets the initialized PeftModel and NO peft_config: given both, TRL refuses (it would
wrap the model in a second, freshly initialized adapter). The statistics are collected over the
same texts, tokenized the same way (truncated at --max-length), that SFTTrainer trains on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recipe_utils as ru  # noqa: E402

import cntlora  # noqa: E402


def main(argv=None):
    """Run the recipe; returns the SFTTrainer (its .model is the trained PeftModel)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ru.add_arguments(parser)
    parser.add_argument("--export", metavar="DIR", default=None, help="also write a plain PEFT LoRA copy here")
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(args.seed)
    model, tokenizer = ru.load_causal_lm(args.model)
    texts = ru.load_texts(args.data)

    # 1. CNTLoRA first, on a calibration sample of the texts SFTTrainer will see
    calibration = ru.lm_batches(tokenizer, ru.calibration_sample(texts, args.calibration_size, args.seed),
                                args.batch_size, args.max_length)
    peft_model = cntlora.initialize(model, calibration, ru.cntlora_config(args),
                                    target_modules=args.target_modules or ru.default_targets(model),
                                    lora_config=LoraConfig(task_type="CAUSAL_LM"))

    # 2. SFTTrainer with the PeftModel and without peft_config
    sft_args = SFTConfig(
        output_dir=str(Path(args.out).with_name(Path(args.out).name + "-trainer")),
        max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        lr_scheduler_type="constant", max_length=args.max_length, dataset_text_field="text",
        gradient_checkpointing=False, logging_steps=max(1, args.steps // 10), save_strategy="no",
        report_to="none", seed=args.seed, use_cpu=not torch.cuda.is_available(),
        bf16=None if torch.cuda.is_available() else False,  # TRL's default: bf16 autocast, slow on CPUs
    )
    trainer = SFTTrainer(model=peft_model, args=sft_args, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"text": texts}))
    trainer.train()

    # 3. save: the CNTLoRA folder (reload with cntlora.load_adapter), and a plain LoRA copy
    cntlora.save_adapter(peft_model, args.out)
    print(f"adapter: {args.out}")
    if args.export:
        cntlora.export_plain_lora(peft_model, args.export)
        print(f"plain PEFT LoRA: {args.export}")
    return trainer


if __name__ == "__main__":
    main()
