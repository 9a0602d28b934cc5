"""Under torch.distributed the sums are all-reduced and every rank ends with the same adapter."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cntlora
from cntlora import CNTLoRAConfig

from helpers import TwoLayerMLP, feature_batches

CFG = CNTLoRAConfig(mode="cross", r=3, base="residual")
CAP = 8 * (12 * 12 + 13)  # the sums of one input (12 or 10 wide) at a time: a pass per layer


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # rank-dependent RNG state must not leak into the adapter
        model = TwoLayerMLP()
        shard = feature_batches(n_batches=4)[rank::world]
        stats = cntlora.collect_statistics(model, shard, ["fc1", "fc2"], progress=False)
        plan = cntlora.solve(model, stats, CFG)
        torch.save({n: (lp.B, lp.A) for n, lp in plan.layers.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
        # memory-capped passes, each all-reduced and solved on rank 0 as it arrives
        parts = cntlora.iter_statistics(model, shard, ["fc1", "fc2"], max_stats_memory=CAP, progress=False)
        plan = cntlora.solve_parts(model, parts, CFG, release=True)
        torch.save({"passes": plan.stats_info["fine"]["passes"], **{n: (lp.B, lp.A) for n, lp in plan.layers.items()}},
                   os.path.join(out_dir, f"streamed{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    model = TwoLayerMLP()
    stats = cntlora.collect_statistics(model, feature_batches(n_batches=4), ["fc1", "fc2"], progress=False)
    single = cntlora.solve(model, stats, CFG)
    s0, s1 = (torch.load(tmp_path / f"streamed{r}.pt") for r in range(2))
    assert s0["passes"] == s1["passes"] == 2
    for name, lp in single.layers.items():
        assert torch.equal(r0[name][0], r1[name][0]) and torch.equal(r0[name][1], r1[name][1])
        assert torch.equal(s0[name][0], s1[name][0]) and torch.equal(s0[name][1], s1[name][1])
        assert torch.equal(s0[name][0], r0[name][0]) and torch.equal(s0[name][1], r0[name][1])
        # all-reduced sums equal the single-process sums up to summation order
        assert torch.allclose(r0[name][0] @ r0[name][1], lp.B @ lp.A, atol=1e-5, rtol=1e-4)
