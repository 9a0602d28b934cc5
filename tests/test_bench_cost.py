"""The cost benchmark's plumbing on a tiny Llama (no timing assertions), and the fast paths
the cost work added to the core: blocked Gram accumulation, float32 sums, shared solves."""

import argparse
import json
import math

import pytest
import torch
from torch import nn

import cntlora
import cntlora.statistics as statistics
from cntlora.bench import cost
from cntlora.solver import mode_constraints, solve_delta, transfer_matrix


def _args(tmp_path, **over):
    parser = argparse.ArgumentParser()
    cost.add_arguments(parser)
    argv = ["--model", "llama-tiny", "--device", "cpu", "--seqs", "4", "--seq-len", "16", "--batch-size", "2",
            "--r", "4", "--repeats", "1", "--warmup", "0", "--quiet", "--out", str(tmp_path / "cost-tiny-cpu.json"),
            "--methods", "floor", "cntlora-cross", "default"]
    args = parser.parse_args(argv)
    for k, v in over.items():
        setattr(args, k, v)
    return args


def test_benchmark_writes_results_and_summary(tmp_path):
    args = _args(tmp_path)
    assert cost.run(args) == 0
    result = json.loads((tmp_path / "cost-tiny-cpu.json").read_text())
    assert result["tokens"] == 4 * 16 and result["device"] == "cpu" and result["params"] > 0
    assert set(result["methods"]) == {"floor", "cntlora-cross", "default"}
    for entry in result["methods"].values():
        assert "error" not in entry
        assert entry["repeats"] == 1 and entry["median_seconds"] > 0 and math.isfinite(entry["median_seconds"])
        assert entry["median_peak_memory_bytes"] >= 0
    phases = result["methods"]["cntlora-cross"]["median_phases"]
    assert set(phases) == {"collect", "solve", "decompose", "apply"}
    assert all(v > 0 and math.isfinite(v) for v in phases.values())
    assert result["methods"]["cntlora-cross"]["ratio_to_floor"] > 0

    summary_path, plot_path = tmp_path / "cost-summary.json", tmp_path / "cost-scaling.png"
    args = _args(tmp_path, summarize=[str(tmp_path / "cost-tiny-cpu.json")], summary_out=str(summary_path),
                 plot=str(plot_path))
    assert cost.run(args) == 0
    summary = json.loads(summary_path.read_text())
    assert list(summary) == ["runs"] and len(summary["runs"]) == 3
    for row in summary["runs"]:
        assert list(row) == cost.SUMMARY_KEYS
        assert isinstance(row["params"], int) and isinstance(row["tokens"], int)
        assert isinstance(row["peak_memory_bytes"], int) and isinstance(row["repeats"], int)
        assert row["device"] in ("cpu", "h200")
        assert row["init_seconds"] > 0 and row["floor_seconds"] > 0
    assert plot_path.stat().st_size > 0


def test_capped_eva_is_labelled_in_the_summary(tmp_path):
    args = _args(tmp_path, methods=["floor", "eva"], eva_cap_seconds=0.0)
    cost.run(args)
    result = json.loads((tmp_path / "cost-tiny-cpu.json").read_text())
    assert result["methods"]["eva"]["finished"] is False
    rows = cost.summarize([str(tmp_path / "cost-tiny-cpu.json")])["runs"]
    assert {r["method"] for r in rows} == {"floor", "eva-capped"}


def test_blocked_gram_matches_the_plain_sums(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 50), nn.ReLU(), nn.Linear(50, 7))
    batches = [torch.randn(3, 5, 40) for _ in range(3)]
    plain = cntlora.collect_statistics(model, batches, ["0", "2"], progress=False)
    monkeypatch.setattr(statistics, "BLOCKED_GRAM_FROM", 10)
    assert len(statistics.gram_blocks(50)) == 4
    blocked = cntlora.collect_statistics(model, batches, ["0", "2"], progress=False)
    single = cntlora.collect_statistics(model, batches, ["0", "2"], progress=False, stats_dtype=torch.float32)
    for g in plain.fine:
        torch.testing.assert_close(blocked.fine[g].outer, plain.fine[g].outer, rtol=1e-12, atol=1e-12)
        assert single.fine[g].outer.dtype == torch.float32
        torch.testing.assert_close(single.fine[g].outer.double(), plain.fine[g].outer, rtol=1e-5, atol=1e-5)
        x = torch.cat([b.reshape(-1, 40) for b in batches]).double() if g == "0" else None
        if x is not None:
            torch.testing.assert_close(plain.fine[g].outer, x.T @ x, rtol=1e-6, atol=1e-5)


def test_shared_solve_equals_the_per_layer_solve():
    torch.manual_seed(1)
    x = torch.randn(200, 12, dtype=torch.float64)
    fine = cntlora.solver.Moments(200.0, x.mean(0), x.T @ x / 200)
    w0 = torch.randn(5, 12, dtype=torch.float64)
    constraints = mode_constraints(cntlora.CNTLoRAConfig(mode="self"))
    torch.testing.assert_close(w0 @ transfer_matrix(fine, None, constraints, 1e-2),
                               solve_delta(w0, fine, None, constraints, 1e-2), rtol=1e-9, atol=1e-12)


def test_self_mode_plan_is_the_same_with_shared_solves():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()
    batches = [{"input_ids": torch.randint(64, (2, 16))} for _ in range(2)]
    targets = ["q_proj", "k_proj", "v_proj"]
    stats = cntlora.collect_statistics(model, batches, targets, progress=False)
    assert len(set(stats.groups.values())) == 1  # q/k/v share one input, so one solve
    plan = cntlora.solve(model, stats, cntlora.CNTLoRAConfig(mode="self", r=2, base="keep", strength=None))
    constraints = mode_constraints(plan.config)
    for name in plan.layers:
        w0 = dict(model.named_modules())[name].weight.detach().double()
        delta = solve_delta(w0, stats.moments(name), None, constraints, plan.config.ridge)
        torch.testing.assert_close(plan.scale * plan.layers[name].B.double() @ plan.layers[name].A.double(),
                                   _rank_r(delta, 2), rtol=1e-4, atol=1e-6)


def test_tall_and_wide_weights_solve_the_same_system():
    torch.manual_seed(2)
    x = torch.randn(300, 10, dtype=torch.float64)
    fine = cntlora.solver.Moments(300.0, x.mean(0), x.T @ x / 300)
    constraints = mode_constraints(cntlora.CNTLoRAConfig(mode="self"))
    lam = 1e-2 * float(torch.trace(fine.second)) / 10
    exact = fine.second @ torch.linalg.inv(fine.second + lam * torch.eye(10, dtype=torch.float64))
    for m in (4, 25):  # wide (m < n) and tall (m > n) take different solve orders
        w0 = torch.randn(m, 10, dtype=torch.float64)
        torch.testing.assert_close(solve_delta(w0, fine, None, constraints, 1e-2), w0 @ exact, rtol=1e-9, atol=1e-11)


def test_all_ones_host_mask_is_dropped_and_a_partial_one_kept():
    assert statistics._host_mask(torch.ones(2, 3, dtype=torch.bool)) is None
    partial = torch.tensor([[True, False]])
    assert statistics._host_mask(partial) is partial
    assert statistics._host_mask(None) is None


def _rank_r(delta, r):
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * 2**30), ("1.5gb", 1_500_000_000), ("1024", 1024)])
def test_byte_sizes(text, expected):
    assert cost._bytes(text) == expected


def test_early_stop_skips_the_lm_head_and_keeps_the_sums():
    model, _ = cost.build_model("llama-tiny", torch.device("cpu"), torch.float32, 0)
    batches = cost.calibration_batches("llama-tiny", None, 512, 6, 16, 2, 0)
    batches[1]["attention_mask"][0, :5] = 0  # one partial mask, so the masked path runs too
    full = cntlora.collect_statistics(model, batches, cost.LINEAR_KINDS, progress=False, stop_early=False)
    head_calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    early = cntlora.collect_statistics(model, batches, cost.LINEAR_KINDS, progress=False)
    capped = cntlora.collect_statistics(model, batches, cost.LINEAR_KINDS, progress=False, max_stats_memory=300_000)
    handle.remove()
    assert len(head_calls) == 2  # the first batch of each collection, where the sharing is learned
    assert capped.info["fine"]["passes"] > 1
    for g in full.fine:
        for other in (early, capped):
            assert float(other.fine[g].count) == float(full.fine[g].count)
            torch.testing.assert_close(other.fine[g].outer, full.fine[g].outer, rtol=1e-12, atol=1e-12)


def test_early_stop_is_off_for_a_layer_run_twice_per_forward():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.out(self.lin(self.lin(x)))

    torch.manual_seed(0)
    model, xs = Twice(), [torch.randn(4, 6) for _ in range(3)]
    full = cntlora.collect_statistics(model, xs, ["lin"], progress=False, stop_early=False)
    early = cntlora.collect_statistics(model, xs, ["lin"], progress=False)
    assert float(early.fine["lin"].count) == float(full.fine["lin"].count) == 24
    torch.testing.assert_close(early.fine["lin"].outer, full.fine["lin"].outer)
