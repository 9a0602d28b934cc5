"""Fine-tune a causal LM with transformers' Trainer, starting from a CNTLoRA initialization.

    python recipes/trainer.py --out runs/trainer                         # SmolLM2 + Shakespeare
    python recipes/trainer.py --model path/to/hf-folder --data train.txt --out runs/trainer \\
        --base residual --strength none --lr 3e-4

CNTLoRA runs before the Trainer exists: the Trainer builds its optimizer from the model it is
given, so it gets the initialized PeftModel and trains its LoRA factors (and nothing else). At
the end, cntlora.save_adapter writes the adapter (with the residual base, when there is one);
--export also writes a plain PEFT LoRA copy for the original base model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recipe_utils as ru  # noqa: E402

import cntlora  # noqa: E402


def main(argv=None):
    """Run the recipe; returns the Trainer (its .model is the trained PeftModel)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ru.add_arguments(parser)
    parser.add_argument("--export", metavar="DIR", default=None, help="also write a plain PEFT LoRA copy here")
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(args.seed)
    model, tokenizer = ru.load_causal_lm(args.model)
    texts = ru.load_texts(args.data)

    # 1. CNTLoRA: statistics over a calibration sample of the training texts -> a peft.PeftModel
    calibration = ru.lm_batches(tokenizer, ru.calibration_sample(texts, args.calibration_size, args.seed),
                                args.batch_size, args.max_length)
    peft_model = cntlora.initialize(model, calibration, ru.cntlora_config(args),
                                    target_modules=args.target_modules or ru.default_targets(model),
                                    lora_config=LoraConfig(task_type="CAUSAL_LM"))
    peft_model.print_trainable_parameters()

    # 2. the Trainer, given the initialized PeftModel: it builds its optimizer from it in train()
    training_args = TrainingArguments(
        output_dir=str(Path(args.out).with_name(Path(args.out).name + "-trainer")),
        max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        lr_scheduler_type="constant", logging_steps=max(1, args.steps // 10), save_strategy="no",
        report_to="none", seed=args.seed, use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=peft_model, args=training_args, data_collator=ru.collator(tokenizer),
                      train_dataset=ru.tokenize(tokenizer, texts, args.max_length))
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
