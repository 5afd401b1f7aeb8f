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
    for i in range(60):
        n_out, n_in = float(rng.integers(1, 2000)), float(rng.integers(0, 1500))
        yield {"completion_tokens": n_out, "prompt_tokens": n_in, "now": float(i),
               "service_time": 0.1 + 0.013 * n_out + 0.006 * n_in + float(rng.normal(0, 0.01))}  # fmt: skip


def _model_stream(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for row in _rls_stream(rng):
        yield {"name": "default", **row}


def _accuracy_stream(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for i in range(60):
        tokens = float(rng.integers(0, 4000))
        correct = bool(rng.random() < 0.3 + 0.5 * (1 - np.exp(-0.001 * tokens)))
        yield {"tokens": tokens, "correct": correct, "now": float(i)}


def _step_stream(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for i in range(60):
        gaps = estimators.GapTally()
        for _ in range(int(rng.integers(0, 40))):
            j = int(rng.integers(1, 5))
            gaps.add(0.015 + 0.006 * j + float(rng.normal(0, 0.002)), 1, j)
        prompt, tokens = float(rng.integers(0, 300)), float(gaps.samples + 1)
        streamed = bool(rng.random() < 0.5)
        service = 0.05 + 0.004 * prompt + tokens * (0.015 + 0.006 * 2.5)
        first = 0.05 + 0.004 * prompt if streamed else None
        yield {"prompt_tokens": prompt, "tokens": tokens, "mean_in_service": 2.5, "now": float(i),
               "service_s": service, "gaps": gaps if streamed else None, "first_token_s": first}  # fmt: skip


def _answer_stream(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for i in range(60):
        yield {"name": "default", "tokens": float(rng.integers(0, 300)), "now": float(i)}


def _used_stream(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for i in range(60):
        limit = int(rng.integers(1, 500))
        yield {"name": "default", "used": int(rng.integers(0, limit + 1)), "limit": limit, "now": float(i)}


#: How to feed each estimator; a new estimator without an entry here fails the suite.
STREAMS: dict[str, Callable[[np.random.Generator], Iterator[dict[str, Any]]]] = {
    "ArrivalRate": _arrival_stream,
    "TypeMix": _mix_stream,
    "ServiceRLS": _rls_stream,
    "ServiceModel": _model_stream,
    "AccuracyCurve": _accuracy_stream,
    "AnswerLength": _answer_stream,
    "UsedShare": _used_stream,
    "StepFit": _step_stream,
}

ESTIMATORS = sorted(
    name for name in estimators.__all__ if inspect.isclass(obj := getattr(estimators, name)) and hasattr(obj, "update")
)


def _feed(est: Any, row: dict[str, Any]) -> None:
    row = dict(row)
    if "name" in row:
        est.update(row.pop("name"), **row)
    elif "correct" in row:
        est.update(row.pop("tokens"), row.pop("correct"), **row)
    else:
        est.update(**row)


def _numbers(value: Any) -> list[float]:
    """Every number in an estimate (a dataclass, named tuple, tuple, array or dict of them),
    except a standard error, which is infinite while nothing has been seen."""
    if hasattr(value, "__dataclass_fields__"):
        value = [getattr(value, f) for f in value.__dataclass_fields__ if "stderr" not in f]
    elif hasattr(value, "_fields"):
        value = [getattr(value, f) for f in value._fields if "stderr" not in f]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float | np.floating):
        return [float(value)]
    return [x for v in value for x in _numbers(v)]


def test_every_estimator_has_a_stream() -> None:
    """The contract below covers every exported estimator."""
    assert set(ESTIMATORS) == set(STREAMS)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_default_constructible_and_readable_before_update(name: str) -> None:
    """Constructing with defaults works and reading before any update gives a finite value."""
    est = getattr(estimators, name)()
    numbers = np.asarray(_numbers(est.get()))
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
    assert repr(est.get()) == repr(copy.get())


@pytest.mark.parametrize("name", ESTIMATORS)
def test_hyperparameters_are_public(name: str) -> None:
    """Constructor arguments are stored publicly under the same names."""
    cls = getattr(estimators, name)
    est = cls()
    for param in inspect.signature(cls).parameters:
        assert hasattr(est, param), f"{name}.{param}"


@pytest.mark.parametrize("name", ESTIMATORS)
def test_one_shape_update_now_and_get_now(name: str) -> None:
    """``update`` takes a keyword-only ``now`` with no default; ``get`` takes an optional ``now``."""
    cls = getattr(estimators, name)
    now = inspect.signature(cls.update).parameters["now"]
    assert now.kind is inspect.Parameter.KEYWORD_ONLY and now.default is inspect.Parameter.empty
    get = inspect.signature(cls.get).parameters
    assert list(get)[1:] == ["now"] and get["now"].default is None


@pytest.mark.parametrize("name", ESTIMATORS)
def test_time_never_goes_back(name: str) -> None:
    """An update or a read before the last update's time is refused and changes nothing;
    a read at a later time works."""
    rows = list(STREAMS[name](np.random.default_rng(4)))
    est = getattr(estimators, name)()
    for row in rows[:20]:
        _feed(est, row)
    last = rows[19]["now"]
    before = repr(est.get())
    with pytest.raises(ValueError, match="now"):
        _feed(est, {**rows[20], "now": last - 1.0})
    with pytest.raises(ValueError, match="now"):
        est.get(now=last - 1.0)
    with pytest.raises(ValueError, match="now"):
        _feed(est, {**rows[20], "now": float("nan")})
    assert repr(est.get()) == before
    assert np.all(np.isfinite(_numbers(est.get(now=last + 10.0))))
    _feed(est, {**rows[20], "now": np.float64(last + 1.0)})  # numpy's scalars are times too
    with pytest.raises(ValueError, match="now"):
        _feed(est, {**rows[21], "now": True})


def test_mix_moves_back_to_its_prior_during_a_silence() -> None:
    """The counts decay between updates and the prior's pseudo-counts do not."""
    mix = estimators.TypeMix(["a", "b"], half_life_s=10.0, concentration=2.0)
    for i in range(50):
        mix.update("a", now=i * 0.1)
    soon, later = mix.get()[0], mix.get(now=4.9 + 100.0)[0]
    assert soon > 0.9 and 0.5 < later < 0.52


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
