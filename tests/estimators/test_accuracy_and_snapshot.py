"""Accuracy refinement from graded feedback, and the estimators' snapshot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from thinkcap.estimators import AccuracyCurve, Estimators


def feedback(curve: AccuracyCurve, n: int, truth: tuple[float, float, float], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base, gain, rate = truth
    for i in range(n):
        tokens = float(rng.integers(0, 3000))
        curve.update(tokens, bool(rng.random() < base + gain * (1 - math.exp(-rate * tokens))), now=float(i))


def accuracy_at(params: tuple[float, float, float], tokens: float) -> float:
    base, gain, rate = params
    return base + gain * (1 - math.exp(-rate * tokens))


def test_no_feedback_returns_the_configured_curve() -> None:
    """Before any feedback the estimate is the configuration."""
    assert AccuracyCurve(0.1, 0.6, 0.002).get() == (0.1, 0.6, 0.002)


def test_little_evidence_moves_the_curve_little_and_much_evidence_moves_it_far() -> None:
    """The fit moves towards the truth as far as the evidence supports."""
    prior, truth = (0.1, 0.5, 0.004), (0.2, 0.7, 0.001)
    few, many = AccuracyCurve(*prior, max_tokens=3000), AccuracyCurve(*prior, max_tokens=3000)
    feedback(few, 5, truth)
    feedback(many, 5000, truth)
    for tokens in (500.0, 1500.0, 3000.0):
        p0, pt = accuracy_at(prior, tokens), accuracy_at(truth, tokens)
        assert abs(accuracy_at(few.get(), tokens) - p0) < abs(accuracy_at(many.get(), tokens) - p0)
        assert accuracy_at(many.get(), tokens) == pytest.approx(pt, abs=0.04)
    base, gain, rate = many.get()
    assert base >= 0 and gain > 0 and base + gain <= 1 and rate > 0


@pytest.mark.parametrize(
    ("tokens", "correct", "field"), [(-1.0, True, "tokens"), (math.nan, True, "tokens"), (5.0, 1, "correct")]
)
def test_bad_feedback_is_rejected(tokens: float, correct: bool, field: str) -> None:
    """Invalid feedback raises ValueError naming the field and changes nothing."""
    curve = AccuracyCurve(0.1, 0.6, 0.002)
    with pytest.raises(ValueError, match=field):
        curve.update(tokens, correct, now=0.0)
    assert curve.samples == 0


def test_snapshot_uses_configured_values_until_enough_samples_then_fits() -> None:
    """The snapshot carries rate, priors and per-type service parameters with sample counts."""
    est = Estimators({"a": (0.5, 1.0, 0.05, 0.0), "b": (0.5, 1.0, 0.05, 0.0)}, min_samples=20)
    snap = est.snapshot(now=0.0)
    assert snap.arrival_rate == 0.0
    assert [t.prior for t in snap.types] == [0.5, 0.5]
    assert snap.by_name()["a"].overhead_s == 1.0 and not snap.by_name()["a"].fitted
    rng = np.random.default_rng(3)
    t = 0.0
    for i in range(600):
        t += float(rng.exponential(0.25))
        name = "a" if i % 4 else "b"
        est.arrived(name, now=t)
        n_out = float(rng.integers(10, 500))
        est.served(name, prompt_tokens=100.0, completion_tokens=n_out, service_time=0.2 + 0.01 * n_out + 0.001, now=t)
    snap = est.snapshot(now=t)
    assert snap.arrival_rate == pytest.approx(4.0, rel=0.25)
    a, b = snap.by_name()["a"], snap.by_name()["b"]
    assert a.prior == pytest.approx(0.75, abs=0.08)
    assert a.fitted and a.samples == 450 and b.samples == 150
    assert a.per_token_s == pytest.approx(0.01, rel=0.01)
    assert sum(x.prior for x in snap.types) == pytest.approx(1.0)


def test_unknown_type_leaves_every_estimator_unchanged() -> None:
    """An unknown type is rejected before the arrival estimate moves."""
    est = Estimators({"a": (1.0, 0.1, 0.01, 0.0)})
    with pytest.raises(ValueError, match="unknown type"):
        est.arrived("zzz", now=1.0)
    assert est.snapshot(now=1.0).arrivals == 0.0
