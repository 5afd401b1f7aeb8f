"""Estimates of several proxies merged into the whole stream's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from thinkcap.estimators import ArrivalRate, Snapshot, StepEstimate
from thinkcap.estimators.merge import merge_curves, merge_means, merge_snapshots, merge_steps
from thinkcap.estimators.snapshot import TypeEstimate


def _snap(
    rate: float, priors: tuple[float, float], samples: tuple[int, int] = (0, 0), per_token: float = 0.01
) -> Snapshot:
    types = tuple(
        TypeEstimate(n, p, 0.1, per_token, 0.0, k, k >= 10) for n, p, k in zip(("a", "b"), priors, samples, strict=True)
    )
    return Snapshot(0.0, rate, 0.1 * rate, rate * 10, 0, None, types)


def test_rates_add_and_the_mix_is_weighted_by_rate() -> None:
    """Replica 1 sees 3/s, all of type a; replica 2 sees 1/s, all b: the stream is 4/s, 3:1."""
    m = merge_snapshots([_snap(3.0, (1.0, 0.0)), _snap(1.0, (0.0, 1.0))], 5.0)
    assert m.time == 5.0 and m.arrival_rate == pytest.approx(4.0)
    assert [t.prior for t in m.types] == pytest.approx([0.75, 0.25])
    assert m.arrival_rate_stderr == pytest.approx(math.hypot(0.3, 0.1))


def test_split_poisson_streams_merge_to_the_whole_streams_estimate() -> None:
    """One Poisson stream split at random over three estimators: their merged rate is the
    rate one estimator of the whole stream gives (decayed counts add; the change detector is
    off so that no window restarts)."""
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.exponential(1 / 30.0, 6000))
    parts = [ArrivalRate(half_life_s=1e9, threshold=1e6, threshold_down=1e6) for _ in range(3)]
    whole = ArrivalRate(half_life_s=1e9, threshold=1e6, threshold_down=1e6)
    for t, k in zip(times, rng.integers(0, 3, times.size), strict=True):
        parts[k].update(now=float(t))
        whole.update(now=float(t))
    end = float(times[-1])
    merged = sum(p.get(end).rate for p in parts)
    assert merged == pytest.approx(whole.get(end).rate, rel=0.02)
    assert merged == pytest.approx(30.0, rel=0.05)


def test_service_fits_are_weighted_by_samples_and_unfitted_ones_left_out() -> None:
    """Merged service fits weigh each replica by its samples, and a replica not yet fitted is left
    out."""
    m = merge_snapshots(
        [
            _snap(1.0, (0.5, 0.5), (30, 0), 0.010),
            _snap(1.0, (0.5, 0.5), (10, 0), 0.014),
            _snap(1.0, (0.5, 0.5), (5, 0), 0.5),
        ],
        0.0,
    )
    a = m.by_name()["a"]
    assert a.fitted and a.samples == 45
    assert a.per_token_s == pytest.approx((30 * 0.010 + 10 * 0.014) / 40)  # the unfitted 5 samples are not used


def test_replicas_with_other_types_are_rejected() -> None:
    """Snapshots naming other types, or none at all, cannot be merged."""
    other = Snapshot(0.0, 1.0, 0.1, 10, 0, None, (TypeEstimate("z", 1.0, 0.1, 0.01, 0.0, 0, False),))
    with pytest.raises(ValueError, match="types differ"):
        merge_snapshots([_snap(1.0, (0.5, 0.5)), other], 0.0)
    with pytest.raises(ValueError, match="at least one"):
        merge_snapshots([], 0.0)


def _step(a: float, b: float, requests: int, fitted: bool) -> StepEstimate:
    return StepEstimate(a, b, 0.1, 0.001, 0.002, 0.001, requests, requests * 10, fitted)


def test_steps_average_the_fitted_fits_by_requests() -> None:
    """Merged step fits average the fitted ones by their requests (tighter than either); unfitted
    ones are left out."""
    m = merge_steps([_step(0.010, 0.006, 100, True), None, _step(0.016, 0.003, 50, True), _step(1.0, 1.0, 5, False)])
    assert m is not None and m.fitted
    assert m.base_s == pytest.approx((100 * 0.010 + 50 * 0.016) / 150)
    assert m.per_seq_s == pytest.approx((100 * 0.006 + 50 * 0.003) / 150)
    assert m.requests == 155
    assert m.base_stderr_s < 0.002  # two independent fits pin it down better than one
    assert merge_steps([None, None]) is None
    unfitted = merge_steps([_step(0.02, 0.0, 3, False)])
    assert unfitted is not None and not unfitted.fitted


def test_merged_steps_keep_the_levels_every_fitted_replica_measured() -> None:
    """The measured levels average by requests as far as every fitted replica has them."""
    one = _step(0.010, 0.006, 100, True)._replace(levels=(0.006, 0.017, 0.025))
    two = _step(0.016, 0.003, 50, True)._replace(levels=(0.009, 0.020))
    m = merge_steps([one, two, _step(1.0, 1.0, 5, False)])
    assert m is not None
    assert m.levels == pytest.approx(((100 * 0.006 + 50 * 0.009) / 150, (100 * 0.017 + 50 * 0.020) / 150))
    m = merge_steps([one, _step(0.016, 0.003, 50, True)])
    assert m is not None and m.levels == ()


def test_means_and_curves_are_weighted() -> None:
    """Means are weighted by rate (equally at rate 0) and curves by samples; a weight per record is
    required."""
    assert merge_means([{"a": 10.0}, {"a": 20.0}], [0.0, 0.0]) == {"a": 15.0}
    assert merge_means([{"a": 10.0}, {"a": 20.0}], [3.0, 1.0]) == {"a": 12.5}
    curves = merge_curves([{"a": (0.2, 0.6, 0.01)}, {"a": (0.4, 0.4, 0.03)}], [{"a": 30}, {"a": 10}])
    assert curves["a"] == pytest.approx((0.25, 0.55, 0.015))
    with pytest.raises(ValueError, match="one weight"):
        merge_means([{}], [])
