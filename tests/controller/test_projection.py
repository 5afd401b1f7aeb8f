"""Projection onto the box cut by the stability half-space."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from thinkcap.controller.projection import project_box_halfspace


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 30), tight=st.floats(0.0, 1.0))
def test_projection_is_the_closest_feasible_point(seed: int, n: int, tight: float) -> None:
    """The result is feasible and satisfies the variational inequality of a projection."""
    rng = np.random.default_rng(seed)
    lo = rng.uniform(0, 10, n)
    hi = lo + rng.uniform(0, 20, n)
    a = rng.uniform(0, 2, n) * (rng.random(n) > 0.2)
    r = float(a @ lo + tight * a @ (hi - lo))
    y = rng.uniform(-10, 40, n)
    x, nu = project_box_halfspace(y, lo, hi, a, r)
    assert np.all(x >= lo - 1e-12) and np.all(x <= hi + 1e-12)
    assert a @ x <= r + 1e-9
    assert nu >= 0
    # (y - x) . (z - x) <= 0 for every feasible z: check random feasible points.
    for _ in range(50):
        z = lo + rng.random(n) * (hi - lo)
        if a @ z > r:
            z = lo + (z - lo) * max(0.0, (r - a @ lo)) / max(a @ (z - lo), 1e-300)
        assert (y - x) @ (z - x) <= 1e-7 * (1 + np.abs(y).sum())


def test_projection_matches_a_generic_qp() -> None:
    """Equal to scipy's SLSQP on min ||x - y||^2 over the same set."""
    rng = np.random.default_rng(4)
    n = 8
    lo, hi = np.zeros(n), np.full(n, 5.0)
    a = rng.uniform(0.1, 1.0, n)
    y = rng.uniform(0, 8, n)
    r = 6.0
    x, _ = project_box_halfspace(y, lo, hi, a, r)
    ref = minimize(lambda z: ((z - y) ** 2).sum(), lo, jac=lambda z: 2 * (z - y), method="SLSQP",
                   bounds=list(zip(lo, hi, strict=True)),
                   constraints=[{"type": "ineq", "fun": lambda z: r - a @ z, "jac": lambda z: -a}],
                   options={"ftol": 1e-14})  # fmt: skip
    assert ((x - y) ** 2).sum() <= ((ref.x - y) ** 2).sum() * (1 + 1e-9)
    np.testing.assert_allclose(x, ref.x, atol=1e-5)


def test_inside_point_is_unchanged() -> None:
    """A feasible point projects to itself with multiplier 0."""
    y = np.array([1.0, 2.0])
    x, nu = project_box_halfspace(y, np.zeros(2), np.full(2, 3.0), np.ones(2), 10.0)
    np.testing.assert_array_equal(x, y)
    assert nu == 0.0


def test_empty_set_returns_the_lower_corner() -> None:
    """If even lo violates the half-space, lo is returned."""
    x, _ = project_box_halfspace(np.array([5.0, 5.0]), np.ones(2), np.full(2, 9.0), np.ones(2), 1.0)
    np.testing.assert_array_equal(x, np.ones(2))
