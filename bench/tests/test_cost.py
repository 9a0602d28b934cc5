"""The cost benchmark's plumbing on a tiny Llama (no timing assertions), and the fast paths
the cost work added to the core: blocked Gram accumulation, float32 sums, shared solves."""

import argparse
import json
import math

import pytest
import torch
from torch import nn

import cntlora
import cntlora.batches as batches
import cntlora.statistics as statistics
from bench.cost import command, inits, measure
from bench.cost import report as cost_report
from cntlora.decompose import DenseProducts, randomized_range, ritz_triplets
from cntlora.plan import PhaseClock
from cntlora.solver import mode_constraints, normal_equations, solve_delta
from cntlora.units import byte_size


def _args(tmp_path, **over):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    argv = ["--model", "llama-tiny", "--device", "cpu", "--seqs", "4", "--seq-len", "16", "--batch-size", "2",
            "--r", "4", "--repeats", "1", "--warmup", "0", "--quiet", "--out", str(tmp_path / "cost-tiny-cpu.json"),
            "--methods", "floor", "cntlora-cross", "default"]
    args = parser.parse_args(argv)
    for k, v in over.items():
        setattr(args, k, v)
    return args


def test_benchmark_writes_results_and_summary(tmp_path):
    args = _args(tmp_path)
    assert command.run(args) == 0
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
    assert command.run(args) == 0
    summary = json.loads(summary_path.read_text())
    assert list(summary) == ["runs"] and len(summary["runs"]) == 3
    for row in summary["runs"]:
        assert list(row) == cost_report.SUMMARY_KEYS
        assert isinstance(row["params"], int) and isinstance(row["tokens"], int)
        assert isinstance(row["peak_memory_bytes"], int) and isinstance(row["repeats"], int)
        assert row["device"] in ("cpu", "h200")
        assert row["init_seconds"] > 0 and row["floor_seconds"] > 0
    assert plot_path.stat().st_size > 0


def test_capped_run_streams_or_offloads_the_same_statistics(tmp_path):
    args = _args(tmp_path, methods=["cntlora-self", "cntlora-self-offload"], max_stats_memory=300_000)
    assert command.run(args) == 0
    methods = json.loads((tmp_path / "cost-tiny-cpu.json").read_text())["methods"]
    streamed, offloaded = (methods[m]["runs"][0] for m in ("cntlora-self", "cntlora-self-offload"))
    assert streamed["stats_info"]["fine"]["passes"] == offloaded["stats_info"]["fine"]["passes"] > 1
    assert streamed["stats_bytes"] == offloaded["stats_bytes"] > 300_000  # more than one pass's worth


def test_capped_eva_is_labelled_in_the_summary(tmp_path):
    args = _args(tmp_path, methods=["floor", "eva"], eva_cap_seconds=0.0)
    command.run(args)
    result = json.loads((tmp_path / "cost-tiny-cpu.json").read_text())
    assert result["methods"]["eva"]["finished"] is False
    rows = cost_report.summarize([str(tmp_path / "cost-tiny-cpu.json")])["runs"]
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
        # the per-batch products are float32 GEMMs, whose summation order BLAS may pick per block shape
        torch.testing.assert_close(blocked.fine[g].outer, plain.fine[g].outer, rtol=1e-6, atol=1e-5)
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
    torch.testing.assert_close(w0 @ normal_equations(fine, None, constraints, 1e-2).transfer(),
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
    assert batches._host_mask(torch.ones(2, 3, dtype=torch.bool)) is None
    partial = torch.tensor([[True, False]])
    assert batches._host_mask(partial) is partial
    assert batches._host_mask(None) is None


def _rank_r(delta, r):
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * 2**30), ("1.5gb", 1_500_000_000), ("1024", 1024)])
def test_byte_sizes(text, expected):
    assert byte_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GiB", "0", "12 parsecs"])
def test_bad_byte_sizes_name_the_format(text):
    with pytest.raises(argparse.ArgumentTypeError, match="e.g. 16GiB"):
        byte_size(text)


def test_early_stop_skips_the_lm_head_and_keeps_the_sums():
    model, _ = inits.build_model("llama-tiny", torch.device("cpu"), torch.float32, 0)
    batches = inits.calibration_batches("llama-tiny", None, 512, 6, 16, 2, 0)
    batches[1]["attention_mask"][0, :5] = 0  # one partial mask, so the masked path runs too
    full = cntlora.collect_statistics(model, batches, inits.LINEAR_KINDS, progress=False, stop_early=False)
    head_calls = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: head_calls.append(args[0].shape[0]))
    early = cntlora.collect_statistics(model, batches, inits.LINEAR_KINDS, progress=False)
    capped = cntlora.collect_statistics(model, batches, inits.LINEAR_KINDS, progress=False, max_stats_memory=300_000)
    handle.remove()
    # only the discovery of each collection runs the head: on one row of the first batch (of 2)
    assert head_calls == [1, 1]
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


class _OnlyOnWideBatches(nn.Module):
    """`late` runs only on batches of more than one row, like an expert a single row may not reach."""

    def __init__(self):
        super().__init__()
        self.early, self.late, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.early(x)
        if x.shape[0] > 1:
            h = h + self.late(torch.tanh(h))
        return self.head(h)


def test_a_layer_missed_by_the_discovery_row_is_still_collected_in_full():
    torch.manual_seed(0)
    model, xs = _OnlyOnWideBatches(), [torch.randn(4, 6) for _ in range(3)]
    full = cntlora.collect_statistics(model, xs, ["early", "late"], progress=False, stop_early=False)
    for kwargs in ({}, {"max_stats_memory": 8 * (36 + 7)}):
        stats = cntlora.collect_statistics(model, xs, ["early", "late"], progress=False, **kwargs)
        for g in ("early", "late"):
            assert float(stats.fine[g].count) == 12
            torch.testing.assert_close(stats.fine[g].outer, full.fine[g].outer)


def test_a_one_shot_iterator_loses_no_batch_to_the_discovery():
    torch.manual_seed(0)
    model, xs = _OnlyOnWideBatches(), [torch.randn(4, 6) for _ in range(3)]
    listed = cntlora.collect_statistics(model, xs, ["early"], progress=False)
    streamed = cntlora.collect_statistics(model, iter(xs), ["early"], progress=False)
    assert float(streamed.fine["early"].count) == 12
    torch.testing.assert_close(streamed.fine["early"].outer, listed.fine["early"].outer)


def test_a_forward_that_needs_the_whole_batch_discovers_on_it():
    torch.manual_seed(0)
    model, xs = _OnlyOnWideBatches(), [torch.randn(4, 6) for _ in range(3)]
    seen = []

    def fixed_batch_forward(m, x):
        seen.append(x.shape[0])
        if x.shape[0] != 4:
            raise RuntimeError("this model takes batches of 4")
        return m(x)

    stats = cntlora.collect_statistics(model, xs, ["early"], progress=False, forward_fn=fixed_batch_forward)
    assert seen[:2] == [1, 4] and float(stats.fine["early"].count) == 12


# --- the implicit randomized path: large layers never form ΔW ---------------------------------

def _llama_stats(intermediate=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=intermediate, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()
    batches = [{"input_ids": torch.randint(64, (4, 16))} for _ in range(3)]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return model, cntlora.collect_statistics(model, batches, targets, progress=False)


def _projector(v):
    return v @ v.T


def test_randomized_svd_finds_the_leading_triplets():
    from cntlora.decompose import DenseProducts, randomized_svd

    torch.manual_seed(3)
    u0, _ = torch.linalg.qr(torch.randn(80, 40, dtype=torch.float64))
    v0, _ = torch.linalg.qr(torch.randn(50, 40, dtype=torch.float64))
    sigma = 0.7 ** torch.arange(40, dtype=torch.float64)  # a decaying spectrum, like ΔW's
    delta = (u0 * sigma) @ v0.T
    u, s, v = randomized_svd(DenseProducts(delta), 6, seed=0, niter=4)
    torch.testing.assert_close(s, sigma[:6], rtol=1e-8, atol=0)
    torch.testing.assert_close(_projector(v), _projector(v0[:, :6]), rtol=0, atol=1e-7)
    torch.testing.assert_close(_projector(u), _projector(u0[:, :6]), rtol=0, atol=1e-7)
    torch.testing.assert_close((u * s) @ v.T, (u0[:, :6] * sigma[:6]) @ v0[:, :6].T, rtol=0, atol=1e-8)


@pytest.mark.parametrize("mode", ["self", "cross", "shift"])
@pytest.mark.parametrize("m", [7, 30])  # wide and tall
def test_implicit_products_equal_the_formed_delta(mode, m):
    from cntlora.solver import normal_equations, pretrain_moments

    torch.manual_seed(4)
    x = torch.randn(400, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    fine = cntlora.solver.Moments(400.0, x.mean(0), x.T @ x / 400)
    w0 = torch.randn(m, 12, dtype=torch.float64)
    constraints = mode_constraints(cntlora.CNTLoRAConfig(mode=mode))
    pretrain = pretrain_moments("weights", fine, w0) if mode != "self" else None
    system = normal_equations(fine, pretrain, constraints, 1e-2)
    delta = solve_delta(w0, fine, pretrain, constraints, 1e-2)
    products = system.products(w0)
    assert products.shape == (m, 12)
    xs, ys = torch.randn(12, 5, dtype=torch.float64), torch.randn(m, 5, dtype=torch.float64)
    torch.testing.assert_close(products.matmul(xs), delta @ xs, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(products.rmatmul(ys), delta.T @ ys, rtol=1e-9, atol=1e-10)


def _formed_delta(model, stats, name, config):
    from cntlora.solver import pretrain_moments

    w0 = dict(model.named_modules())[name].weight.detach().double()
    fine = stats.moments(name)
    pretrain = pretrain_moments("weights", fine, w0) if config.mode != "self" else None
    return solve_delta(w0, fine, pretrain, mode_constraints(config), config.ridge)


@pytest.fixture
def implicit_on_cpu(monkeypatch):
    """Every randomized CPU layer takes the implicit path, however small."""
    import cntlora.plan

    monkeypatch.setattr(cntlora.plan, "IMPLICIT_ABOVE_ON_CPU", 0)


@pytest.mark.parametrize("mode", ["self", "cross"])
def test_implicit_plan_captures_what_the_exact_one_does(mode, implicit_on_cpu):
    # A random model's ΔW has a flat spectrum, where the leading directions are nearly
    # interchangeable; what must match is the energy the kept subspace captures.
    model, stats = _llama_stats()
    exact = cntlora.solve(model, stats, cntlora.CNTLoRAConfig(mode=mode, r=4, advanced=cntlora.AdvancedConfig(randomized_svd_above=10_000)))
    implicit = cntlora.solve(model, stats, cntlora.CNTLoRAConfig(mode=mode, r=4, advanced=cntlora.AdvancedConfig(randomized_svd_above=0)))
    for name, lp in exact.layers.items():
        ip = implicit.layers[name]
        assert lp.delta_energy > 0 and ip.delta_energy is None
        torch.testing.assert_close(ip.singular_values, lp.singular_values, rtol=2e-3, atol=1e-9)
        delta = _formed_delta(model, stats, name, exact.config)
        best = float(lp.singular_values[:4].pow(2).sum())
        rows = ip.A.double() / ip.A.double().norm(dim=1, keepdim=True)  # subspace base: A = V_rᵀ · row norm
        assert float((delta @ rows.T).pow(2).sum()) > (1 - 1e-3) * best
        torch.testing.assert_close(rows @ rows.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-6)
        assert not ip.B.any()
    assert "–" in implicit.summary() and "nan" not in implicit.summary()
    again = cntlora.solve(model, stats, cntlora.CNTLoRAConfig(mode=mode, r=4, advanced=cntlora.AdvancedConfig(randomized_svd_above=0)))
    assert all(torch.equal(again.layers[n].A, implicit.layers[n].A) for n in implicit.layers)


def test_implicit_plan_is_near_the_best_rank_r_update_with_base_keep(implicit_on_cpu):
    model, stats = _llama_stats(seed=1)
    cfg = dict(mode="self", r=3, base="keep", strength=None)
    exact = cntlora.solve(model, stats, cntlora.CNTLoRAConfig(**cfg, advanced=cntlora.AdvancedConfig(randomized_svd_above=10_000)))
    implicit = cntlora.solve(model, stats, cntlora.CNTLoRAConfig(**cfg, advanced=cntlora.AdvancedConfig(randomized_svd_above=0)))
    for name, lp in exact.layers.items():
        delta = _formed_delta(model, stats, name, exact.config)
        residual = lambda p: float((delta - exact.scale * p.B.double() @ p.A.double()).pow(2).sum())  # noqa: E731
        assert residual(implicit.layers[name]) < residual(lp) + 1e-3 * float(delta.pow(2).sum())


def test_vas_with_the_energy_score_forms_delta_and_the_weight_score_does_not(implicit_on_cpu):
    model, stats = _llama_stats()
    by_energy = cntlora.solve(model, stats, cntlora.CNTLoRAConfig(r=4, vas=True, advanced=cntlora.AdvancedConfig(randomized_svd_above=0)))
    assert all(lp.delta_energy is not None for lp in by_energy.layers.values())
    by_weight = cntlora.solve(model, stats, cntlora.CNTLoRAConfig(r=4, vas=True, advanced=cntlora.AdvancedConfig(vas_score="weight", randomized_svd_above=0)))
    assert all(lp.delta_energy is None for lp in by_weight.layers.values())
    assert by_weight.params <= by_weight.budget


def test_energy_score_without_energy_is_a_clear_error():
    from cntlora.decompose import Spectrum, component_scores

    sp = Spectrum(torch.eye(3, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                  torch.eye(4, 2, dtype=torch.float64), None)
    with pytest.raises(cntlora.CNTLoRAError, match="energy"):
        component_scores(sp, 1.0, "energy")
    torch.testing.assert_close(component_scores(sp, 2.0, "weight"), torch.full((2,), 0.25, dtype=torch.float64))


def test_a_result_cut_short_keeps_the_medians_of_the_runs_it_finished(tmp_path):
    out = tmp_path / "cost-tiny-cpu.json"
    measure.benchmark(_args(tmp_path, repeats=2, methods=["floor", "cntlora-self", "default"]))
    full = json.loads(out.read_text())
    # what the file held mid-run: raw runs, the last method one run short
    partial = json.loads(out.read_text())
    for method, entry in partial["methods"].items():
        entry.clear()
        entry.update({"runs": full["methods"][method]["runs"][: 1 if method == "default" else 2], "complete": False})
    out.write_text(json.dumps(partial))
    measure.finish_partial(str(out))
    done = json.loads(out.read_text())
    assert done["cut_short"]
    assert done["methods"]["default"]["repeats"] == 1 and done["methods"]["cntlora-self"]["repeats"] == 2
    assert done["methods"]["floor"]["median_seconds"] == full["methods"]["floor"]["median_seconds"]
    rows = cost_report.summarize([str(out)])["runs"]
    assert {r["method"]: r["repeats"] for r in rows} == {"floor": 2, "cntlora-self": 2, "default": 1}


def test_wide_sums_keep_only_the_upper_block_triangle(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 50), nn.ReLU(), nn.Linear(50, 7))
    batches = [torch.randn(3, 5, 40) for _ in range(3)]
    plain = cntlora.collect_statistics(model, batches, ["0", "2"], progress=False)
    monkeypatch.setattr(statistics, "BLOCKED_GRAM_FROM", 10)
    packed = cntlora.collect_statistics(model, batches, ["0", "2"], progress=False)
    wide = packed.fine["2"]
    assert [tuple(r.shape) for r in wide.rows] == [(12, 50), (13, 38), (13, 25), (12, 12)]
    assert sum(r.numel() for r in wide.rows) == 12 * 50 + 13 * 38 + 13 * 25 + 12 * 12 < 50 * 50
    assert packed.nbytes() < plain.nbytes()
    full = wide.outer
    assert torch.equal(full, full.T)
    torch.testing.assert_close(full, plain.fine["2"].outer, rtol=1e-6, atol=1e-5)
    # saved as the plain full matrix, loaded back into the same blocks (any blocking constant)
    packed.save(tmp_path / "s.safetensors")
    monkeypatch.setattr(statistics, "BLOCKED_GRAM_FROM", 4096)
    loaded = cntlora.Statistics.load(tmp_path / "s.safetensors")
    assert torch.equal(loaded.fine["2"].outer, full)
    moments = wide.moments()
    torch.testing.assert_close(moments.second, full / float(wide.count))
    # a capped collection plans its passes by the packed size: both inputs fit in one pass here
    monkeypatch.setattr(statistics, "BLOCKED_GRAM_FROM", 10)
    need = 8 * (sum(r.numel() for s in packed.fine.values() for r in s.rows) + 40 + 50 + 2)
    capped = cntlora.collect_statistics(model, batches, ["0", "2"], progress=False, max_stats_memory=need)
    assert capped.info["fine"]["passes"] == 1


def test_batched_ritz_step_equals_the_per_layer_one():
    torch.manual_seed(3)
    deltas = [torch.randn(30, 6, dtype=torch.float64) @ torch.randn(6, 20, dtype=torch.float64) for _ in range(3)]
    ranges = [randomized_range(DenseProducts(d), 4, seed=0) for d in deltas]
    u, s, v = ritz_triplets(torch.stack([r[0] for r in ranges]), torch.stack([r[1] for r in ranges]), 4)
    for i, d in enumerate(deltas):
        one_u, one_s, one_v = ritz_triplets(*ranges[i], 4)
        torch.testing.assert_close(s[i], one_s)
        torch.testing.assert_close((u[i] * s[i]) @ v[i].T, (one_u * one_s) @ one_v.T)
        exact = torch.linalg.svdvals(d)[:4]
        torch.testing.assert_close(s[i], exact, rtol=1e-10, atol=1e-10)


def test_phase_clock_adds_up_the_spans_of_each_phase():
    clock = PhaseClock(torch.device("cpu"))
    clock.mark("solve")
    clock.mark("decompose")
    clock.mark("solve")
    totals = clock.totals()
    assert set(totals) == {"solve", "decompose"}
    assert all(t >= 0 for t in totals.values())
    assert len([p for p, _, _ in clock.spans if p == "solve"]) == 2


def test_cpu_layers_above_the_threshold_use_the_randomized_svd_on_a_formed_delta(monkeypatch):
    import cntlora.plan

    calls = []
    real = cntlora.plan.randomized_range
    monkeypatch.setattr(cntlora.plan, "randomized_range", lambda op, *a, **k: calls.append(op) or real(op, *a, **k))
    model, stats = _llama_stats()
    plan = cntlora.solve(model, stats, cntlora.CNTLoRAConfig(r=4, advanced=cntlora.AdvancedConfig(randomized_svd_above=0)))
    assert len(calls) == len(stats.layers)
    assert all(isinstance(op, DenseProducts) for op in calls)  # small CPU layers form ΔW: ||ΔW||² stays known
    assert all(lp.delta_energy is not None and lp.delta_energy > 0 for lp in plan.layers.values())
    assert cntlora.CNTLoRAConfig().advanced.randomized_svd_above is None and cntlora.plan.RANDOMIZED_SVD_ABOVE == 256
