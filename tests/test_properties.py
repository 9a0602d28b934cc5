"""Properties of the closed forms over random problems (hypothesis): the normal equations hold,
a common scale of the activations changes nothing, a permutation of the inputs permutes ΔW."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from cntlora.config import CNTLoRAConfig  # noqa: E402
from cntlora.solver import Moments, mode_constraints, solve_delta  # noqa: E402

from test_solver import stacked_system  # noqa: E402

MODES = ("self", "cross", "shift")


def moments(x):
    return Moments(float(len(x)), x.mean(0), x.T @ x / len(x))


@st.composite
def problems(draw, modes=MODES):
    seed = draw(st.integers(0, 2**31 - 1))
    n, m = draw(st.integers(2, 7)), draw(st.integers(1, 6))
    rows_f, rows_p = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    g = torch.Generator().manual_seed(seed)
    x_f = torch.randn(rows_f, n, generator=g, dtype=torch.float64) * draw(st.floats(0.1, 10)) + draw(st.floats(-2, 2))
    x_p = torch.randn(rows_p, n, generator=g, dtype=torch.float64) * draw(st.floats(0.1, 10))
    w0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    return dict(mode=draw(st.sampled_from(modes)), gamma=draw(st.floats(0.0, 5.0)), ridge=draw(st.floats(1e-3, 1.0)),
                x_f=x_f, x_p=x_p, w0=w0)


def delta(p, x_f=None, x_p=None, w0=None):
    x_f, x_p, w0 = (p["x_f"] if x_f is None else x_f), (p["x_p"] if x_p is None else x_p), (p["w0"] if w0 is None else w0)
    cfg = CNTLoRAConfig(mode=p["mode"], gamma=p["gamma"], ridge=p["ridge"], pretrain_source="reference")
    pre = moments(x_p) if p["mode"] != "self" else None
    return solve_delta(w0, moments(x_f), pre, mode_constraints(cfg), p["ridge"])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(problems())
def test_the_closed_form_satisfies_its_normal_equations(p):
    """At ΔW the gradient of the constraints' objective ||Z·ΔWᵀ − T||² vanishes."""
    z, t = stacked_system(p["w0"], p["x_f"], p["x_p"], p["mode"], p["gamma"], p["ridge"])
    d = delta(p)
    gradient = z.T @ (z @ d.T - t)
    assert float(gradient.norm()) <= 1e-7 * max(float((z.T @ t).norm()), float((z.T @ z).norm()), 1e-12)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(problems(modes=("self", "cross")), st.floats(1e-3, 1e3))
def test_a_common_scale_of_the_activations_changes_nothing(p, c):
    torch.testing.assert_close(delta(p, x_f=c * p["x_f"], x_p=c * p["x_p"]), delta(p), rtol=1e-6, atol=1e-9)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(problems(), st.integers(0, 2**31 - 1))
def test_permuting_the_inputs_permutes_the_columns(p, seed):
    perm = torch.randperm(p["x_f"].shape[1], generator=torch.Generator().manual_seed(seed))
    moved = delta(p, x_f=p["x_f"][:, perm], x_p=p["x_p"][:, perm], w0=p["w0"][:, perm])
    torch.testing.assert_close(moved, delta(p)[:, perm], rtol=1e-6, atol=1e-9)
