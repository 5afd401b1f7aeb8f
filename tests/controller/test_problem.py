"""The validated problem, its queue metrics, objective and gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest

from thinkcap.controller import Problem, TaskType
from thinkcap.sim.instances import random_problem


def task(**kw: object) -> TaskType:
    args: dict[str, object] = dict(name="math", prior=1.0, accuracy_base=0.1, accuracy_gain=0.8, accuracy_rate=0.005,
                                   overhead_s=0.1, per_token_s=0.002, min_tokens=10, max_tokens=3000)  # fmt: skip
    args.update(kw)
    return TaskType(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"prior": 0.0}, "prior"),
        ({"prior": math.nan}, "prior"),
        ({"accuracy_rate": -1.0}, "accuracy.rate"),
        ({"accuracy_rate": 0.0}, "accuracy.rate"),
        ({"accuracy_gain": -0.1}, "accuracy.gain"),
        ({"accuracy_base": 0.5, "accuracy_gain": 0.6}, "accuracy.base \\+ accuracy.gain"),
        ({"per_token_s": -0.001}, "service.per_token_s"),
        ({"overhead_s": math.inf}, "service.overhead_s"),
        ({"variance_s2": -1.0}, "service.variance_s2"),
        ({"weight": -1.0}, "weight"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"min_tokens": 1.5}, "min_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
    ],
)
def test_invalid_type_names_field_and_type(override: dict[str, object], field: str) -> None:
    """Each invalid parameter raises ValueError naming the type and the field."""
    with pytest.raises(ValueError, match=f"type 'math': {field}"):
        task(**override)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"arrival_rate": -1.0}, "arrival_rate"),
        ({"arrival_rate": math.nan}, "arrival_rate"),
        ({"latency_penalty": -0.1}, "latency_penalty"),
        ({"rho_max": 1.0}, "rho_max"),
        ({"rho_max": 0.0}, "rho_max"),
    ],
)
def test_invalid_problem_scalars_are_named(kw: dict[str, float], field: str) -> None:
    """Bad scalars raise ValueError naming the field."""
    args = {"arrival_rate": 1.0, "latency_penalty": 0.1, **kw}
    with pytest.raises(ValueError, match=field):
        Problem((task(),), **args)


def test_priors_must_sum_to_one() -> None:
    """Priors summing to 0.9 are rejected."""
    with pytest.raises(ValueError, match="prior"):
        Problem((task(prior=0.5), task(name="code", prior=0.4)), 1.0, 0.1)


def test_duplicate_names_are_rejected() -> None:
    """Two types with the same name are an error."""
    with pytest.raises(ValueError, match="duplicate"):
        Problem((task(prior=0.5), task(prior=0.5)), 1.0, 0.1)


def test_pollaczek_khinchine_by_hand() -> None:
    """m1, m2, rho, E[W] and E[T] match a hand computation."""
    a = task(name="a", prior=0.25, overhead_s=0.5, per_token_s=0.01, variance_s2=0.1)
    b = task(name="b", prior=0.75, overhead_s=0.2, per_token_s=0.02, variance_s2=0.0)
    p = Problem((a, b), arrival_rate=0.8, latency_penalty=0.1)
    x = np.array([50.0, 10.0])
    t = np.array([1.0, 0.4])
    m1 = 0.25 * 1.0 + 0.75 * 0.4
    m2 = 0.25 * (1.0 + 0.1) + 0.75 * 0.16
    q = p.metrics(x)
    assert q.m1 == pytest.approx(m1)
    assert q.m2 == pytest.approx(m2)
    assert q.rho == pytest.approx(0.8 * m1)
    wait = 0.8 * m2 / (2 * (1 - 0.8 * m1))
    assert q.mean_wait == pytest.approx(wait)
    assert q.mean_system_time == pytest.approx(m1 + wait)
    np.testing.assert_allclose(p.service_times(x), t)


def test_unstable_queue_gives_infinities() -> None:
    """rho >= 1 gives infinite wait, -inf objective and -inf gradient for costly types."""
    p = Problem((task(),), arrival_rate=10.0, latency_penalty=0.1)
    x = np.array([3000.0])
    q = p.metrics(x)
    assert q.rho >= 1 and not q.stable
    assert q.mean_wait == math.inf and q.mean_system_time == math.inf
    assert p.objective(x) == -math.inf
    assert p.gradient(x)[0] == -math.inf


def test_gradient_matches_finite_differences() -> None:
    """The analytic gradient (DESIGN.md 1) equals central differences."""
    p = random_problem(11, 6, "light")
    x = p.lo + 0.05 * (p.hi - p.lo)
    assert p.metrics(x).stable
    g = p.gradient(x)
    for k in range(p.size):
        h = 1e-3
        e = np.zeros(p.size)
        e[k] = h
        fd = (p.objective(x + e) - p.objective(x - e)) / (2 * h)
        assert g[k] == pytest.approx(fd, rel=1e-5, abs=1e-12)


def test_overloaded_property() -> None:
    """overloaded is true exactly when rho(lo) > rho_max."""
    p = Problem((task(min_tokens=100),), arrival_rate=1.0, latency_penalty=0.1, rho_max=0.5)
    assert p.metrics(p.lo).rho == pytest.approx(0.3)
    assert not p.overloaded
    assert p.with_arrival_rate(2.0).overloaded


def test_arrays_are_read_only() -> None:
    """The problem is immutable, arrays included."""
    p = Problem((task(),), 1.0, 0.1)
    with pytest.raises(ValueError, match="read-only"):
        p.hi[0] = 5.0
