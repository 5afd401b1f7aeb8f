"""Fits of a calibration run: the accuracy curve by binomial maximum likelihood with bootstrap
intervals, the service time and the engine's step by least squares."""

from __future__ import annotations

import math

import numpy as np
import pytest

from thinkcap.estimators.calibration import fit_curve, fit_service, fit_step, mle


def _curve(base: float, gain: float, rate: float, cap: float) -> float:
    return base + gain * (1 - math.exp(-rate * cap))


def test_the_likelihood_maximum_is_the_generating_curve_on_exact_counts() -> None:
    """On exact counts the likelihood's maximum is the curve that generated them."""
    caps = [8, 16, 32, 64, 128, 256]
    k = [1000 * _curve(0.05, 0.85, 0.02, c) for c in caps]
    base, gain, rate, ll = mle(caps, [1000] * len(caps), k)
    assert (base, gain, rate) == pytest.approx((0.05, 0.85, 0.02), rel=1e-3, abs=1e-4)
    assert ll < 0


def test_the_bootstrap_interval_covers_the_truth_on_sampled_items() -> None:
    """On sampled items the bootstrap interval of each parameter covers its true value."""
    rng = np.random.default_rng(1)
    caps = (8, 16, 32, 64, 128)
    items = [[(c, bool(rng.random() < _curve(0.1, 0.8, 0.03, c))) for c in caps] for _ in range(120)]
    fit = fit_curve(items, boot=100, level=0.9)
    assert fit.samples == 600
    for name, true in (("base", 0.1), ("gain", 0.8), ("rate", 0.03)):
        lo, hi = fit.intervals[name]
        assert lo <= true <= hi, (name, lo, hi)
    assert fit.accuracy(128) == pytest.approx(_curve(0.1, 0.8, 0.03, 128), abs=0.08)
    assert fit.base >= 0 and fit.base + fit.gain <= 1 + 1e-9 and fit.rate > 0


def test_bad_counts_are_rejected() -> None:
    """Counts above their totals, lists of different lengths and no graded items are refused."""
    with pytest.raises(ValueError, match="k <= n"):
        mle([8], [2], [3])
    with pytest.raises(ValueError, match="one entry"):
        mle([8, 16], [2], [1])
    with pytest.raises(ValueError, match="no graded"):
        fit_curve([[]])


def test_service_and_step_fits() -> None:
    """The service fit recovers overhead and per-token time (never a negative slope); the step fit
    recovers a and b."""
    s = fit_service([10, 20, 30, 40, 50], [0.21, 0.31, 0.39, 0.51, 0.60])
    assert s.overhead_s == pytest.approx(0.113, abs=0.01) and s.per_token_s == pytest.approx(0.0098, abs=5e-4)
    assert s.samples == 5 and s.variance_s2 > 0
    assert fit_service([10, 10], [0.2, 0.2]).per_token_s == pytest.approx(0.02)  # one length: all per token
    assert fit_service([10, 20], [0.5, 0.2]).per_token_s == 0.0  # never a negative slope
    a, b = fit_step([1, 2, 3, 4, 1, 4], [0.0179, 0.0255, 0.0364, 0.0408, 0.0181, 0.0410])
    assert a > 0 and b == pytest.approx(0.0077, abs=0.001)
    with pytest.raises(ValueError, match="two or more"):
        fit_step([2, 2], [0.02, 0.02])
