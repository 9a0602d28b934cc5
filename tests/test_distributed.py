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


# --- DDP wrappers, uneven data, the shared solve, rank-0 writes, failures, FSDP2 -----------------

import socket  # noqa: E402
import time  # noqa: E402
from datetime import timedelta  # noqa: E402

import pytest  # noqa: E402

from cntlora import CNTLoRAError  # noqa: E402
from helpers import tiny_llama, token_batches  # noqa: E402

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_CFG = CNTLoRAConfig(r=2, base="residual", strength=None)
LLAMA_CAP = 8 * (48 * 48 + 49)  # the widest input (down_proj) alone: six passes over each rank's data


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, tmp_path, *args, timeout_s=10):
    """Two gloo ranks with a short timeout, so a hang fails the test instead of stalling it."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(2, _free_port(), str(tmp_path), timeout_s, *args), nprocs=2, join=True)


def _join(rank, world, port, timeout_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    torch.manual_seed(100 + rank)  # rank-dependent RNG state must not leak into the adapter


def _leave():
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


def _sums(stats):
    return {g: (s.count.clone(), s.total.clone(), s.full(torch.float64)) for g, s in stats.fine.items()}


def _factors(plan):
    return {n: (lp.B, lp.A) for n, lp in plan.layers.items()}


# Rank 0 has no data at all in the Llama case; in the MLP case the ranks hold different numbers
# of batches of different sizes.
def _llama_shards(rank):
    data = token_batches(n_batches=3, batch=3, seq=10, pad_last=4)
    return [] if rank == 0 else data


def _mlp_shards(rank):
    data = [b[: 4 + 5 * i] for i, b in enumerate(feature_batches(n_batches=5))]
    return data[:1] if rank == 0 else data[1:]


def _uneven_worker(rank, world, port, out, timeout_s):
    from torch.nn.parallel import DistributedDataParallel as DDP

    _join(rank, world, port, timeout_s)
    try:
        rec = {}
        ddp = DDP(tiny_llama())
        shard = _llama_shards(rank)
        stats = cntlora.collect_statistics(ddp, shard, LLAMA, progress=False)
        rec["layers"] = list(stats.layers)
        rec["sums"] = _sums(stats)
        rec["batches"] = stats.info["fine"]["batches"]
        rec["rank0"] = _factors(cntlora.solve(ddp, stats, LLAMA_CFG))
        rec["shared"] = _factors(cntlora.solve(ddp, stats, LLAMA_CFG, distributed_solve="shared"))
        parts = cntlora.iter_statistics(ddp, shard, LLAMA, max_stats_memory=LLAMA_CAP, progress=False)
        plan = cntlora.solve_parts(ddp, parts, LLAMA_CFG, release=True, distributed_solve="shared")
        rec["passes"], rec["capped"] = plan.stats_info["fine"]["passes"], _factors(plan)
        peft_model = cntlora.initialize(ddp, shard, LLAMA_CFG, target_modules=LLAMA, progress=False,
                                        max_stats_memory=LLAMA_CAP)
        rec["init"] = {k: v.clone() for k, v in peft_model.state_dict().items()}
        # only rank 0 writes, whichever ranks call
        cntlora.save_adapter(peft_model, os.path.join(out, f"adapter{rank}"))
        cntlora.export_plain_lora(peft_model, os.path.join(out, f"plain{rank}"))
        # the PeftModel wrapped again trains as one model
        trained = DDP(peft_model)
        batch = token_batches(n_batches=1, seed=7 + rank)[0]
        trained(**batch, labels=batch["input_ids"]).loss.backward()
        rec["grads"] = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

        mlp = DDP(TwoLayerMLP())
        rec["mlp_sums"] = _sums(cntlora.collect_statistics(mlp, _mlp_shards(rank), ["fc1", "fc2"], progress=False))
        parts = cntlora.iter_statistics(mlp, _mlp_shards(rank), ["fc1", "fc2"], max_stats_memory=CAP, progress=False)
        rec["mlp"] = _factors(cntlora.solve_parts(mlp, parts, CFG, release=True))
        torch.save(rec, os.path.join(out, f"uneven{rank}.pt"))
    finally:
        _leave()


def _same(a, b):
    return all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a) and a.keys() == b.keys()


def _close_sums(got, want):
    assert got.keys() == want.keys()
    for g in want:
        for x, y in zip(got[g], want[g]):
            assert torch.allclose(x, y, rtol=1e-6, atol=1e-6), g


def test_ddp_uneven_and_empty_ranks_match_one_process(tmp_path):
    _spawn(_uneven_worker, tmp_path, timeout_s=30)
    r0, r1 = (torch.load(tmp_path / f"uneven{r}.pt") for r in range(2))

    model = tiny_llama()
    union = _llama_shards(0) + _llama_shards(1)
    stats = cntlora.collect_statistics(model, union, LLAMA, progress=False)
    single = _factors(cntlora.solve(model, stats, LLAMA_CFG))
    # no "module." prefix, and the sums over the union of the ranks' data (rank 0 had none)
    assert r0["layers"] == r1["layers"] == list(stats.layers)
    assert r0["batches"] == r1["batches"] == 3
    _close_sums(r0["sums"], _sums(stats))
    _close_sums(r1["sums"], _sums(stats))
    for key in ("rank0", "shared", "capped"):  # bit for bit the same on both ranks, and the one-process adapter
        assert _same(r0[key], r1[key]), key
        for n, (b, a) in single.items():
            assert torch.allclose(r0[key][n][0] @ r0[key][n][1], b @ a, atol=1e-6, rtol=1e-5), (key, n)
    assert _same(r0["shared"], r0["rank0"])  # the shared solve changes who computes, not the result
    assert r0["passes"] == r1["passes"] == 6
    assert all(torch.equal(r0["init"][k], r1["init"][k]) for k in r0["init"])
    assert all(torch.equal(r0["grads"][k], r1["grads"][k]) for k in r0["grads"]) and r0["grads"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".pt")) == ["adapter0", "plain0"]

    mlp = TwoLayerMLP()
    union = _mlp_shards(0) + _mlp_shards(1)
    stats = cntlora.collect_statistics(mlp, union, ["fc1", "fc2"], progress=False)
    _close_sums(r0["mlp_sums"], _sums(stats))
    _close_sums(r1["mlp_sums"], _sums(stats))
    assert _same(r0["mlp"], r1["mlp"])
    for n, (b, a) in _factors(cntlora.solve(mlp, stats, CFG)).items():
        assert torch.allclose(r0["mlp"][n][0] @ r0["mlp"][n][1], b @ a, atol=1e-6, rtol=1e-5)


class _Failing:
    """A dataloader whose second batch raises."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        yield self.batches[0]
        raise OSError("disk read error on shard 1")


class _Stuck(_Failing):
    """A dataloader that stops answering after one batch (until the test lets it go)."""

    def __init__(self, batches, release):
        super().__init__(batches)
        self.release = release

    def __iter__(self):
        yield self.batches[0]
        deadline = time.monotonic() + 20
        while not os.path.exists(self.release) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield from self.batches[1:]


def _failing_worker(rank, world, port, out, timeout_s, how):
    _join(rank, world, port, timeout_s)
    release = os.path.join(out, "release")
    messages = []
    try:
        data = feature_batches(n_batches=3)
        loaders = {"fails": _Failing(data), "stuck": _Stuck(data, release)}
        for cap in (None, CAP):  # one pass, and memory-capped passes
            shard = loaders[how] if rank == 1 else data
            t0 = time.monotonic()
            try:
                cntlora.initialize(TwoLayerMLP(), shard, CFG, target_modules=["fc1", "fc2"], progress=False,
                                   max_stats_memory=cap)
                messages.append(("no error", 0.0))
            except CNTLoRAError as e:
                messages.append((str(e), time.monotonic() - t0))
            if how == "stuck":
                break  # the process group is broken after a timeout
    finally:
        if rank == 0:
            open(release, "w").close()
        torch.save(messages, os.path.join(out, f"failed{rank}.pt"))
        if how == "fails":
            _leave()
        else:  # a timed-out gloo group can abort in its destructors: leave without running them
            os._exit(0)


def test_a_rank_that_fails_stops_every_rank_with_its_error(tmp_path):
    _spawn(_failing_worker, tmp_path, "fails", timeout_s=10)
    for r in range(2):
        messages = torch.load(tmp_path / f"failed{r}.pt")
        assert len(messages) == 2
        for text, _ in messages:
            assert "rank 1 of 2 failed" in text and "disk read error on shard 1" in text and "rank 1" in text


def test_a_stuck_rank_is_cut_off_by_the_process_group_timeout(tmp_path):
    t0 = time.monotonic()
    _spawn(_failing_worker, tmp_path, "stuck", timeout_s=2)
    (text, seconds), = torch.load(tmp_path / "failed0.pt")
    assert "another rank stopped or is stuck" in text and "timeout" in text
    assert seconds < 10 and time.monotonic() - t0 < 40


def _fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = TwoLayerMLP()
    fully_shard(model.fc1)
    fully_shard(model.fc2)
    fully_shard(model)
    return model


def _fsdp_worker(rank, world, port, out, timeout_s):
    from torch.distributed.tensor import DTensor

    _join(rank, world, port, timeout_s)
    rec = {}
    try:
        data = feature_batches(n_batches=4)
        model = _fsdp_model()
        rec["sharded"] = isinstance(model.fc1.weight, DTensor)
        peft_model = cntlora.initialize(model, data[rank::world], CFG, target_modules=["fc1", "fc2"], progress=False)
        rec["factors"] = _factors(peft_model.cntlora_plan)
        base = peft_model.base_model.model
        rec["lora_plain"] = not isinstance(base.fc1.lora_A["default"].weight, DTensor)
        rec["w"] = {n: getattr(base, n).base_layer.weight.full_tensor() for n in ("fc1", "fc2")}
        with torch.no_grad():
            rec["out"] = peft_model(data[0])
        cntlora.save_adapter(peft_model, os.path.join(out, f"fsdp{rank}"))  # every rank: the gather is a collective
        try:
            cntlora.collect_statistics(_fsdp_model(), data[: 1 + rank], ["fc1"], progress=False)
        except CNTLoRAError as e:
            rec["uneven"] = str(e)
        torch.save(rec, os.path.join(out, f"fsdp{rank}.pt"))
    finally:
        _leave()


def test_fsdp2_sharded_weights_on_gloo(tmp_path):
    pytest.importorskip("torch.distributed.fsdp").fully_shard  # noqa: B018
    _spawn(_fsdp_worker, tmp_path, timeout_s=30)
    r0, r1 = (torch.load(tmp_path / f"fsdp{r}.pt") for r in range(2))
    assert r0["sharded"] and r0["lora_plain"]
    assert _same(r0["factors"], r1["factors"])
    model = TwoLayerMLP()
    data = feature_batches(n_batches=4)
    single = cntlora.initialize(model, data, CFG, target_modules=["fc1", "fc2"], progress=False)
    for n, (b, a) in _factors(single.cntlora_plan).items():
        assert torch.allclose(r0["factors"][n][0] @ r0["factors"][n][1], b @ a, atol=1e-6, rtol=1e-5)
        # the residual update went into the shards: the gathered W0 - s·B·A is the one-process weight
        want = getattr(single.base_model.model, n).base_layer.weight
        assert torch.allclose(r0["w"][n], want, atol=1e-6) and torch.equal(r0["w"][n], r1["w"][n])
    with torch.no_grad():
        assert torch.allclose(r0["out"], single(data[0]), atol=1e-5)
        assert torch.allclose(r0["out"], TwoLayerMLP()(data[0]), atol=1e-5)  # residual: step 0 unchanged
    assert (tmp_path / "fsdp0" / "residual_base.safetensors").is_file() and not (tmp_path / "fsdp1").exists()
    reloaded = cntlora.load_adapter(TwoLayerMLP(), str(tmp_path / "fsdp0"))
    with torch.no_grad():
        assert torch.allclose(reloaded(data[0]), r0["out"], atol=1e-5)
    assert "same number of batches" in r0["uneven"] and r0["uneven"] == r1["uneven"]


def test_the_multigpu_benchmark_smoke_run_on_cpu(tmp_path):
    """bench/multigpu/run.py's tiny shape: one process, then two under torchrun against its adapters."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    env.pop("RANK", None)
    one = [sys.executable, "-m", "bench.multigpu.run", "--tiny", "--device", "cpu"]
    subprocess.run(one + ["--save-adapters", str(tmp_path / "one.pt"), "--out", str(tmp_path / "one.json")],
                   cwd=root, env=env, check=True, timeout=120, capture_output=True)
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "bench.multigpu.run", "--tiny", "--device", "cpu", "--distributed-solve", "shared"]
    subprocess.run(two + ["--reference", str(tmp_path / "one.pt"), "--out", str(tmp_path / "two.json")],
                   cwd=root, env=env, check=True, timeout=120, capture_output=True)
    got = json.loads((tmp_path / "two.json").read_text())
    assert got["world_size"] == 2 and got["ranks_identical"] and got["reference"]["matches"]
    assert got["forward_floor_s"] > 0 and got["init_s"] > 0
