"""Properties of the control loop over random streams of arrivals, feedback, pins, step-fit
observations and queue lengths (hypothesis): no decision raises, and nothing is shed while the
true load at the minimum caps is below 0.8."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.proxy.conftest import write_config
from thinkcap.estimators import GapTally
from thinkcap.proxy.control import ControlLoop
from thinkcap.proxy.serve_file import ControllerSettings, load_settings
from thinkcap.proxy.state import ProxyState, build_state

#: The test config's service time: 0.1 s + 1 ms per token (one slot; on the engine, 0.1 s of
#: prefill alone and the step at one sequence, 5 ms, per token).
OVERHEAD_S, PER_TOKEN_S, STEP1_S = 0.1, 0.001, 0.005

ENGINE = "slots = 4\nstep = { base_s = 0.004, per_seq_s = 0.001 }"

interval = st.fixed_dictionaries(
    {
        "load": st.floats(0.0, 0.8),  # the true load at the minimum caps over this interval
        "queued": st.integers(0, 6),  # requests waiting at the decision (a burst, or noise)
        "feedback": st.lists(
            st.tuples(st.sampled_from(["hard", "easy"]), st.floats(0, 5000), st.booleans()), max_size=12
        ),
        "pin": st.one_of(
            st.none(), st.dictionaries(st.sampled_from(["hard", "easy"]), st.integers(0, 4096), max_size=2)
        ),
        "gaps": st.lists(st.tuples(st.floats(0.0, 0.5), st.integers(1, 4), st.floats(1.0, 4.0)), max_size=30),
        "served": st.lists(st.tuples(st.floats(0, 500), st.floats(0, 2000), st.floats(-0.05, 0.05)), max_size=10),
    }
)


def make_state(tmp_path: Path, batching: bool) -> ProxyState:
    path = write_config(tmp_path, "http://127.0.0.1:9/v1", backend=ENGINE if batching else "")
    if batching:
        path.write_text(path.read_text().replace("overhead_s = 0.1, per_token_s = 0.001", "prefill_s = 0.1"))
    return build_state(load_settings(path))


async def hold(state: ProxyState, n: int) -> list[asyncio.Task[None]]:
    """Fill every admission slot and leave ``n`` requests waiting."""
    while state.admission.in_flight < state.admission.max_concurrency:
        await state.admission.enter()
    tasks = [asyncio.create_task(state.admission.enter()) for _ in range(n)]
    await asyncio.sleep(0)
    return tasks


async def release(state: ProxyState, tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    while state.admission.in_flight:
        state.admission.leave()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(intervals=st.lists(interval, min_size=3, max_size=12), batching=st.booleans(), seed=st.integers(0, 2**16))
async def test_random_streams_never_raise_and_never_shed_below_080(
    intervals: list[dict[str, object]], batching: bool, seed: int
) -> None:
    """Whatever the arrivals, feedback (unanimous included), pins, step observations (random
    gaps) and queue lengths (noise), every decision returns an event; with the true load at the
    minimum caps (pins in force) below 0.8 no request is shed. Service times observed are the
    server's own, with noise."""
    with tempfile.TemporaryDirectory() as tmp:
        state = make_state(Path(tmp), batching)
        ctl = ControlLoop(state, ControllerSettings())
        rng = np.random.default_rng(seed)
        # The rate that keeps the true load at the minimum caps at "load" or below under every
        # pin the stream sets (a pin changes the work per request, not the arrivals).
        per_token = STEP1_S if batching else PER_TOKEN_S
        pins: dict[str, int] = {}
        work = OVERHEAD_S
        for iv in intervals:
            pins = dict(iv["pin"]) if iv["pin"] is not None else pins  # type: ignore[call-overload]
            work = max(work, float(np.mean([OVERHEAD_S + per_token * pins.get(n, 0) for n in ("hard", "easy")])))
        # A batching engine's prefill pauses it: the load is lambda (P + kappa (m1 - P)).
        queue = state.settings.model.queue_with_prefill()
        per_load = 1.0 / (work * queue.load_factor() + queue.load_offset(1.0))
        t = 0.0
        for k, iv in enumerate(intervals):
            if iv["pin"] is not None:
                state.caps.unpin()
                if iv["pin"]:
                    state.caps.pin(iv["pin"])  # type: ignore[arg-type]
            rate = float(iv["load"]) * per_load  # type: ignore[arg-type]
            end = t + ctl.settings.interval_s
            while rate > 1e-3:
                t += float(rng.exponential(1 / rate))
                if t > end:
                    break
                state.arrived("hard" if rng.random() < 0.5 else "easy", t)
            t = end
            for name, tokens, correct in iv["feedback"]:  # type: ignore[attr-defined]
                state.accuracy[name].update(tokens, correct, now=t)
            for prompt, tokens, noise in iv["served"]:  # type: ignore[attr-defined]
                seconds = max(OVERHEAD_S + PER_TOKEN_S * tokens + noise, 0.0)  # what the server really takes
                state.estimators.served("hard", prompt_tokens=prompt, completion_tokens=tokens,
                                        service_time=seconds, now=t)  # fmt: skip
            if state.step is not None and iv["gaps"]:
                gaps = GapTally()
                for gap, n, j in iv["gaps"]:  # type: ignore[attr-defined]
                    gaps.add(gap, n, j)
                state.step.update(prompt_tokens=10, tokens=gaps.samples + 1, service_s=1.0, mean_in_service=2.0,
                                  gaps=gaps, first_token_s=0.0, now=t)  # fmt: skip
            tasks = await hold(state, int(iv["queued"]))  # type: ignore[call-overload]
            try:
                event = ctl.step(t)
            finally:
                await release(state, tasks)
            assert event is not None, f"decision {k} failed"
            assert not state.shedding and state.admit_fraction == 1.0
        assert ctl.failures == 0
