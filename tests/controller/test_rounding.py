"""Integer caps: nearest rounding (paper) and the neighbour search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkcap.controller import exact, round_caps
from thinkcap.controller.rounding import EXHAUSTIVE_MAX_TYPES
from thinkcap.sim.instances import random_problem


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), regime=st.sampled_from(["light", "heavy", "margin"]))
def test_both_roundings_are_feasible_and_neighbour_never_worse(seed: int, n: int, regime: str) -> None:
    """Caps are integers in F, the neighbour search is >= nearest, losses are within the bound."""
    p = random_problem(seed, n, regime)
    r = exact(p)
    near = round_caps(p, r.x, method="nearest")
    best = round_caps(p, r.x, method="neighbour")
    for rounded in (near, best):
        assert rounded.caps.dtype == np.int64
        assert p.is_feasible(rounded.caps.astype(float), atol=0.0)
        assert rounded.loss >= -1e-12
        assert rounded.loss <= rounded.bound + 1e-12
    assert best.fun >= near.fun


def test_exhaustive_search_finds_the_best_combination() -> None:
    """For few types the neighbour search equals brute force over floor/ceil."""
    p = random_problem(2, 6, "margin")
    x = exact(p).x
    best = round_caps(p, x)
    brute = -np.inf
    for combo in itertools.product(*[(np.floor(v), np.ceil(v)) for v in x]):
        c = np.array(combo)
        if p.is_feasible(c, atol=0.0):
            brute = max(brute, p.objective(c))
    assert best.fun == pytest.approx(brute, abs=1e-15)


def test_greedy_search_for_many_types() -> None:
    """Beyond the exhaustive limit the greedy search still never loses to nearest."""
    p = random_problem(9, EXHAUSTIVE_MAX_TYPES + 20, "margin")
    x = exact(p).x
    assert round_caps(p, x).fun >= round_caps(p, x, method="nearest").fun


def test_unknown_method_is_rejected() -> None:
    """round_caps names a bad method."""
    p = random_problem(1, 2, "light")
    with pytest.raises(ValueError, match="method"):
        round_caps(p, p.lo, method="ceil")
