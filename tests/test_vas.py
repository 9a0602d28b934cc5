"""VAS: greedy rank allocation under a parameter budget, and what it gives PEFT."""

import random
import re

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

import cntlora
from cntlora import CNTLoRAConfig, CNTLoRAError
from cntlora.decompose import allocate_ranks, component_scores, top_singular
from cntlora.export import load_adapter, save_adapter


pytestmark = pytest.mark.usefixtures("one_thread")


def random_problem(seed):
    """Scores of random low-rank-ish ΔW of random shapes, as solve() builds them."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    r_max = rnd.randint(1, 8)
    r_min = rnd.randint(0, min(2, r_max))
    score = "energy" if seed % 2 == 0 else "weight"
    scores, costs, sizes = {}, {}, {}
    for i in range(rnd.randint(2, 7)):
        m, n = rnd.randint(1, 40), rnd.randint(1, 40)
        k = rnd.randint(1, min(m, n))
        decay = torch.logspace(0, -rnd.uniform(0, 3), k, dtype=torch.float64)
        delta = (torch.randn(m, k, generator=g, dtype=torch.float64) * decay) @ torch.randn(
            k, n, generator=g, dtype=torch.float64
        )
        w0_norm = rnd.uniform(0.5, 50.0)
        scores[f"layer{i}"] = component_scores(top_singular(delta, r_max), w0_norm, score)
        costs[f"layer{i}"] = m + n
        sizes[f"layer{i}"] = min(m, n)
    floor = sum(min(r_min, scores[n].numel()) * costs[n] for n in scores)
    ceiling = sum(scores[n].numel() * costs[n] for n in scores)
    budget = floor + rnd.randint(0, ceiling - floor)
    return scores, costs, sizes, budget, r_min, r_max


def test_allocation_on_random_spectra():
    swaps_checked = 0
    for seed in range(60):
        scores, costs, sizes, budget, r_min, r_max = random_problem(seed)
        ranks = allocate_ranks(scores, costs, budget, r_min, r_max)
        assert set(ranks) == set(scores)
        spent = sum(ranks[n] * costs[n] for n in ranks)
        assert spent <= budget, (seed, spent, budget)
        low = {n: min(r_min, scores[n].numel()) for n in ranks}
        high = {n: min(r_max, scores[n].numel()) for n in ranks}
        for n, r in ranks.items():
            assert low[n] <= r <= high[n] and r <= sizes[n] and r <= r_max, (seed, n, r)
        for b in ranks:
            if ranks[b] < high[b]:
                # nothing untaken still fits: the greedy pass only stops at the budget
                assert spent + costs[b] > budget, (seed, b)
        for a in ranks:  # drop a's last taken component ...
            if ranks[a] <= low[a]:
                continue
            dropped = float(scores[a][ranks[a] - 1])
            for b in ranks:  # ... and take b's next untaken one
                if b == a or ranks[b] >= high[b] or spent - costs[a] + costs[b] > budget:
                    continue
                swaps_checked += 1
                added = float(scores[b][ranks[b]])
                assert added <= dropped + 1e-12, f"seed {seed}: swapping {a}->{b} raises the score by {added - dropped}"
    assert swaps_checked > 50, "too few feasible swaps to make the check meaningful"


def test_r_min_over_budget_is_an_error():
    scores = {"a": torch.tensor([0.9, 0.1]), "b": torch.tensor([0.6, 0.4])}
    with pytest.raises(CNTLoRAError, match="lower r_min"):
        allocate_ranks(scores, {"a": 10, "b": 10}, budget=30, r_min=2, r_max=2)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 24)
        self.fc3 = nn.Linear(24, 12)
        self.fc4 = nn.Linear(12, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        for layer in (self.fc1, self.fc2, self.fc3, self.fc4):
            x = torch.tanh(layer(x))
        return self.out(x)


TARGETS = ["fc1", "fc2", "fc3", "fc4"]


def mlp():
    torch.manual_seed(0)
    return MLP().eval()


def data():
    g = torch.Generator().manual_seed(1)
    scales = torch.logspace(0.5, -1.5, 16)  # anisotropic inputs, so the layers' spectra differ
    return [torch.randn(32, 16, generator=g) * scales for _ in range(3)]


def layer_costs():
    return {n: getattr(mlp(), n).in_features + getattr(mlp(), n).out_features for n in TARGETS}


def lora_ranks(model):
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    return {n: m.r["default"] for n, m in layers.items()}


def vas_model(use_rslora=False, budget=None):
    costs = layer_costs()
    # Below the sum of all layers' costs, at least one layer must get rank 0.
    budget = budget or 2 * max(costs.values())
    assert budget < sum(costs.values())
    cfg = CNTLoRAConfig(r=2, alpha=4.0, base="keep", vas=True, budget=budget, use_rslora=use_rslora, seed=0)
    return cntlora.initialize(mlp(), data(), cfg, target_modules=TARGETS, progress=False)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_vas_through_solve_gives_peft_the_planned_ranks(use_rslora, tmp_path):
    model = vas_model(use_rslora)
    plan = model.cntlora_plan
    assert plan.params <= plan.budget
    idle = [n for n, lp in plan.layers.items() if lp.rank == 0]
    assert idle and plan.adapted
    assert plan.rank_pattern, "all adapted layers got rank r; the patterns would go untested"
    planned = {n: plan.layers[n].rank for n in plan.adapted}

    assert lora_ranks(model) == planned
    modules = dict(model.base_model.model.named_modules())
    for name in idle:  # a rank-0 layer gets no adapter at all
        assert not isinstance(modules[name], LoraLayer) and isinstance(modules[name], nn.Linear)
    for name in plan.adapted:  # rank_pattern + alpha_pattern keep s identical everywhere
        assert modules[name].scaling["default"] == pytest.approx(plan.scale, rel=1e-12)
    expected = CNTLoRAConfig(r=2, alpha=4.0, use_rslora=use_rslora).scale
    assert plan.scale == pytest.approx(expected)

    x = torch.cat(data())
    with torch.no_grad():
        reference = model(x)
    save_adapter(model, tmp_path / "cntlora")
    model.save_pretrained(tmp_path / "peft")
    for reloaded in (load_adapter(mlp(), tmp_path / "cntlora"), PeftModel.from_pretrained(mlp(), tmp_path / "peft")):
        assert lora_ranks(reloaded) == planned
        for name, layer in reloaded.base_model.model.named_modules():
            if isinstance(layer, LoraLayer):
                assert layer.scaling["default"] == pytest.approx(plan.scale, rel=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x), reference, atol=1e-6, rtol=0)
    again = load_adapter(mlp(), tmp_path / "cntlora").cntlora_plan
    assert {n: lp.rank for n, lp in again.layers.items()} == {n: lp.rank for n, lp in plan.layers.items()}


def test_summary_totals_match_parameters():
    model = vas_model()
    plan = model.cntlora_plan
    lines = plan.summary().splitlines()
    assert len(lines) == len(plan.layers) + 2  # header, one row per layer, totals
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert sorted(rows) == sorted(plan.layers)
    for name, cols in rows.items():
        spec = plan.layers[name].spec
        assert cols[1] == f"{spec.out_features}x{spec.in_features}"
        assert int(cols[2]) == plan.layers[name].rank
    table_total = sum(int(cols[-1].replace(",", "")) for cols in rows.values())
    lora_total = sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    assert table_total == plan.params == lora_total
    total = lines[-1]
    assert f"{plan.params:,} parameters" in total and f"(budget {plan.budget:,})" in total
    assert f"{len(plan.adapted)}/{len(plan.layers)} layers adapted" in total


def test_default_budget_is_uniform_rank_r():
    cfg = CNTLoRAConfig(r=2, vas=True)
    stats = cntlora.collect_statistics(mlp(), data(), TARGETS, progress=False)
    plan = cntlora.solve(mlp(), stats, cfg)
    assert plan.budget == sum(2 * c for c in layer_costs().values())
    assert plan.params <= plan.budget
    assert all(0 <= lp.rank <= cfg.max_rank == 4 for lp in plan.layers.values())


def test_nested_names_get_their_own_ranks():
    """PEFT matches names as suffixes: a top-level '0' must not also claim the nested '2.0'."""
    def sequential():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 2))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g) * torch.linspace(3, 0.1, 8)
    for budget in (3 * 16, 4 * 16):  # ranks {'0': 1, '2.0': 2} and {'0': 1, '2.0': 3}
        cfg = CNTLoRAConfig(r=2, vas=True, base="keep", budget=budget)
        stats = cntlora.collect_statistics(sequential(), [x], re.escape("0") + "|" + re.escape("2.0"), progress=False)
        plan = cntlora.solve(sequential(), stats, cfg)
        model = cntlora.apply(sequential(), plan)
        assert lora_ranks(model) == {n: plan.layers[n].rank for n in plan.adapted}
    # without VAS too: only the targeted '0' and '3' may get an adapter, not the nested '2.0'
    model = cntlora.initialize(sequential(), [x], CNTLoRAConfig(r=2), target_modules="0|3", progress=False)
    assert sorted(lora_ranks(model)) == ["0", "3"]


# ---- the "shift" score: VAS ranks by how far each layer's inputs moved from pre-training ----

def _shift_brute_force(c_f, c_p, k, ridge=1e-4):
    """scipy's generalized symmetric eigensolver on the unit-trace moments."""
    import numpy as np
    import scipy.linalg

    f = (c_f / torch.trace(c_f)).numpy()
    p = (c_p / torch.trace(c_p)).numpy()
    values = scipy.linalg.eigh(f, p + ridge / len(p) * np.eye(len(p)), eigvals_only=True)
    return float(np.sort(values)[-k:].mean())


def test_input_shift_matches_brute_force_and_ignores_scale():
    from cntlora.decompose import input_shift

    g = torch.Generator().manual_seed(0)
    for n, k in ((5, 1), (12, 3), (30, 8)):
        x_f = torch.randn(200, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, n, dtype=torch.float64)
        x_p = torch.randn(300, n, generator=g, dtype=torch.float64) * torch.linspace(3.0, 0.1, n, dtype=torch.float64)
        c_f, c_p = x_f.T @ x_f / 200, x_p.T @ x_p / 300
        value = input_shift(c_f, c_p, k)
        assert value == pytest.approx(_shift_brute_force(c_f, c_p, k), rel=1e-8)
        assert value > 2  # the fine-tuning energy sits where pre-training had little
        assert input_shift(7 * c_f, 0.01 * c_p, k) == pytest.approx(value, rel=1e-10)
        # one distribution against itself: every generalized eigenvalue is just under 1
        assert input_shift(c_p, c_p, k) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("bad, match", [
    (dict(fine=torch.eye(3), pretrain=torch.eye(4), k=1), "n×n"),
    (dict(fine=torch.eye(3), pretrain=torch.eye(3), k=4), "k <= n"),
    (dict(fine=torch.zeros(3, 3), pretrain=torch.eye(3), k=1), "positive trace"),
    (dict(fine=torch.eye(3), pretrain=torch.full((3, 3), float("nan")), k=1), "positive trace"),
])
def test_input_shift_refuses_bad_moments(bad, match):
    from cntlora.decompose import input_shift

    with pytest.raises(CNTLoRAError, match=match):
        input_shift(**bad)


def _shifted_mlp():
    from helpers import TwoLayerMLP, capture_inputs, feature_batches

    model = TwoLayerMLP()
    fine, ref = feature_batches(seed=2, shift=0.7), feature_batches(seed=3, shift=-0.2)
    stats = cntlora.collect_statistics(model, fine, ["fc1", "fc2"], reference_dataloader=ref, progress=False)
    return model, stats, capture_inputs(model, ["fc1", "fc2"], fine), capture_inputs(model, ["fc1", "fc2"], ref)


def test_shift_score_ranks_layers_by_energy_share_times_input_shift():
    """The plan's ranks are the greedy allocation of σ²/||ΔW||² × the brute-force shift of raw inputs."""
    from cntlora import AdvancedConfig

    model, stats, raw_f, raw_p = _shifted_mlp()
    budget, r = 60, 2
    plans = {score: cntlora.solve(model, stats, CNTLoRAConfig(r=r, vas=True, budget=budget, pretrain_source="reference",
                                                              advanced=AdvancedConfig(vas_score=score)))
             for score in ("energy", "shift")}
    energy, shifted = plans["energy"], plans["shift"]
    brute = {}
    for name in ("fc1", "fc2"):
        x_f, x_p = raw_f[name].double(), raw_p[name].double()
        brute[name] = _shift_brute_force(x_f.T @ x_f / len(x_f), x_p.T @ x_p / len(x_p), r)
        assert shifted.layers[name].input_shift == pytest.approx(brute[name], rel=1e-6)
        assert energy.layers[name].input_shift is None
    lp = energy.layers  # Self's ΔW is the same under both scores: only the ranks may move
    scores = {n: lp[n].singular_values.double() ** 2 / lp[n].delta_energy * brute[n] for n in lp}
    costs = {n: lp[n].spec.out_features + lp[n].spec.in_features for n in lp}
    expected = allocate_ranks(scores, costs, budget, 0, 2 * r)
    assert {n: shifted.layers[n].rank for n in lp} == expected
    assert expected != {n: lp[n].rank for n in lp}  # the case tells the two scores apart
    assert "shift" in shifted.summary().splitlines()[0] and "shift" not in energy.summary().splitlines()[0]


def test_shift_score_shares_an_inputs_value_and_needs_pre_training_statistics(tmp_path):
    from cntlora import AdvancedConfig
    from helpers import tiny_llama, token_batches

    model = tiny_llama()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    batches, ref = token_batches(seed=1), token_batches(seed=5)
    stats = cntlora.collect_statistics(model, batches, targets, reference_dataloader=ref, progress=False)
    adv = AdvancedConfig(vas_score="shift")
    plan = cntlora.solve(model, stats, CNTLoRAConfig(r=2, vas=True, advanced=adv))  # the reference set, by default
    assert plan.pretrain_source == "reference"
    for block in ("model.layers.0", "model.layers.1"):
        qkv = {plan.layers[f"{block}.self_attn.{p}"].input_shift for p in ("q_proj", "k_proj", "v_proj")}
        assert len(qkv) == 1 and next(iter(qkv)) > 1  # one input, one shift
    proxy = cntlora.solve(model, stats, CNTLoRAConfig(r=2, vas=True, pretrain_source="weights", advanced=adv))
    q, k = (proxy.layers[f"model.layers.0.self_attn.{p}"].input_shift for p in ("q_proj", "k_proj"))
    assert q != k  # the weight proxy's C_p comes from each layer's own W0
    bare = cntlora.collect_statistics(model, batches, targets, progress=False)
    with pytest.raises(CNTLoRAError, match="reference_dataloader"):
        cntlora.solve(model, bare, CNTLoRAConfig(r=2, vas=True, pretrain_source="reference", advanced=adv))
    # saved and loaded with the adapter
    peft_model = cntlora.initialize(tiny_llama(), batches, CNTLoRAConfig(r=2, vas=True, advanced=adv),
                                    target_modules=targets, reference_dataloader=ref, progress=False)
    save_adapter(peft_model, tmp_path / "a")
    again = load_adapter(tiny_llama(), tmp_path / "a").cntlora_plan
    assert {n: lp.input_shift for n, lp in again.layers.items()} == {
        n: lp.input_shift for n, lp in peft_model.cntlora_plan.layers.items()}
