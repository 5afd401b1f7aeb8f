"""``thinkcap demo``'s world (the whole run is in ``tests/e2e/test_demo.py``)."""

from __future__ import annotations

import pytest

from thinkcap.cli.demo import demo_scenario, demo_settings
from thinkcap.controller.queue import MG1, BatchingEngine


def test_the_demo_world_is_an_eight_slot_engine_and_one_slot_is_mg1() -> None:
    """The embedded scenario's server batches 8 sequences; its wall-clock problem carries the
    engine with its step scaled by time_scale, the types' mean prefill (which pauses it) and
    per token the step at one sequence; ``--slots 1`` gives the paper's M/G/1 world at the
    same per-token time."""
    sc = demo_scenario(None)
    assert sc.slots == 8 and sc.engine == BatchingEngine(8, 0.005, 0.007)
    p = sc.problem(9.0)
    pause = sc.time_scale * (0.35 * 0.25 + 0.25 * 0.30 + 0.15 * 0.20 + 0.25 * 0.15)  # the types' prefill_s
    assert isinstance(p.queue, BatchingEngine) and p.queue.prefill_s == pytest.approx(pause)
    assert p.queue == BatchingEngine(8, 0.005 * sc.time_scale, 0.007 * sc.time_scale, prefill_s=p.queue.prefill_s)
    assert list(p.c) == pytest.approx([0.012 * sc.time_scale] * p.size)
    one = demo_scenario(None, slots=1)
    assert one.engine is not None and one.engine.slots == 1 and one.problem(9.0).queue == MG1()
    assert one.problem(9.0).metrics(p.lo).rho > p.metrics(p.lo).rho  # batching raises the capacity
    with pytest.raises(ValueError, match="slots"):
        demo_scenario(None, slots=0)


def test_the_demo_proxy_counts_the_answer_once() -> None:
    """The proxy adds the learnt answer's time to a type's configured overhead (the cap bounds
    the reasoning), so the demo configures the prefill alone: prefill plus the answer is the
    true problem's overhead, not the answer twice (which read a 90 % load as 1.0-1.4 after a
    spike, until the step fit took over)."""
    scenario = demo_scenario(None)
    truth = scenario.problem(scenario.phases[0].mean_rate)
    settings = demo_settings(scenario, "http://127.0.0.1:9/v1", "adaptive", 1.0)
    for cfg, true, sim in zip(settings.model.types, truth.types, scenario.types, strict=True):
        with_answer = cfg.task.overhead_s + cfg.task.per_token_s * sim.answer_tokens
        assert with_answer == pytest.approx(true.overhead_s, rel=1e-12), cfg.task.name
