"""The pure half of a decision: decide, the publish rule, the admitted share, the logged record."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from thinkcap.controller import (
    Problem,
    TaskType,
    admit_fraction,
    decide,
    load_at_min_caps,
    problem_from_record,
    problem_record,
    should_publish,
)
from thinkcap.controller.queue import MG1, BatchingEngine

CHAT = TaskType("chat", prior=0.6, accuracy_base=0.2, accuracy_gain=0.7, accuracy_rate=0.01,
                overhead_s=0.1, per_token_s=0.002, min_tokens=4, max_tokens=512, variance_s2=0.001)  # fmt: skip
MATH = TaskType("math", prior=0.4, accuracy_base=0.1, accuracy_gain=0.8, accuracy_rate=0.004,
                overhead_s=0.2, per_token_s=0.002, min_tokens=8, max_tokens=2048, weight=2.0)  # fmt: skip


def problem(rate: float) -> Problem:
    return Problem((CHAT, MATH), arrival_rate=rate, latency_penalty=0.05, rho_max=0.9)


def test_decide_rounds_inside_the_box_and_gives_minimum_caps_in_overload() -> None:
    """A stable load gives integer caps within bounds; an overload gives the minimum caps."""
    light = decide(problem(1.0))
    caps = light.caps(("chat", "math"))
    assert light.usable and light.result.status.name == "CONVERGED"
    assert 4 <= caps["chat"] <= 512 and 8 <= caps["math"] <= 2048
    assert np.all(np.abs(light.rounded.caps - light.result.x) < 1.0 + 1e-9)
    heavy = problem(20.0)
    assert load_at_min_caps(heavy) > heavy.rho_max
    over = decide(heavy)
    assert over.result.status.name == "OVERLOAD" and over.caps(heavy.names) == {"chat": 4, "math": 8}


def test_the_publish_rule_has_token_and_latency_hysteresis() -> None:
    """Small moves are held; big ones, moves in overload, and caps in force that the model says
    queue up are published."""
    p = problem(2.0)
    new = decide(p).caps(p.names)
    kw = {"hysteresis_tokens": 8, "hysteresis_relative": 0.05, "hysteresis_latency": 0.2}
    near = {n: c + 3 for n, c in new.items()}
    assert not should_publish(p, new, near, overload=False, **kw)
    far = {n: c + 100 for n, c in new.items()}
    assert should_publish(p, new, far, overload=False, **kw)
    assert should_publish(p, new, near, overload=True, **kw)
    wide = {**kw, "hysteresis_tokens": 10_000}
    slow = {"chat": 512, "math": 2048}  # far above the optimum: the model predicts a queue
    assert should_publish(p, new, slow, overload=False, **wide)


def test_a_move_is_published_only_when_it_pays_across_the_rate_band() -> None:
    """Caps chosen for a rate 5 % above the estimate are kept while that rate lies inside the
    band (the move is the rate's noise: at the band's top the old caps score better), and
    replaced once the band excludes it; in overload the band does not hold anything."""
    p = problem(2.0)
    new = decide(p).caps(p.names)
    old = decide(replace(p, arrival_rate=2.1)).caps(p.names)
    kw = {"hysteresis_tokens": 0, "hysteresis_relative": 0.0, "hysteresis_latency": 0.2}
    assert new != old and should_publish(p, new, old, overload=False, **kw)
    top = replace(p, arrival_rate=2.3)
    x_new, x_old = (np.array([c[n] for n in p.names], dtype=float) for c in (new, old))
    assert top.objective(x_old) > top.objective(x_new)
    assert not should_publish(p, new, old, overload=False, rate_band=(1.7, 2.3), **kw)
    assert should_publish(p, new, old, overload=False, rate_band=(1.98, 2.02), **kw)
    assert should_publish(p, new, old, overload=True, rate_band=(1.7, 2.3), **kw)


def test_the_admitted_share_brings_the_load_at_minimum_caps_to_the_release_level() -> None:
    """admit x load at minimum caps = shed_release x rho_max; never above 1."""
    p = problem(20.0)
    share = admit_fraction(p, 0.9)
    assert np.isclose(share * load_at_min_caps(p), 0.9 * p.rho_max)
    assert admit_fraction(problem(0.1), 0.9) == 1.0


def test_the_record_round_trips_exactly_through_json() -> None:
    """problem_from_record(json(problem_record(p))) is p, to the last bit."""
    p = problem(2.345678901234567)
    back = problem_from_record(json.loads(json.dumps(problem_record(p))))
    assert back.types == p.types and back.arrival_rate == p.arrival_rate and back.rho_max == p.rho_max


def test_the_record_keeps_the_queue_model_and_old_records_read_as_mg1() -> None:
    """A batching engine survives the record; a record without a queue (an old log) is M/G/1."""
    p = replace(problem(2.0), queue=BatchingEngine(8, 0.015, 0.004))
    record = json.loads(json.dumps(problem_record(p)))
    back = problem_from_record(record)
    assert back.queue == p.queue and back.metrics(back.lo) == p.metrics(p.lo)
    del record["queue"]
    assert problem_from_record(record).queue == MG1()


def test_the_admitted_share_of_a_batching_engine_uses_its_load() -> None:
    """Shedding brings the engine's load (not lambda m1) to the release level."""
    p = replace(problem(200.0), queue=BatchingEngine(8, 0.015, 0.004))
    assert load_at_min_caps(p) == pytest.approx(p.metrics(p.lo).rho)
    assert np.isclose(admit_fraction(p, 0.9) * load_at_min_caps(p), 0.9 * p.rho_max)
