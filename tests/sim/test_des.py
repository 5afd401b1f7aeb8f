"""The discrete-event M/G/1 simulator against Pollaczek-Khinchine and by hand."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from thinkcap.controller import Problem, TaskType
from thinkcap.controller.queue import BatchingEngine
from thinkcap.sim.des import Phase, lindley, sample_workload, simulate

#: Batches for the batch-means confidence interval of the mean wait.
BATCHES = 30


def two_types(variance: bool) -> Problem:
    a = TaskType("a", 0.6, 0.1, 0.6, 0.004, overhead_s=0.5, per_token_s=0.001, min_tokens=0, max_tokens=1000,
                 variance_s2=0.04 if variance else 0.0)  # fmt: skip
    b = TaskType("b", 0.4, 0.2, 0.5, 0.002, overhead_s=1.0, per_token_s=0.002, min_tokens=0, max_tokens=1000,
                 variance_s2=0.16 if variance else 0.0)  # fmt: skip
    return Problem((a, b), arrival_rate=1.0, latency_penalty=0.1, rho_max=0.95)


@pytest.mark.parametrize("variance", [False, True])
@pytest.mark.parametrize("rho", [0.3, 0.7, 0.9])
def test_mean_wait_matches_pollaczek_khinchine(rho: float, variance: bool) -> None:
    """The simulated mean wait lies within 3 batch-means standard errors of E[W] (PK)."""
    base = two_types(variance)
    caps = np.array([500.0, 500.0])
    lam = rho / base.moments(caps)[0]
    p = base.with_arrival_rate(lam)
    work = sample_workload([Phase(600_000 / lam, lam)], p.prior, np.random.default_rng(int(rho * 10) + 100 * variance))
    out = simulate(p, caps, work)
    batches = np.array([b.mean() for b in np.array_split(out.wait, BATCHES)])
    se = batches.std(ddof=1) / np.sqrt(BATCHES)
    expected = p.metrics(caps).mean_wait
    assert abs(out.wait.mean() - expected) <= 3 * se
    assert se < 0.03 * expected  # the interval is informative, not vacuous


def test_lindley_by_hand() -> None:
    """Three requests: the second waits for the first, the third finds the server idle."""
    wait = lindley(np.array([0.0, 1.0, 10.0]), np.array([3.0, 2.0, 1.0]))
    np.testing.assert_allclose(wait, [0.0, 2.0, 0.0])


def test_policies_share_the_workload() -> None:
    """Common random numbers: higher caps never make an answer wrong that lower caps got right."""
    p = two_types(True).with_arrival_rate(0.2)
    work = sample_workload([Phase(2000.0, 0.2)], p.prior, np.random.default_rng(3))
    low, high = simulate(p, np.array([100.0, 100.0]), work), simulate(p, np.array([900.0, 900.0]), work)
    assert np.all(high.correct >= low.correct)
    assert high.mean_system_time() > low.mean_system_time()


def test_phases_and_per_phase_caps() -> None:
    """Arrivals follow the piecewise rate, and a 2-D cap table applies per phase."""
    p = two_types(False).with_arrival_rate(1.0)
    work = sample_workload([Phase(1000.0, 0.1), Phase(1000.0, 0.3)], p.prior, np.random.default_rng(4))
    counts = np.bincount(work.phase)
    assert counts[0] == pytest.approx(100, rel=0.3) and counts[1] == pytest.approx(300, rel=0.2)
    caps = np.array([[10.0, 10.0], [900.0, 900.0]])
    out = simulate(p, caps, work)
    assert np.all(out.tokens[work.phase == 0] == 10.0) and np.all(out.tokens[work.phase == 1] == 900.0)


@pytest.mark.parametrize(("field", "kw"), [("duration_s", {"duration_s": 0.0, "arrival_rate": 1.0}),
                                           ("arrival_rate", {"duration_s": 1.0, "arrival_rate": -1.0})])  # fmt: skip
def test_bad_phase_is_rejected(field: str, kw: dict[str, float]) -> None:
    """Phase validates its fields."""
    with pytest.raises(ValueError, match=field):
        Phase(**kw)


@pytest.mark.parametrize("rho", [0.4, 0.8])
def test_a_batching_engine_matches_its_queue_model(rho: float) -> None:
    """On an 8-slot engine the simulated mean system time lies within 5 % of the chain's
    prediction (the model's own accuracy, not the simulation's noise, sets the bound)."""
    engine = BatchingEngine(8, 0.015, 0.004)
    base = replace(two_types(True), queue=engine)
    base = replace(base, types=tuple(replace(t, per_token_s=engine.step_time(1.0)) for t in base.types))
    caps = np.array([300.0, 300.0])
    lam = rho / (base.moments(caps)[0] * engine.load_factor())
    p = base.with_arrival_rate(lam)
    work = sample_workload([Phase(60_000 / lam, lam)], p.prior, np.random.default_rng(int(rho * 10)))
    out = simulate(p, caps, work)
    q = p.metrics(caps)
    assert out.mean_system_time() == pytest.approx(q.mean_system_time, rel=0.05)
    assert np.all(out.system >= out.wait) and np.all(out.wait >= 0)
