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
