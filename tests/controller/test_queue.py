"""The queue models: M/G/1 in closed form and the batching engine's chain."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from thinkcap.controller.queue import (
    MG1,
    BatchingEngine,
    QueueTerms,
    pool_rate,
    queue_from_record,
    spread,
    step_times,
)

FIELDS = ("ta", "ta1", "ta2", "tb", "tb1", "tb2")


def values(t: QueueTerms) -> list[float]:
    return [getattr(t, f) for f in FIELDS]


@pytest.mark.parametrize("b", [0.0, 0.004, 0.05])
@pytest.mark.parametrize(("lam", "m1", "m2"), [(0.5, 0.3, 0.2), (2.0, 0.45, 0.5), (10.0, 0.001, 2e-6), (3.0, 0.0, 0.0)])
def test_one_slot_is_pollaczek_khinchine_exactly(b: float, lam: float, m1: float, m2: float) -> None:
    """With one slot the chain is M/G/1 whatever the step's per-sequence part:
    E[T] = m1 + lambda m2 / (2 (1 - lambda m1))."""
    engine = BatchingEngine(1, 0.02, b).terms(lam, m1)
    closed = MG1().terms(lam, m1)
    np.testing.assert_allclose(values(engine), values(closed), rtol=1e-12, atol=1e-12)
    assert engine.system_time(m2) == pytest.approx(m1 + lam * m2 / (2 * (1 - lam * m1)), rel=1e-12)


def test_a_constant_step_is_erlang_c_for_exponential_work() -> None:
    """With b = 0 the chain is M/M/c: E[T] = m1 + C(c, a) m1 / (c - a) (Erlang's C formula)."""
    c, lam, m1 = 4, 3.0, 1.0
    a = lam * m1
    head = sum(a**k / math.factorial(k) for k in range(c))
    tail = a**c / math.factorial(c) * c / (c - a)
    erlang_c = tail / (head + tail)
    expected = m1 + erlang_c * m1 / (c - a)
    t = BatchingEngine(c, 0.01, 0.0).terms(lam, m1)
    assert t.system_time(2 * m1 * m1) == pytest.approx(expected, rel=1e-12)  # exponential: m2 = 2 m1^2
    assert BatchingEngine(c, 0.01, 0.0).occupancy(lam, m1) == pytest.approx(a, rel=1e-12)


@pytest.mark.parametrize("slots", [2, 5, 24, 25, 64, 256])
@pytest.mark.parametrize("rho", [1e-4, 0.2, 0.6, 0.95])
@pytest.mark.parametrize("levels", [(), (0.0065, 0.0173, 0.0252, 0.0279)])
def test_derivatives_match_finite_differences(slots: int, rho: float, levels: tuple[float, ...]) -> None:
    """Ta', Ta'', Tb', Tb'' against central differences in m1 (both summation paths), with the
    step a line and read from measured levels (llama-server's at 1-4, the line above)."""
    q = BatchingEngine(slots, 0.015, 0.0065, (), levels)
    lam = 5.0
    m1 = rho / (lam * q.load_factor())
    h = 1e-5 * m1
    t, up, down = q.terms(lam, m1), q.terms(lam, m1 + h), q.terms(lam, m1 - h)
    for value, lo, hi in (("ta1", "ta", "ta"), ("ta2", "ta1", "ta1"), ("tb1", "tb", "tb"), ("tb2", "tb1", "tb1")):
        numeric = (getattr(up, hi) - getattr(down, lo)) / (2 * h)
        assert getattr(t, value) == pytest.approx(numeric, rel=1e-5, abs=1e-9 * abs(getattr(t, lo)) / m1), value


@pytest.mark.parametrize("slots", [2, 8, 25, 256])
@pytest.mark.parametrize("rho", [1e-4, 0.3, 0.9])
@pytest.mark.parametrize("pool", [False, True])
def test_a_pausing_prefills_derivatives_match_finite_differences(slots: int, rho: float, pool: bool) -> None:
    """With a prefill that pauses the batch (a third of m1), Ta', Ta'', Tb', Tb'' still match
    central differences in m1, on one engine and on a pool of two."""
    c, replicas = (2 * slots, (slots, slots)) if pool else (slots, ())
    lam = 0.5
    f = 0.5 if pool else 1.0
    # rho = lam (P f + kappa (m1 - P)) with P = m1 / 3 (kappa does not depend on P)
    m1 = rho / (lam * (f / 3 + BatchingEngine(c, 0.015, 0.0065, replicas).load_factor() * 2 / 3))
    q = BatchingEngine(c, 0.015, 0.0065, replicas, prefill_s=m1 / 3)
    assert lam * m1 * q.load_factor() + q.load_offset(lam) == pytest.approx(rho)
    h = 1e-5 * m1
    t, up, down = q.terms(lam, m1), q.terms(lam, m1 + h), q.terms(lam, m1 - h)
    for value, lo, hi in (("ta1", "ta", "ta"), ("ta2", "ta1", "ta1"), ("tb1", "tb", "tb"), ("tb2", "tb1", "tb1")):
        numeric = (getattr(up, hi) - getattr(down, lo)) / (2 * h)
        assert getattr(t, value) == pytest.approx(numeric, rel=1e-5, abs=1e-9 * abs(getattr(t, lo)) / m1), value


def test_a_pausing_prefill_holds_up_the_start_stretches_the_decode_and_bounds_the_load() -> None:
    """E[T] = (P + W) / (1 - s), the request's wait W for the prefills ahead (M/D/1) and its
    own prefill, each holding up the decode's start by the prefills arriving meanwhile; then
    the chain on (m1 - P) / (1 - s), s = lambda P, whose step reads C / 2 more sequences (C
    the requests prefilled with it, half of their decode beside it): the line's levels at
    j + C / 2, capped at c. The load lambda (P + kappa (m1 - P)) is the chain's bound: just
    below one its time is finite, at one the chain leaves."""
    q = BatchingEngine(8, 0.005, 0.007, prefill_s=0.2)
    lam, m1, m2 = 0.5, 1.5, 3.0
    s = lam * 0.2
    r = 1 - s
    wait = s * 0.2 / (2 * r)
    before = (0.2 + wait) / r
    shift = s * (2 - s) / (2 * r**2)
    levels = tuple(0.005 + 0.007 * min(j + shift, 8) for j in range(1, 9))
    k = levels[0] / 0.012 / r
    shifted = BatchingEngine(8, 0.005, 0.007, step_levels_s=levels)
    decode = shifted.terms(lam, k * (m1 - 0.2))
    expected = before + decode.system_time(k * k * (m2 - 2 * 0.2 * m1 + 0.2**2))
    assert q.terms(lam, m1).system_time(m2) == pytest.approx(expected, rel=1e-12)
    assert q.occupancy(lam, m1) == pytest.approx(shifted.occupancy(lam, k * (m1 - 0.2)) + lam * (before - wait))
    assert q.load_offset(lam) == pytest.approx(lam * 0.2 * (1 - q.load_factor()))
    top = (1 / lam - 0.2 * (1 - q.load_factor())) / q.load_factor()  # m1 at load one
    assert math.isfinite(q.terms(lam, 0.999 * top).system_time(m2))
    assert shifted.terms(lam, k * (0.999 * top - 0.2)).tb > 0  # the stretched chain is stable there
    stable = k * lam * shifted.load_factor()
    assert stable * (0.999 * top - 0.2) < 1 < stable * (1.001 * top - 0.2)


def test_the_companions_overlap_is_checked_and_recorded() -> None:
    """``overlap`` is a share in (0, 1]; a record carries it (1/2, the default, is left out) and
    reads back the same model; more overlap, more time."""
    for bad in (0.0, 1.5, -0.1, True, float("nan")):
        with pytest.raises(ValueError, match="overlap"):
            BatchingEngine(8, 0.005, 0.007, prefill_s=0.2, overlap=bad)
    q = BatchingEngine(8, 0.005, 0.007, prefill_s=0.2, overlap=0.8)
    assert q.record()["overlap"] == 0.8 and "overlap" not in BatchingEngine(8, 0.005, 0.007).record()
    back = queue_from_record(q.record())
    assert back == q and values(back.terms(0.5, 1.5)) == values(q.terms(0.5, 1.5))
    low = BatchingEngine(8, 0.005, 0.007, prefill_s=0.2, overlap=0.3)
    assert low.terms(0.5, 1.5).system_time(3.0) < q.terms(0.5, 1.5).system_time(3.0)


def test_a_pausing_prefill_changes_nothing_where_a_replica_runs_one_sequence() -> None:
    """One slot (or one-slot replicas): no other sequence is in service during a prefill, so the
    model is M/G/1 (M/G/c) whatever the prefill, and no load is added."""
    for slots, pool in ((1, ()), (3, (1, 1, 1))):
        a = BatchingEngine(slots, 0.02, 0.004, pool, prefill_s=0.3)
        b = BatchingEngine(slots, 0.02, 0.004, pool)
        assert values(a.terms(1.2, 0.5)) == values(b.terms(1.2, 0.5))
        assert a.load_offset(1.2) == 0.0 and a.occupancy(1.2, 0.5) == b.occupancy(1.2, 0.5)


def test_terms_are_those_a_convex_cost_needs() -> None:
    """Over the stable range Tb, Tb' and Tb'' never fall and Ta'' is never negative (the solvers'
    a-priori bounds rely on it)."""
    for slots in (2, 8, 64):
        for a, b in ((1.0, 0.0), (1.0, 0.3), (0.01, 1.0)):
            q = BatchingEngine(slots, a, b)
            rows = np.array([values(q.terms(1.0, r / q.load_factor())) for r in np.linspace(0.01, 0.99, 200)])
            assert np.all(rows[:, 2] >= -1e-9)
            for k in (3, 4, 5):
                assert np.all(np.diff(rows[:, k]) >= -1e-9 * rows[:, k].max())


def test_load_is_the_full_batch_utilisation() -> None:
    """rho = lambda m1 tau(c) / (c tau(1)): the share of the full batch's throughput in use."""
    q = BatchingEngine(4, 0.015, 0.0065)
    assert q.load_factor() == pytest.approx(q.step_time(4) / (4 * q.step_time(1)))


def test_record_round_trips_and_old_records_are_mg1() -> None:
    """A queue model's record reads back as the same model; a record without one (older logs) is
    M/G/1."""
    q = BatchingEngine(16, 0.02, 0.001)
    assert queue_from_record(q.record()) == q
    paused = BatchingEngine(16, 0.02, 0.001, (8, 8), (0.021, 0.023), prefill_s=0.05)
    assert queue_from_record(json.loads(json.dumps(paused.record()))) == paused
    assert queue_from_record(None) == MG1()
    assert queue_from_record(MG1().record()) == MG1()
    with pytest.raises(ValueError, match="unknown model"):
        queue_from_record({"model": "mmc"})


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ((0, 0.01, 0.0), "slots"),
        ((2, -0.01, 0.01), "step.base_s"),
        ((2, 0.01, math.inf), "step.per_seq_s"),
        ((2, 0.0, 0.0), "step"),
        ((2, 0.01, 0.01, (), (), -0.1), "prefill_s"),
        ((2, 0.01, 0.01, (), (), math.nan), "prefill_s"),
    ],
)
def test_bad_engines_are_rejected(args: tuple[Any, ...], key: str) -> None:
    """An engine with a bad slot count or step is refused, naming the field."""
    with pytest.raises(ValueError, match=key):
        BatchingEngine(*args)


def test_spread_is_the_least_loaded_routers() -> None:
    """Each request goes to the replica with the fewest in service relative to its slots."""
    assert spread(0, (4, 4)) == [0, 0]
    assert spread(5, (4, 4)) == [3, 2]
    assert spread(3, (2, 4)) == [1, 2]
    assert spread(6, (2, 4)) == [2, 4]
    assert spread(99, (1, 1, 1)) == [1, 1, 1]  # never beyond the slots


def test_a_pool_of_one_slot_replicas_advances_like_separate_servers() -> None:
    """c replicas of one slot: n in service run at full speed each (g(n) = 1), unlike one
    engine whose step grows with n."""
    q = BatchingEngine(3, 0.015, 0.0065, (1, 1, 1))
    np.testing.assert_allclose(q.slowdown(np.array([1, 2, 3])), [1.0, 1.0, 1.0])
    assert not q.batches
    assert q.load_factor() == pytest.approx(1 / 3)  # rho = lambda m1 / 3: three servers


def test_a_pool_slows_down_less_than_one_engine_with_its_slots() -> None:
    """Two replicas of 4: n = 2 runs one per replica, each at tau(1); one engine of 8 steps at tau(2)."""
    a, b = 0.015, 0.0065
    pool = BatchingEngine(8, a, b, (4, 4))
    one = BatchingEngine(8, a, b)
    assert pool.batches
    assert pool.slowdown(2) == pytest.approx(1.0)
    # n = 8: four on each, each at tau(4)
    assert pool.slowdown(8) == pytest.approx((a + 4 * b) / (a + b))
    assert one.slowdown(8) == pytest.approx((a + 8 * b) / (a + b))
    lam, m1, m2 = 20.0, 0.1, 0.02
    assert pool.terms(lam, m1).system_time(m2) < one.terms(lam, m1).system_time(m2)


def test_a_pool_record_round_trips_and_bad_pools_are_rejected() -> None:
    """A pool's record reads back as the same pool; a pool whose slots do not add up is refused."""
    q = BatchingEngine(6, 0.02, 0.001, (2, 4))
    assert q.record()["pool"] == [2, 4]
    assert queue_from_record(q.record()) == q
    with pytest.raises(ValueError, match="pool"):
        BatchingEngine(6, 0.02, 0.001, (2, 2))
    with pytest.raises(ValueError, match="pool"):
        BatchingEngine(4, 0.02, 0.001, (4, 0))


@pytest.mark.parametrize("pool", [(4, 4), (2, 4), (3, 5, 7), (1, 1, 1), (8, 8, 8), (5,) * 6])
@pytest.mark.parametrize(("a", "b"), [(0.007, 0.008), (0.0, 0.01), (0.02, 0.0)])
def test_the_pooled_rate_is_the_sum_over_the_spread_built_incrementally(pool: tuple[int, ...], a: float,
                                                                        b: float) -> None:  # fmt: skip
    """pool_rate(n) = sum_r n_r / tau(n_r) over spread(n, pool), also at a zero intercept
    (where a replica with no request is 0 / 0 term by term)."""
    direct = [sum(k / (a + b * k) for k in spread(n, pool) if k) for n in range(1, sum(pool) + 1)]
    assert pool_rate(pool, step_times(max(pool), a, b)) == pytest.approx(direct, rel=1e-12)


def test_a_vllm_size_pool_is_built_and_its_chain_is_finite() -> None:
    """8 replicas of 256 slots (vLLM's default max_num_seqs) with a zero intercept build (no
    batching gain: each replica is as fast as one server, load factor 1/8), and the chain's
    terms are finite at a heavy load."""
    q = BatchingEngine(8 * 256, 0.0, 0.0001, (256,) * 8)
    assert q.load_factor() == pytest.approx(1 / 8)
    terms = q.terms(1000.0, 0.5)
    assert all(math.isfinite(v) for v in terms)


LLAMA_LEVELS = (0.0065, 0.0173, 0.0252, 0.0279)  # llama-server's step at 1-4 sequences, seconds


def chain_occupancy(g: list[float], lam: float, m1: float, top: int = 4000) -> float:
    """E[min(N, c)] of the birth-death chain summed directly: P(n) ~ u^n prod g(min(i, c)) / prod min(i, c)."""
    c, u = len(g), lam * m1
    p, total, busy = 1.0, 1.0, 0.0
    for n in range(1, top):
        k = min(n, c)
        p *= u * g[k - 1] / k
        total += p
        busy += p * k
    return busy / total


def test_measured_step_levels_set_the_chain() -> None:
    """With the step measured per occupancy (a concave step no line fits), tau(j) is the level,
    the load factor tau(c) / (c tau(1)) and the chain's slowdowns g(j) come from the levels,
    and a line plays no part where every level is known."""
    q = BatchingEngine(4, 0.001, 0.007, (), LLAMA_LEVELS)
    assert [q.step_time(j) for j in (1, 2, 3, 4)] == pytest.approx(LLAMA_LEVELS)
    assert q.step_time(1.5) == pytest.approx((LLAMA_LEVELS[0] + LLAMA_LEVELS[1]) / 2)
    assert q.load_factor() == pytest.approx(LLAMA_LEVELS[3] / (4 * LLAMA_LEVELS[0]))
    g = [v / LLAMA_LEVELS[0] for v in LLAMA_LEVELS]
    m1 = 0.6  # stable below lambda = 1 / (0.6 x 1.07)
    for lam in (0.3, 0.9, 1.4):
        assert q.occupancy(lam, m1) == pytest.approx(chain_occupancy(g, lam, m1), rel=1e-9)
    assert BatchingEngine(4, 0.5, 0.7, (), LLAMA_LEVELS).terms(1.4, m1) == q.terms(1.4, m1)
    line = BatchingEngine(6, 0.015, 0.0065)
    same = BatchingEngine(6, 0.015, 0.0065, (), tuple(0.015 + 0.0065 * j for j in (1, 2, 3)))
    assert same.terms(3.0, 0.5) == pytest.approx(line.terms(3.0, 0.5), rel=1e-12)


def test_above_the_measured_levels_the_line_takes_over_but_never_shrinks_the_step() -> None:
    """Levels for 1-2 of 4 slots: tau(3), tau(4) on the line, not below tau(2)."""
    assert step_times(4, 0.001, 0.002, (0.004, 0.009)).tolist() == pytest.approx([0.004, 0.009, 0.009, 0.009])
    assert step_times(4, 0.001, 0.004, (0.004, 0.009)).tolist() == pytest.approx([0.004, 0.009, 0.013, 0.017])
    assert step_times(2, 0.001, 0.004, (0.004, 0.009, 0.02)).tolist() == pytest.approx([0.004, 0.009])


def test_a_pool_reads_its_replicas_step_from_the_levels() -> None:
    """Each replica advances at 1 / tau(n_r) with tau from the levels; the record round-trips;
    levels that are not positive finite numbers are rejected."""
    q = BatchingEngine(8, 0.001, 0.007, (4, 4), LLAMA_LEVELS)
    for n in range(1, 9):
        rate = sum(k / LLAMA_LEVELS[k - 1] for k in spread(n, (4, 4)) if k)
        assert float(q.slowdown(n)) == pytest.approx(n / (LLAMA_LEVELS[0] * rate))
    assert q.record()["step_levels_s"] == list(LLAMA_LEVELS)
    assert queue_from_record(q.record()) == q
    assert "step_levels_s" not in BatchingEngine(4, 0.01, 0.01).record()
    for bad in (0.0, -0.001, math.inf, math.nan):
        with pytest.raises(ValueError, match="levels_s"):
            BatchingEngine(4, 0.01, 0.01, (), (0.01, bad))
