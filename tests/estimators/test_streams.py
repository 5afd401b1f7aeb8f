"""Estimators on synthetic streams with known truth, and their input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from thinkcap.estimators import ArrivalRate, Estimators, ServiceModel, ServiceRLS, TypeMix


def poisson_times(rng: np.random.Generator, rate: float, start: float, stop: float) -> list[float]:
    out, t = [], start
    while True:
        t += float(rng.exponential(1.0 / rate))
        if t > stop:
            return out
        out.append(t)


def test_rate_converges_with_an_honest_standard_error() -> None:
    """At a known Poisson rate the estimate is within 3 standard errors of the truth."""
    rng = np.random.default_rng(0)
    est = ArrivalRate(half_life_s=60.0)
    for t in poisson_times(rng, 4.0, 0.0, 600.0):
        est.update(now=t)
    r = est.get(now=600.0)
    assert abs(r.rate - 4.0) < 3 * r.stderr
    assert 0 < r.stderr < 0.5


def test_rate_before_any_event_is_zero_with_infinite_uncertainty() -> None:
    """Readable before the first event."""
    r = ArrivalRate().get()
    assert r.rate == 0.0
    assert math.isinf(r.stderr)


def test_rate_decays_during_silence() -> None:
    """After the traffic stops, the rate falls instead of freezing."""
    rng = np.random.default_rng(1)
    est = ArrivalRate(half_life_s=10.0)
    for t in poisson_times(rng, 5.0, 0.0, 100.0):
        est.update(now=t)
    before = est.get(now=100.0).rate
    later = est.get(now=160.0).rate
    assert later < before / 10


def test_time_going_backwards_is_rejected_and_state_kept() -> None:
    """A bad ``now`` raises ValueError naming it and changes nothing."""
    est = ArrivalRate()
    est.update(now=10.0)
    with pytest.raises(ValueError, match="now"):
        est.update(now=5.0)
    with pytest.raises(ValueError, match="now"):
        est.update(now=math.nan)
    assert est.get().events == 1.0


def test_unknown_type_is_an_error_not_a_new_type() -> None:
    """TypeMix rejects a name it does not know and keeps its state."""
    mix = TypeMix(["a", "b"])
    mix.update("a", now=0.0)
    with pytest.raises(ValueError, match="unknown type 'zzz'"):
        mix.update("zzz", now=1.0)
    assert mix.counts().tolist() == [1.0, 0.0]


def test_unseen_types_keep_a_floor_and_probabilities_sum_to_one() -> None:
    """Dirichlet smoothing keeps a never-seen type above zero."""
    mix = TypeMix(["a", "b", "c"], half_life_s=60.0, concentration=1.0)
    for i in range(1000):
        mix.update("a", now=i * 0.1)
    p = mix.get()
    assert p.sum() == pytest.approx(1.0)
    assert p[1] > 0 and p[2] > 0


def test_service_fit_within_two_percent_after_500_noisy_observations() -> None:
    """The fitted per-token slopes and overhead are within 2 % of the truth."""
    rng = np.random.default_rng(4)
    rls = ServiceRLS()
    for i in range(500):
        n_out, n_in = float(rng.integers(10, 1500)), float(rng.integers(20, 1200))
        y = 0.3 + 0.013 * n_out + 0.007 * n_in + float(rng.normal(0, 0.05))
        rls.update(completion_tokens=n_out, prompt_tokens=n_in, service_time=y, now=float(i))
    b0, b_out, b_in = rls.coefficients
    assert b0 == pytest.approx(0.3, rel=0.02)
    assert b_out == pytest.approx(0.013, rel=0.02)
    assert b_in == pytest.approx(0.007, rel=0.02)
    assert rls.residual_sd == pytest.approx(0.05, rel=0.2)


def test_a_sixty_second_stall_does_not_wreck_the_fit() -> None:
    """One 60 s outlier moves the coefficients by under 2 %."""
    rng = np.random.default_rng(5)
    rls = ServiceRLS()
    for i in range(400):
        n_out, n_in = float(rng.integers(10, 1500)), float(rng.integers(20, 1200))
        y = 0.3 + 0.013 * n_out + 0.007 * n_in + float(rng.normal(0, 0.05))
        if i == 200:
            y += 60.0
        rls.update(completion_tokens=n_out, prompt_tokens=n_in, service_time=y, now=float(i))
    _, b_out, b_in = rls.coefficients
    assert b_out == pytest.approx(0.013, rel=0.02)
    assert b_in == pytest.approx(0.007, rel=0.02)


def test_covariance_stays_positive_definite_over_many_updates() -> None:
    """P stays symmetric positive definite over a million updates, including a constant input."""
    rng = np.random.default_rng(6)
    rls = ServiceRLS(forgetting=0.99)
    outs = rng.integers(10, 1500, 1_000_000).astype(float).tolist()
    for i, n in enumerate(outs):
        n_out = 500.0 if i > 800_000 else n
        rls.update(completion_tokens=n_out, prompt_tokens=100.0, service_time=0.2 + 0.01 * n_out, now=float(i))
    p = rls.covariance
    np.testing.assert_allclose(p, p.T)
    assert np.all(np.linalg.eigvalsh(p) > 0)
    assert np.all(np.isfinite(rls.coefficients))


@pytest.mark.parametrize(
    ("field", "kw"),
    [
        ("service_time", {"service_time": -1.0}),
        ("service_time", {"service_time": math.nan}),
        ("completion_tokens", {"completion_tokens": -5}),
        ("prompt_tokens", {"prompt_tokens": math.inf}),
        ("now", {"now": -1.0}),
        ("now", {"now": math.nan}),
    ],
)
def test_bad_observation_names_the_field_and_keeps_state(field: str, kw: dict[str, float]) -> None:
    """Invalid values raise ValueError naming the field; the fit is unchanged."""
    rls = ServiceRLS()
    rls.update(completion_tokens=100, prompt_tokens=10, service_time=1.0, now=0.0)
    before = rls.coefficients
    row = {"completion_tokens": 100.0, "prompt_tokens": 10.0, "service_time": 1.0, "now": 1.0, **kw}
    with pytest.raises(ValueError, match=field):
        rls.update(**row)
    assert rls.coefficients == before
    assert rls.count == 1


def test_service_model_uses_defaults_until_enough_samples() -> None:
    """Configured values until min_samples, then t0_k = b0 + b_in E_k[prompt], c_k = b_out."""
    rng = np.random.default_rng(7)
    model = ServiceModel({"short": (0.5, 0.02, 0.0), "long": (0.5, 0.02, 0.0)}, min_samples=30)
    assert model.params("short").overhead_s == 0.5
    assert not model.params("short").fitted
    for i in range(400):
        name = "short" if i % 2 else "long"
        prompt = float(rng.integers(50, 150)) if name == "short" else float(rng.integers(900, 1100))
        n_out = float(rng.integers(10, 800))
        y = 0.2 + 0.013 * n_out + 0.007 * prompt + float(rng.normal(0, 0.02))
        model.update(name, prompt_tokens=prompt, completion_tokens=n_out, service_time=y, now=float(i))
    short, long = model.params("short"), model.params("long")
    assert short.fitted and long.fitted
    assert short.per_token_s == pytest.approx(0.013, rel=0.02)
    assert short.overhead_s == pytest.approx(0.2 + 0.007 * 100, rel=0.05)
    assert long.overhead_s == pytest.approx(0.2 + 0.007 * 1000, rel=0.05)
    assert long.variance_s2 > short.variance_s2  # prompt-length spread is larger in absolute terms
    assert short.samples == 200


def test_cached_prompt_tokens_are_not_counted() -> None:
    """Only evaluated prompt tokens enter the fit."""
    model = ServiceModel({"a": (0.1, 0.01, 0.0)}, min_samples=3)
    for n in range(1, 60):
        evaluated, n_out = 10 * n, 5 * ((7 * n) % 13)
        model.update("a", prompt_tokens=1000, cached_tokens=1000 - evaluated, completion_tokens=n_out,
                     service_time=0.1 + 0.01 * n_out + 0.005 * evaluated, now=float(n))  # fmt: skip
    b_in = model.pooled.coefficients[2]
    assert b_in == pytest.approx(0.005, rel=1e-3)
    with pytest.raises(ValueError, match="cached_tokens"):
        model.update("a", prompt_tokens=10, cached_tokens=20, completion_tokens=1, service_time=0.1, now=99.0)


LEAD_IN_S = 600.0


def _step_delay(seed: int, before: float = 2.0, after: float = 6.0) -> float:
    """Seconds from a rate step after a 10-minute lead-in to the first flagged change (inf: none in 20 s)."""
    rng = np.random.default_rng(seed)
    est = ArrivalRate()
    for t in poisson_times(rng, before, 0.0, LEAD_IN_S):
        est.update(now=t)
    flagged = est.changes
    for t in poisson_times(rng, after, LEAD_IN_S, LEAD_IN_S + 20.0):
        est.update(now=t)
        if est.changes > flagged:
            return t - LEAD_IN_S
    return math.inf


def test_detector_flags_a_rate_rise_within_five_seconds() -> None:
    """A 2/s -> 6/s step is flagged within 5 s of stream time in at least 95 % of 200 seeded runs."""
    delays = np.array([_step_delay(seed) for seed in range(200)])
    assert np.mean(delays <= 5.0) >= 0.95


def test_detector_rarely_fires_on_a_stationary_stream() -> None:
    """A stationary 10-minute stream at 2/s raises fewer than 1 false alarm on average (100 runs)."""
    alarms = []
    for seed in range(100):
        est = ArrivalRate()
        for t in poisson_times(np.random.default_rng(1000 + seed), 2.0, 0.0, 600.0):
            est.update(now=t)
        alarms.append(est.changes)
    assert np.mean(alarms) < 1.0


def test_detector_flags_a_rate_fall() -> None:
    """A 6/s -> 2/s step is flagged within 10 s in at least 75 % of 100 runs."""
    delays = np.array([_step_delay(seed, before=6.0, after=2.0) for seed in range(100)])
    assert np.mean(delays <= 10.0) >= 0.75


def test_rate_follows_the_step_after_the_flag() -> None:
    """Shortly after a flagged rise the reported rate is near the new level, not the old."""
    rng = np.random.default_rng(9)
    est = ArrivalRate()
    for t in poisson_times(rng, 2.0, 0.0, LEAD_IN_S):
        est.update(now=t)
    for t in poisson_times(rng, 6.0, LEAD_IN_S, LEAD_IN_S + 15.0):
        est.update(now=t)
    assert est.changes >= 1
    assert est.get(now=LEAD_IN_S + 15.0).rate > 4.5


def _after_step(seed: int, before: float, after: float, at: float) -> float:
    """The reported rate ``at`` seconds after a step that follows a 10-minute lead-in, over ``after``."""
    rng = np.random.default_rng(seed)
    est = ArrivalRate()
    for t in poisson_times(rng, before, 0.0, LEAD_IN_S):
        est.update(now=t)
    for t in poisson_times(rng, after, LEAD_IN_S, LEAD_IN_S + at):
        est.update(now=t)
    return est.get(now=LEAD_IN_S + at).rate / after


@pytest.mark.parametrize(("before", "after", "at"), [(1.0, 6.0, 5.0), (6.0, 12.0, 8.0), (12.0, 3.0, 10.0)])
def test_after_a_flag_the_rate_rests_on_arrivals_since_the_step(before: float, after: float, at: float) -> None:
    """The restart locates the step: a few seconds later the estimate is unbiased (median
    within 6 % of the new rate over 40 runs) although its half-life (30 s) is far longer."""
    ratios = [_after_step(seed, before, after, at) for seed in range(40)]
    assert abs(float(np.median(ratios)) - 1.0) < 0.06


def test_the_located_change_is_the_step() -> None:
    """Regular arrivals, 1/s then 10/s: once flagged, the estimate is the new spacing's rate."""
    est = ArrivalRate()
    for k in range(1, 301):
        est.update(now=float(k))
    t = 300.0
    while est.changes == 0:
        t += 0.1
        est.update(now=t)
    assert t < 303.0
    assert est.get(now=t).rate == pytest.approx(10.0, rel=0.05)


def test_per_type_slopes_when_a_type_has_enough_samples() -> None:
    """With per_type_slopes a type with its own per-token cost gets it; pooled otherwise."""
    rng = np.random.default_rng(8)
    defaults = {"fast": (0.1, 0.01, 0.0), "slow": (0.1, 0.01, 0.0)}
    own = ServiceModel(defaults, min_samples=30, per_type_slopes=True)
    pooled = ServiceModel(defaults, min_samples=30)
    for i in range(600):
        name = "fast" if i % 2 else "slow"
        n_out, prompt = float(rng.integers(10, 900)), float(rng.integers(10, 300))
        y = 0.2 + (0.01 if name == "fast" else 0.03) * n_out + 0.005 * prompt
        for model in (own, pooled):
            model.update(name, prompt_tokens=prompt, completion_tokens=n_out, service_time=y, now=float(i))
    assert own.params("fast").per_token_s == pytest.approx(0.01, rel=0.01)
    assert own.params("slow").per_token_s == pytest.approx(0.03, rel=0.01)
    assert pooled.params("fast").per_token_s == pooled.params("slow").per_token_s


def _end_of_overload(seed: int, read_after: float) -> float:
    """``thinkcap demo``'s schedule, its estimator settings: 1.5/s, 9/s and 36/s for 20 s each
    (the ramp raises alarm after alarm), then 1.5/s; the snapshot's rate ``read_after``
    seconds into the last phase, read once a second as the control loop reads it."""
    rng = np.random.default_rng(seed)
    est = Estimators({"a": (1.0, 0.1, 0.01, 0.0)}, arrival=ArrivalRate(half_life_s=4.0, reference_half_life_s=60.0))
    arrivals = [
        t for k, rate in enumerate((1.5, 9.0, 36.0, 1.5)) for t in poisson_times(rng, rate, 20.0 * k, 20.0 * k + 20)
    ]
    tick = 1.0
    for t in arrivals:
        if t > 60.0 + read_after:
            break
        while tick <= t:
            est.snapshot(tick)
            tick += 1.0
        est.arrived("a", now=t)
    return est.snapshot(60.0 + read_after).arrival_rate


def test_the_end_of_an_overload_is_seen_within_seconds() -> None:
    """After 36/s falls to 1.5/s the rate read 3 s later is below 4/s in at least 95 % of 40
    runs (before the fall test it decayed by its half-life alone when the ramp's alarms had
    left the reference a few seconds deep: 21/s after 3 s)."""
    rates = np.array([_end_of_overload(seed, 3.0) for seed in range(40)])
    assert np.mean(rates < 4.0) >= 0.95


def test_a_silence_is_a_fall_without_an_arrival() -> None:
    """36/s for a minute, then nothing: 2 s into the silence, with no arrival to score, the
    snapshot's rate is below 1/s and the change is counted."""
    est = Estimators({"a": (1.0, 0.1, 0.01, 0.0)})
    for t in poisson_times(np.random.default_rng(3), 36.0, 0.0, 60.0):
        est.arrived("a", now=t)
    changes = est.arrival.changes
    snap = est.snapshot(62.0)
    assert snap.arrival_rate < 1.0
    assert est.arrival.changes == changes + 1


def test_the_fall_test_keeps_quiet_on_stationary_streams() -> None:
    """Checked once a second for 10 minutes at 0.5, 2, 36 and 200/s (10 runs each): no fall flagged."""
    for rate in (0.5, 2.0, 36.0, 200.0):
        for seed in range(10):
            est = ArrivalRate()
            tick = 1.0
            for t in poisson_times(np.random.default_rng(500 + seed), rate, 0.0, 600.0):
                while tick <= t:
                    assert not est.check(tick), (rate, seed, tick)
                    tick += 1.0
                est.update(now=t)
