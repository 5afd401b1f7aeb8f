"""Contract tests generated over every estimator the package exports."""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from thinkcap import estimators

Step = tuple[dict[str, Any], Callable[[Any], None]]


def _arrival_stream(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    t = 0.0
    for _ in range(60):
        t += float(rng.exponential(0.5))
        yield {"now": t}


def _mix_stream(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for i in range(60):
        yield {"name": str(rng.choice(["default"])), "now": float(i)}


def _rls_stream(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for _ in range(60):
        n_out, n_in = float(rng.integers(1, 2000)), float(rng.integers(0, 1500))
        yield {"completion_tokens": n_out, "prompt_tokens": n_in,
               "service_time": 0.1 + 0.013 * n_out + 0.006 * n_in + float(rng.normal(0, 0.01))}  # fmt: skip


def _model_stream(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for row in _rls_stream(rng):
        yield {"name": "default", **row}


def _accuracy_stream(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for _ in range(60):
        tokens = float(rng.integers(0, 4000))
        yield {"tokens": tokens, "correct": bool(rng.random() < 0.3 + 0.5 * (1 - np.exp(-0.001 * tokens)))}


#: How to feed each estimator; a new estimator without an entry here fails the suite.
STREAMS: dict[str, Callable[[np.random.Generator], Iterator[dict[str, Any]]]] = {
    "ArrivalRate": _arrival_stream,
    "TypeMix": _mix_stream,
    "ServiceRLS": _rls_stream,
    "ServiceModel": _model_stream,
    "AccuracyCurve": _accuracy_stream,
}

ESTIMATORS = sorted(
    name for name in estimators.__all__ if inspect.isclass(obj := getattr(estimators, name)) and hasattr(obj, "update")
)


def _feed(est: Any, row: dict[str, Any]) -> None:
    row = dict(row)
    if "name" in row:
        est.update(row.pop("name"), **row)
    else:
        est.update(**row)


def _read(est: Any) -> Any:
    if hasattr(est, "get"):
        value = est.get()
        return value.rate if hasattr(value, "rate") else np.asarray(value)
    if hasattr(est, "params"):
        return est.params("default")
    return est.coefficients


def test_every_estimator_has_a_stream() -> None:
    """The contract below covers every exported estimator."""
    assert set(ESTIMATORS) == set(STREAMS)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_default_constructible_and_readable_before_update(name: str) -> None:
    """Constructing with defaults works and reading before any update gives a finite value."""
    est = getattr(estimators, name)()
    value = _read(est)
    numbers = np.asarray([v for v in np.ravel(np.asarray(value, dtype=object)) if not isinstance(v, bool)], dtype=float)
    assert numbers.size > 0
    assert np.all(np.isfinite(numbers))


@pytest.mark.parametrize("name", ESTIMATORS)
def test_pickle_round_trip_preserves_state(name: str) -> None:
    """A pickled estimator continues exactly where the original does."""
    rng = np.random.default_rng(0)
    est = getattr(estimators, name)()
    rows = list(STREAMS[name](rng))
    for row in rows[:30]:
        _feed(est, row)
    copy = pickle.loads(pickle.dumps(est))
    for row in rows[30:]:
        _feed(est, row)
        _feed(copy, row)
    assert repr(_read(est)) == repr(_read(copy))


@pytest.mark.parametrize("name", ESTIMATORS)
def test_hyperparameters_are_public(name: str) -> None:
    """Constructor arguments are stored publicly under the same names."""
    cls = getattr(estimators, name)
    est = cls()
    for param in inspect.signature(cls).parameters:
        assert hasattr(est, param), f"{name}.{param}"


def test_rls_matches_lstsq_after_every_step() -> None:
    """With forgetting 1 the regression equals np.linalg.lstsq after every observation."""
    rng = np.random.default_rng(1)
    est = estimators.ServiceRLS(forgetting=1.0, initial_variance=1e10, huber=float("inf"))
    xs, ys = [], []
    for row in _rls_stream(rng):
        est.update(**row)
        xs.append([1.0, row["completion_tokens"], row["prompt_tokens"]])
        ys.append(row["service_time"])
        if len(xs) >= 3:
            ref, *_ = np.linalg.lstsq(np.array(xs), np.array(ys), rcond=None)
            np.testing.assert_allclose(est.coefficients, ref, rtol=1e-5, atol=1e-7)


def test_mix_matches_exact_counts_after_every_step() -> None:
    """Without forgetting or smoothing the mix is the empirical frequency."""
    rng = np.random.default_rng(2)
    names = ["a", "b", "c"]
    mix = estimators.TypeMix(names, half_life_s=float("inf"), concentration=0.0)
    seen: list[str] = []
    for i in range(100):
        name = str(rng.choice(names, p=[0.6, 0.3, 0.1]))
        mix.update(name, now=float(i))
        seen.append(name)
        np.testing.assert_allclose(mix.get(), [seen.count(n) / len(seen) for n in names])


def test_arrival_matches_count_over_time_without_forgetting() -> None:
    """With an infinite half-life the rate is events / elapsed time after every event."""
    rng = np.random.default_rng(3)
    est = estimators.ArrivalRate(half_life_s=float("inf"))
    t = 0.0
    est.update(now=0.0, count=0)
    for n in range(1, 101):
        t += float(rng.exponential(0.3))
        est.update(now=t)
        assert est.get().rate == pytest.approx(n / t, rel=1e-12)
