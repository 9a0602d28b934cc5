"""Every closed form of docs/method.md against a brute-force least-squares solve."""

import pytest
import torch

import cntlora
from cntlora.config import AdvancedConfig, CNTLoRAConfig
from cntlora.layers import weight_matrix
from cntlora.solver import (Moments, alignment_matrix, mode_constraints, normal_equations, pretrain_moments,
                            reproduce_frozen, solve_delta, vanish)

from helpers import TwoLayerMLP, capture_inputs, feature_batches

RIDGE = 1e-2


def brute_force(w0, x_f, x_p, mode, gamma, ridge, alignment="diag", floor="trace"):
    """Stack sqrt(w_k/N_k)·x rows per constraint plus sqrt(λ)·I rows, and lstsq for ΔWᵀ."""
    rows, targets = stacked_system(w0, x_f, x_p, mode, gamma, ridge, alignment, floor)
    return torch.linalg.lstsq(rows, targets, driver="gelsd").solution.T


def stacked_system(w0, x_f, x_p, mode, gamma, ridge, alignment="diag", floor="trace"):
    """(Z, T) with the constraints' objective J(ΔW) = ||Z·ΔWᵀ − T||_F², from raw activations.
    floor: Shift's eigenvalue floor, λ ("trace") or ridge times the largest eigenvalue of C_f ("max")."""
    w0 = w0.double()
    n = w0.shape[1]
    mu_f = x_f.mean(0)
    c_f = x_f.T @ x_f / len(x_f)
    if mode == "self":
        cons = [(x_f, 1.0, "frozen")]
    elif mode == "cross":
        cons = [(x_f, 1.0, "frozen"), (x_p, gamma, "zero")]
    else:
        cons = [(x_f, 1.0, "shift")]
    gram = sum(w * (x.T @ x / len(x)) for x, w, _ in cons)
    lam = ridge * torch.trace(gram) / n
    rows, targets = [], []
    for x, w, kind in cons:
        scale = (w / len(x)) ** 0.5
        if kind == "frozen":
            t = x @ w0.T
        elif kind == "zero":
            t = torch.zeros(len(x), w0.shape[0], dtype=x.dtype)
        else:
            mu_p = x_p.mean(0)
            s_f = c_f - torch.outer(mu_f, mu_f)
            c_p = x_p.T @ x_p / len(x_p)
            s_p = c_p - torch.outer(mu_p, mu_p)
            fl = lam if floor == "trace" else ridge * torch.linalg.eigvalsh(c_f)[-1]
            if alignment == "diag":
                a_s = torch.diag(torch.sqrt((torch.diagonal(s_p) + fl) / (torch.diagonal(s_f) + fl)))
            else:
                ep, vp = torch.linalg.eigh(s_p + fl * torch.eye(n, dtype=x.dtype))
                ef, vf = torch.linalg.eigh(s_f + fl * torch.eye(n, dtype=x.dtype))
                a_s = (vp * ep.sqrt()) @ vp.T @ (vf / ef.sqrt()) @ vf.T
            transformed = (x - mu_f) @ a_s.T + mu_p
            t = (transformed - x) @ w0.T
        rows.append(scale * x)
        targets.append(scale * t)
    rows.append(lam.sqrt() * torch.eye(n, dtype=w0.dtype))
    targets.append(torch.zeros(n, w0.shape[0], dtype=w0.dtype))
    return torch.cat(rows), torch.cat(targets)


def synthetic_pretrain(source, w0, x_f, x_ref):
    """Samples whose moments are those of each source; ± pairs give the proxies' mu_p = 0."""
    w0 = w0.double()
    m, n = w0.shape
    trace_f = torch.trace(x_f.T @ x_f / len(x_f))
    if source == "reference":
        return x_ref
    if source == "weights":
        kappa = trace_f / (w0**2).sum()
        rows = (kappa * m).sqrt() * w0
    else:
        rows = trace_f.sqrt() * torch.eye(n, dtype=torch.float64)
    return torch.cat([rows, -rows])


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.fixture(scope="module")
def collected():
    model = TwoLayerMLP()
    fine = feature_batches(seed=2, shift=0.7)
    ref = feature_batches(seed=3, shift=-0.2)
    stats = cntlora.collect_statistics(model, fine, ["fc1", "fc2"], reference_dataloader=ref, progress=False)
    raw_f = capture_inputs(model, ["fc1", "fc2"], fine)
    raw_p = capture_inputs(model, ["fc1", "fc2"], ref)
    return model, stats, raw_f, raw_p


@pytest.mark.parametrize("source", ["reference", "weights", "isotropic"])
@pytest.mark.parametrize("mode", ["self", "cross", "shift"])
@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_closed_form_matches_brute_force(collected, mode, source, layer):
    model, stats, raw_f, raw_p = collected
    w0 = weight_matrix(dict(model.named_modules())[layer], stats.layers[layer]).detach()
    cfg = CNTLoRAConfig(mode=mode, gamma=0.7, pretrain_source=source, ridge=RIDGE)
    fine = stats.moments(layer)
    pre = pretrain_moments(source, fine, w0.double(), stats.moments(layer, "reference"))
    got = solve_delta(w0, fine, pre, mode_constraints(cfg), RIDGE)
    x_p = synthetic_pretrain(source, w0, raw_f[layer], raw_p[layer])
    want = brute_force(w0, raw_f[layer], x_p, mode, 0.7, RIDGE)
    assert rel(got, want) < 1e-5
    assert torch.linalg.norm(got) > 1e-3 * torch.linalg.norm(w0)  # not trivially zero


def test_full_shift_alignment_matches_brute_force(collected):
    model, stats, raw_f, raw_p = collected
    w0 = model.fc1.weight.detach()
    cfg = CNTLoRAConfig(mode="shift", ridge=RIDGE, advanced=AdvancedConfig(shift_alignment="full"))
    fine, ref = stats.moments("fc1"), stats.moments("fc1", "reference")
    got = solve_delta(w0, fine, ref, mode_constraints(cfg), RIDGE)
    want = brute_force(w0, raw_f["fc1"], raw_p["fc1"], "shift", 0, RIDGE, alignment="full")
    assert rel(got, want) < 1e-5


def test_full_alignment_maps_covariance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 5, generator=g, dtype=torch.float64), torch.randn(40, 5, generator=g, dtype=torch.float64) * 3
    mf = Moments(50, a.mean(0), a.T @ a / 50)
    mp = Moments(40, b.mean(0), b.T @ b / 40)
    a_s = alignment_matrix(mf, mp, 0.1, "full")
    eye = torch.eye(5, dtype=torch.float64)
    assert torch.allclose(a_s @ (mf.covariance + 0.1 * eye) @ a_s.T, mp.covariance + 0.1 * eye, atol=1e-10)


def test_modes_are_built_from_public_constraints(collected):
    """A user-supplied list equal to the Cross preset gives the identical update."""
    model, stats, _, _ = collected
    w0 = model.fc2.weight.detach()
    fine = stats.moments("fc2")
    pre = pretrain_moments("weights", fine, w0.double())
    preset = solve_delta(w0, fine, pre, mode_constraints(CNTLoRAConfig(mode="cross", gamma=0.5)), RIDGE)
    custom = [cntlora.reproduce_frozen("fine"), cntlora.vanish("pretrain", 0.5)]
    user = solve_delta(w0, fine, pre, mode_constraints(CNTLoRAConfig(constraints=custom)), RIDGE)
    assert torch.equal(preset, user)
    # and a genuinely custom constraint (target: W0·(0.5·x)) goes through the same engine
    half = cntlora.Constraint("fine", 1.0, lambda ctx: (0.5, None))
    got = solve_delta(w0, fine, None, [half], RIDGE)
    self_delta = solve_delta(w0, fine, None, mode_constraints(CNTLoRAConfig(mode="self")), RIDGE)
    assert rel(got, 0.5 * self_delta) < 1e-12


def test_plan_factors_reproduce_delta(collected):
    """At full rank with no cap, s·B·A is exactly ΔW (keep mode)."""
    model, stats, _, _ = collected
    cfg = CNTLoRAConfig(mode="cross", r=6, alpha=3.0, base="keep", strength=None, ridge=RIDGE)
    plan = cntlora.solve(model, stats, cfg)
    w0 = model.fc2.weight.detach()
    fine = stats.moments("fc2")
    pre = pretrain_moments("reference", fine, w0.double(), stats.moments("fc2", "reference"))
    delta = solve_delta(w0, fine, pre, mode_constraints(cfg), RIDGE)
    lp = plan.layers["fc2"]
    assert rel(plan.scale * lp.B.double() @ lp.A.double(), delta) < 1e-5


def test_strength_cap_bounds_update(collected):
    model, stats, _, _ = collected
    plan = cntlora.solve(model, stats, CNTLoRAConfig(mode="shift", r=4, base="keep", strength=0.01))
    for lp in plan.layers.values():
        update = plan.scale * lp.B.double() @ lp.A.double()
        assert float(torch.linalg.norm(update)) <= 0.01 * lp.w0_norm * (1 + 1e-5)
        assert lp.cap < 1


def test_subspace_a_spans_top_directions(collected):
    model, stats, _, _ = collected
    keep = cntlora.solve(model, stats, CNTLoRAConfig(r=3, base="keep", strength=None))
    sub = cntlora.solve(model, stats, CNTLoRAConfig(r=3, base="subspace"))
    for name in keep.layers:
        a_keep, a_sub = keep.layers[name].A.double(), sub.layers[name].A.double()
        assert torch.count_nonzero(sub.layers[name].B) == 0
        # same row space, rows at LoRA's default norm 1/sqrt(3)
        q, _ = torch.linalg.qr(a_keep.T)
        assert torch.allclose(q @ (q.T @ a_sub.T), a_sub.T, atol=1e-5)
        assert torch.allclose(a_sub.norm(dim=1), torch.full((3,), 3**-0.5, dtype=torch.float64), atol=1e-6)


def test_engine_with_random_constraints_matches_brute_force(collected):
    """Arbitrary R_k (matrix and diagonal), q_k and weights on both distributions."""
    model, stats, raw_f, raw_p = collected
    w0 = model.fc1.weight.detach().double()
    n = w0.shape[1]
    g = torch.Generator().manual_seed(7)
    r1 = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    q1 = torch.randn(n, generator=g, dtype=torch.float64)
    r2 = torch.rand(n, generator=g, dtype=torch.float64)
    q2 = torch.randn(n, generator=g, dtype=torch.float64)
    cons = [cntlora.Constraint("fine", 0.8, lambda ctx: (r1, q1)),
            cntlora.Constraint("pretrain", 1.7, lambda ctx: (r2, q2)),
            cntlora.vanish("pretrain", 0.3)]
    got = solve_delta(w0, stats.moments("fc1"), stats.moments("fc1", "reference"), cons, RIDGE)

    x_f, x_p = raw_f["fc1"], raw_p["fc1"]
    gram = 0.8 * x_f.T @ x_f / len(x_f) + 2.0 * x_p.T @ x_p / len(x_p)
    lam = RIDGE * torch.trace(gram) / n
    rows = [(0.8 / len(x_f)) ** 0.5 * x_f, (1.7 / len(x_p)) ** 0.5 * x_p, (0.3 / len(x_p)) ** 0.5 * x_p,
            lam.sqrt() * torch.eye(n, dtype=torch.float64)]
    targets = [(0.8 / len(x_f)) ** 0.5 * (x_f @ r1.T + q1) @ w0.T,
               (1.7 / len(x_p)) ** 0.5 * (x_p * r2 + q2) @ w0.T,
               torch.zeros(len(x_p), w0.shape[0], dtype=torch.float64),
               torch.zeros(n, w0.shape[0], dtype=torch.float64)]
    want = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets), driver="gelsd").solution.T
    assert rel(got, want) < 1e-5


def test_diag_alignment_matches_variances_and_means():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(60, 4, generator=g, dtype=torch.float64) * 2 + 1
    b = torch.randn(30, 4, generator=g, dtype=torch.float64) * 0.5 - 1
    mf = Moments(60, a.mean(0), a.T @ a / 60)
    mp = Moments(30, b.mean(0), b.T @ b / 30)
    lam = 0.05
    a_s = alignment_matrix(mf, mp, lam, "diag")
    assert torch.allclose(a_s**2 * (torch.diagonal(mf.covariance) + lam), torch.diagonal(mp.covariance) + lam)
    transformed = (a - mf.mean) * a_s + mp.mean  # T applied to the fine-tuning samples
    assert torch.allclose(transformed.mean(0), mp.mean)


def test_a_row_norm_sets_subspace_scale(collected):
    model, stats, _, _ = collected
    plan = cntlora.solve(model, stats, CNTLoRAConfig(r=3, base="subspace", advanced=AdvancedConfig(a_row_norm=1.0)))
    for lp in plan.layers.values():
        assert torch.allclose(lp.A.double().norm(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-6)
    with pytest.raises(cntlora.CNTLoRAError, match="a_row_norm"):
        CNTLoRAConfig(advanced=AdvancedConfig(a_row_norm=0.0))


def test_a_singular_system_names_the_fix():
    from cntlora.solver import Moments, mode_constraints, normal_equations

    torch.manual_seed(0)
    x = torch.randn(40, 12, dtype=torch.float64)
    x[:, 8:] = 0  # four features never active: an exactly singular second moment
    fine = Moments(40.0, x.mean(0), x.T @ x / 40)
    with pytest.raises(cntlora.CNTLoRAError, match="raise ridge"):
        normal_equations(fine, None, mode_constraints(cntlora.CNTLoRAConfig(mode="self")), ridge=0.0)
    system = normal_equations(fine, None, mode_constraints(cntlora.CNTLoRAConfig(mode="self")), ridge=1e-2)
    gram = fine.second + 1e-2 * torch.trace(fine.second) / 12 * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(system.chol @ system.chol.T, gram)


def test_reproduce_only_systems_skip_the_rhs_product_and_agree_with_it():
    """Self (and any list of reproduce_frozen constraints) has rhs = gram − λI, so ΔW = W0 − λ·W0·gram⁻¹."""
    torch.manual_seed(5)
    x = torch.randn(300, 10, dtype=torch.float64) * torch.linspace(0.1, 3, 10, dtype=torch.float64)
    p = torch.randn(300, 10, dtype=torch.float64)
    fine = Moments(300.0, x.mean(0), x.T @ x / 300)
    pre = Moments(300.0, p.mean(0), p.T @ p / 300)
    w0 = torch.randn(4, 10, dtype=torch.float64)
    two = [reproduce_frozen("fine"), reproduce_frozen("pretrain", 0.5)]
    for constraints, pretrain in (([reproduce_frozen("fine")], None), (two, pre)):
        system = normal_equations(fine, pretrain, constraints, 1e-2)
        assert system.rhs_gap is not None
        gram = system.chol @ system.chol.T
        torch.testing.assert_close(system.rhs, gram - system.rhs_gap * torch.eye(10, dtype=torch.float64))
        slow = torch.linalg.solve(gram, (w0 @ system.rhs).T).T  # the general formula, for the test only
        torch.testing.assert_close(system.delta(w0), slow, rtol=1e-10, atol=1e-12)
    cross = normal_equations(fine, pre, [reproduce_frozen("fine"), vanish("pretrain", 1.0)], 1e-2)
    assert cross.rhs_gap is None


def _generalized_brute_force(numerator, gram, k):
    """Top-k of numerator·w = ρ·gram·w by symmetric whitening (gram^-1/2 from eigh, not Cholesky)."""
    e, v = torch.linalg.eigh(gram)
    whiten = (v / e.sqrt()) @ v.T
    rho, u = torch.linalg.eigh(whiten @ numerator @ whiten)
    w = whiten @ u.flip(1)[:, :k]
    assert torch.allclose(numerator @ w, gram @ w * rho.flip(0)[:k], atol=1e-9 * float(gram.abs().max()))
    return rho.flip(0)[:k], w


def _same_span(a, b):
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    return float(torch.linalg.norm(qa @ qa.T - qb @ qb.T))


@pytest.mark.parametrize("mode", ["self", "cross"])
@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_generalized_directions_match_brute_force(collected, mode, layer):
    """A's rows span the top generalized eigenvectors of C_f·w = ρ·(Σ w_k C_k + λI)·w, from raw activations."""
    model, stats, raw_f, raw_p = collected
    k, gamma = 3, 0.7
    cfg = CNTLoRAConfig(mode=mode, r=k, gamma=gamma, pretrain_source="reference", ridge=RIDGE, advanced=AdvancedConfig(directions="generalized"))
    plan = cntlora.solve(model, stats, cfg)
    x_f, x_p = raw_f[layer].double(), raw_p[layer].double()
    c_f = x_f.T @ x_f / len(x_f)
    gram = c_f + (gamma * x_p.T @ x_p / len(x_p) if mode == "cross" else 0)
    gram = gram + RIDGE * torch.trace(gram) / len(gram) * torch.eye(len(gram), dtype=torch.float64)
    rho, w = _generalized_brute_force(c_f, gram, k)
    lp = plan.layers[layer]
    assert _same_span(lp.A.double().T, w) < 1e-5
    assert torch.allclose(lp.singular_values.double(), rho, rtol=1e-6) and float(rho[0]) < 1  # ρ in [0, 1)
    assert torch.count_nonzero(lp.B) == 0
    assert torch.allclose(lp.A.double() @ lp.A.double().T, torch.eye(k, dtype=torch.float64) / 3, atol=1e-6)


def test_generalized_directions_for_each_rank_nest_and_do_not_need_w0(collected):
    from cntlora.decompose import generalized_directions

    torch.manual_seed(0)
    x = torch.randn(200, 6, dtype=torch.float64) * torch.tensor([3.0, 2, 1, 1, 0.5, 0.1], dtype=torch.float64)
    c_f = x.T @ x / 200
    gram = c_f + 0.5 * torch.eye(6, dtype=torch.float64)
    rho4, q4 = generalized_directions(c_f, torch.linalg.cholesky(gram), 4)
    rho2, q2 = generalized_directions(c_f, torch.linalg.cholesky(gram), 2)
    assert torch.allclose(rho4[:2], rho2) and _same_span(q4[:, :2], q2) < 1e-10  # the first 2 of 4 are the 2
    assert torch.allclose(q4.T @ q4, torch.eye(4, dtype=torch.float64), atol=1e-12)
    with pytest.raises(cntlora.CNTLoRAError, match="symmetric"):
        generalized_directions(c_f + torch.triu(torch.ones(6, 6, dtype=torch.float64), 1), torch.linalg.cholesky(gram), 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(base="residual"), "base='subspace'"),
    (dict(vas=True), "vas=False"),
    (dict(mode="shift"), "Self or Cross"),
    (dict(directions="sideways"), "unknown directions"),
])
def test_generalized_directions_refuse_what_they_cannot_do(kwargs, match):
    with pytest.raises(cntlora.CNTLoRAError, match=match):
        CNTLoRAConfig.from_dict({"directions": "generalized", **kwargs})


@pytest.mark.parametrize("mode", ["self", "cross", "shift"])
@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_objective_truncation_is_the_rank_k_minimizer_of_the_constraints(collected, mode, layer):
    """s·B·A under truncation='objective' is the rank-k minimizer of ||Z·Xᵀ − T||² built from raw
    activations (reduced-rank regression: project ΔW onto the top-k output directions of the fitted
    values Z·ΔWᵀ), and it beats the Frobenius truncation on that objective."""
    model, stats, raw_f, raw_p = collected
    k = 2
    w0 = weight_matrix(dict(model.named_modules())[layer], stats.layers[layer]).detach()
    x_p = raw_p[layer].double()
    z, t = stacked_system(w0, raw_f[layer].double(), x_p, mode, 0.7, RIDGE)
    delta = torch.linalg.lstsq(z, t, driver="gelsd").solution.T
    _, _, vh = torch.linalg.svd(z @ delta.T, full_matrices=False)
    want = vh[:k].T @ vh[:k] @ delta  # m × n: P_k·ΔW, P_k on the top-k right singular vectors of Z·ΔWᵀ

    def objective(x):
        return float(torch.linalg.norm(z @ x.T - t) ** 2)

    common = dict(mode=mode, r=k, alpha=float(k), gamma=0.7, pretrain_source="reference", ridge=RIDGE, base="keep",
                  strength=None)
    plans = {trunc: cntlora.solve(model, stats, CNTLoRAConfig(**common, advanced=AdvancedConfig(truncation=trunc)))
             for trunc in ("objective", "frobenius")}
    got = {trunc: p.scale * p.layers[layer].B.double() @ p.layers[layer].A.double() for trunc, p in plans.items()}
    assert rel(got["objective"], want) < 1e-5
    assert objective(got["objective"]) < objective(got["frobenius"]) - 1e-6 * objective(delta)
    # the reported σ are those of the weighted ΔW, whose squares are what each component removes from J
    sigma = torch.linalg.svdvals(z @ delta.T)[:k]
    assert torch.allclose(plans["objective"].layers[layer].singular_values.double(), sigma, rtol=1e-6)


def test_objective_truncation_nests_and_keeps_unit_rows():
    from cntlora.decompose import lora_factors, objective_truncation

    g = torch.Generator().manual_seed(0)
    delta = torch.randn(7, 9, generator=g, dtype=torch.float64)
    x = torch.randn(50, 9, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 9, dtype=torch.float64)
    chol = torch.linalg.cholesky(x.T @ x / 50 + 0.01 * torch.eye(9, dtype=torch.float64))
    four, two = objective_truncation(delta, chol, 4), objective_truncation(delta, chol, 2)
    b4, a4, _ = lora_factors(four, 2, 1.0, "keep", 1.0, None)
    b2, a2, _ = lora_factors(two, 2, 1.0, "keep", 1.0, None)
    assert torch.allclose(b4 @ a4, b2 @ a2, atol=1e-10)  # the rank-2 part of the rank-4 answer is the rank-2 answer
    assert torch.allclose(four.u.T @ four.u, torch.eye(4, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(four.v.norm(dim=0), torch.ones(4, dtype=torch.float64))
    assert float(four.gains.sum()) <= four.energy * (1 + 1e-12) and bool((four.gains.diff() <= 1e-12).all())
    # subspace: A's rows are orthonormal (at the row norm) and span the rank-r update's rows
    _, a_sub, _ = lora_factors(four, 3, 1.0, "subspace", 1.0, None, a_row_norm=1.0)
    b3, a3, _ = lora_factors(four, 3, 1.0, "keep", 1.0, None)
    assert torch.allclose(a_sub @ a_sub.T, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert _same_span(a_sub.T, (b3 @ a3).T @ four.u[:, :3]) < 1e-8


def test_objective_truncation_with_vas_shares_the_objective(collected):
    model, stats, _, _ = collected
    plan = cntlora.solve(model, stats, CNTLoRAConfig(mode="cross", r=2, vas=True, pretrain_source="reference", advanced=AdvancedConfig(truncation="objective")))
    assert plan.params <= plan.budget and sum(lp.rank for lp in plan.layers.values()) > 0
    for lp in plan.layers.values():
        assert 0 < lp.energy_share <= 1 + 1e-9


def test_objective_truncation_refuses_generalized_directions():
    with pytest.raises(cntlora.CNTLoRAError, match="truncation='frobenius'"):
        CNTLoRAConfig(advanced=AdvancedConfig(directions="generalized", truncation="objective"))
    with pytest.raises(cntlora.CNTLoRAError, match="unknown truncation"):
        CNTLoRAConfig(advanced=AdvancedConfig(truncation="nuclear"))


@pytest.mark.parametrize("alignment", ["diag", "full"])
@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_shift_floor_relative_to_the_largest_eigenvalue_matches_brute_force(collected, alignment, layer):
    model, stats, raw_f, raw_p = collected
    w0 = weight_matrix(dict(model.named_modules())[layer], stats.layers[layer]).detach()
    fine = stats.moments(layer)
    pre = stats.moments(layer, "reference")
    got = {}
    for floor in ("trace", "max"):
        cfg = CNTLoRAConfig(mode="shift", ridge=RIDGE, advanced=AdvancedConfig(shift_alignment=alignment, shift_floor=floor))
        got[floor] = solve_delta(w0, fine, pre, mode_constraints(cfg), RIDGE)
        want = brute_force(w0, raw_f[layer], raw_p[layer], "shift", 0.0, RIDGE, alignment, floor)
        assert rel(got[floor], want) < 1e-5
    assert rel(got["max"], got["trace"]) > 1e-3  # the floor changes the update
    with pytest.raises(cntlora.CNTLoRAError, match="unknown shift_floor"):
        CNTLoRAConfig(advanced=AdvancedConfig(shift_floor="median"))
