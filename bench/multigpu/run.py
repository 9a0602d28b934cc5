"""CNTLoRA's initialization across processes: wall time against the forward-only floor, and equality.

Launch with torchrun (one process per GPU); without torchrun's variables it runs as one process:

    torchrun --nproc_per_node 1 -m bench.multigpu.run --shape 1b --save-adapters runs/multigpu/1b-1gpu.pt \
        --out runs/multigpu/1b-1gpu.json
    torchrun --nproc_per_node 2 -m bench.multigpu.run --shape 1b --reference runs/multigpu/1b-1gpu.pt \
        --out runs/multigpu/1b-2gpu.json

A Llama-shaped model with seeded random weights (no download) is built on every rank; the
calibration batches (seeded random tokens) are split across the ranks. Each run times
1. the forward-only floor: the ranks' shares of the data through the model, no hooks;
2. cntlora.initialize on the same shares (collect, all-reduce, solve, broadcast, apply).
Times are the slowest rank's. Rank 0 writes a JSON with both, the plan's phase timings, whether
every rank holds bit-identical adapters, and (with --reference) how far the adapters are from
the ones a single process saved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

SHAPES = {  # LlamaConfig fields
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--tiny", action="store_true", help="the tiny shape with little data (a CPU smoke run)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (fully_shard per decoder layer)")
    p.add_argument("--batches", type=int, default=32, help="calibration batches in all (split across the ranks)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--distributed-solve", choices=["rank0", "shared"], default="rank0")
    p.add_argument("--max-stats-memory", default=None, help="bytes, or e.g. 16GiB")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bfloat16 on GPUs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-adapters", default=None, help="rank 0 saves every layer's B and A here (torch.save)")
    p.add_argument("--reference", default=None, help="adapters saved by --save-adapters of another run, to compare")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max relative Frobenius error of B·A vs --reference")
    p.add_argument("--out", default="runs/multigpu/results.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.batches, args.batch_size, args.seq_len, args.r = "tiny", 6, 2, 16, 4
    args.max_stats_memory = _bytes(args.max_stats_memory)
    return args


def _bytes(text):
    if text is None:
        return None
    units = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    for unit, factor in units.items():
        if str(text).endswith(unit):
            return int(float(str(text)[: -len(unit)]) * factor)
    return int(text)


def _setup(args):
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ:  # under torchrun (also with one process: the same code path)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda"
                                else None)
    return rank, world, device


def build_model(args, device, rank: int):
    """A LlamaForCausalLM of the shape with seeded random weights (the same on every rank, and for
    every world size, unless sharded: then each rank draws its own shard)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cfg = LlamaConfig(max_position_embeddings=max(args.seq_len, 64), **SHAPES[args.shape])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(args.seed + (rank if args.fsdp else 0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if name.endswith("norm.weight"):
                local.fill_(1.0)
            else:
                local.copy_(torch.randn(local.shape, generator=gen, device=device, dtype=torch.float32) * 0.02)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg).to(device)  # its buffers were left empty
    return model.eval(), cfg


def batches_for(args, vocab: int, rank: int, world: int):
    """This rank's share of the seeded calibration batches."""
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    every = [{"input_ids": torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g),
              "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long)}
             for _ in range(args.batches)]
    return every[rank::world]


def _slowest(seconds: float, device) -> float:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _barrier(device):
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def compare(factors: dict, reference: dict) -> dict:
    """Max relative Frobenius error of B·A per layer against the reference adapters."""
    worst, layer = 0.0, None
    for name, (b, a) in reference.items():
        mine = factors[name][0].double() @ factors[name][1].double()
        want = b.double() @ a.double()
        err = float((mine - want).norm() / want.norm().clamp_min(1e-30))
        if err > worst:
            worst, layer = err, name
    return {"max_rel_error": worst, "worst_layer": layer, "layers": len(reference)}


def main(argv=None) -> dict:
    """Run the benchmark in this process; returns the results (rank 0 also writes them)."""
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    import cntlora

    rank, world, device = _setup(args)
    try:
        model, cfg = build_model(args, device, rank)
        shard = batches_for(args, cfg.vocab_size, rank, world)
        # 1. the forward-only floor
        _barrier(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for batch in shard:
                model(**{k: v.to(device) for k, v in batch.items()})
        _barrier(device)
        floor = _slowest(time.perf_counter() - t0, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # 2. the initialization on the same shares
        t0 = time.perf_counter()
        peft_model = cntlora.initialize(model, shard, cntlora.CNTLoRAConfig(r=args.r), target_modules=TARGETS,
                                        max_stats_memory=args.max_stats_memory, progress=False,
                                        distributed_solve=args.distributed_solve)
        _barrier(device)
        init = _slowest(time.perf_counter() - t0, device)
        plan = peft_model.cntlora_plan
        factors = {n: (lp.B, lp.A) for n, lp in plan.layers.items()}
        digest = hashlib.sha256()
        for name in sorted(factors):
            for t in factors[name]:
                digest.update(t.contiguous().cpu().numpy().tobytes())
        digests = [None] * world
        if dist.is_initialized():
            dist.all_gather_object(digests, digest.hexdigest())
        else:
            digests = [digest.hexdigest()]
        results = {
            "shape": args.shape, "world_size": world, "fsdp": args.fsdp, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "params": sum(p.numel() for p in model.parameters()), "batches": args.batches,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "r": args.r,
            "distributed_solve": args.distributed_solve, "max_stats_memory": args.max_stats_memory,
            "forward_floor_s": floor, "init_s": init, "init_over_floor": init / floor if floor > 0 else None,
            "plan_timings": plan.timings, "passes": plan.stats_info.get("fine", {}).get("passes"),
            "ranks_identical": len(set(digests)) == 1,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        }
        if args.reference:
            results["reference"] = {"file": args.reference, "tolerance": args.tolerance,
                                    **compare(factors, torch.load(args.reference))}
            results["reference"]["matches"] = results["reference"]["max_rel_error"] <= args.tolerance
        if rank == 0:
            if args.save_adapters:
                os.makedirs(os.path.dirname(os.path.abspath(args.save_adapters)), exist_ok=True)
                torch.save(factors, args.save_adapters)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
            print(json.dumps({k: results[k] for k in ("world_size", "forward_floor_s", "init_s", "ranks_identical")}
                             | ({"reference": results["reference"]} if args.reference else {})))
        return results
    finally:
        if dist.is_initialized():
            dist.barrier()  # nobody tears the group down while another rank still uses it
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
