"""CNTLoRA across processes (torchrun or accelerate launch), then data-parallel training.

    torchrun --nproc_per_node 2 recipes/distributed.py --out runs/ddp    # CPUs (gloo) or GPUs (NCCL)
    accelerate launch --multi_gpu --num_processes 2 recipes/distributed.py --out runs/ddp   # GPUs

(On CPUs use torchrun: `accelerate launch --cpu` starts several processes only through MPI.)

Every process draws the same calibration sample and collects statistics over its own share
of it. cntlora all-reduces the sums under torch.distributed, rank 0 solves, and B and A (and a
residual base) are broadcast, so every process starts from the same adapter: the one a single
process would compute over the whole sample. Accelerate's data-parallel wrapper then trains it
(--steps 0: initialize only), and only rank 0 writes the adapter folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recipe_utils as ru  # noqa: E402

import cntlora  # noqa: E402


def main(argv=None):
    """Run the recipe in this process; returns the PeftModel (trained when --steps > 0)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ru.add_arguments(parser, steps=20)
    args = parser.parse_args(argv)

    import torch
    from accelerate import Accelerator
    from peft import LoraConfig

    # joins the process group torchrun / accelerate launch set up (gloo on CPUs, NCCL on GPUs)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(args.seed)
    model, tokenizer = ru.load_causal_lm(args.model)
    texts = ru.load_texts(args.data)

    # 1. the same sample on every rank (same seed), each rank collecting over its own share
    sample = ru.calibration_sample(texts, args.calibration_size, args.seed)
    shard = ru.lm_batches(tokenizer, sample[rank::world], args.batch_size, args.max_length)
    peft_model = cntlora.initialize(model.to(accelerator.device), shard, ru.cntlora_config(args),
                                    target_modules=args.target_modules or ru.default_targets(model),
                                    lora_config=LoraConfig(task_type="CAUSAL_LM"),
                                    progress=accelerator.is_main_process)

    # 2. data-parallel training of the LoRA factors (each rank its own slice of every batch)
    if args.steps > 0:
        train = torch.utils.data.DataLoader(ru.tokenize(tokenizer, texts, args.max_length), shuffle=True,
                                            batch_size=args.batch_size, collate_fn=ru.collator(tokenizer))
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
        ddp_model, optimizer, train = accelerator.prepare(peft_model, optimizer, train)
        ddp_model.train()
        step = 0
        while step < args.steps:
            for batch in train:
                loss = ddp_model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                if accelerator.is_main_process and (step % max(1, args.steps // 10) == 0 or step == 1):
                    print(f"step {step}: loss {loss.item():.4f}")
                if step == args.steps:
                    break
        peft_model = accelerator.unwrap_model(ddp_model)

    # 3. one writer
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        cntlora.save_adapter(peft_model, args.out)
        print(f"adapter: {args.out} (written by rank 0 of {world})")
    accelerator.wait_for_everyone()
    return peft_model


if __name__ == "__main__":
    main()
