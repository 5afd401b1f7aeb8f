"""The proxy in front of a batching engine (the simulated one, step 12 + 6 ms x j): it runs
``slots`` requests at once, measures the number in service, fits the step live and plans with it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from tests.sim.conftest import make_scenario, sim_type
from thinkcap.controller.decision import problem_from_record
from thinkcap.controller.queue import BatchingEngine
from thinkcap.estimators import StepEstimate
from thinkcap.proxy.app import DataPlane, create_app
from thinkcap.proxy.control import ControlLoop
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.state import ProxyState, build_state
from thinkcap.sim.backend import create_app as create_sim

A, B = 0.012, 0.006  # the simulated engine's true step: tau(j) = A + B j (in-process: well above the loop's jitter)

CONFIG = """
[objective]
latency_penalty = 0.05

[backend]
url = "{url}"
dialect = "llama-server"
thinks = true
probe = false
slots = 4
step = {{ base_s = 0.03, per_seq_s = 0.0 }}

[proxy]
default_type = "short"

[controller]
enabled = false

[estimators]
service_min_samples = 20

[[types]]
name = "short"
prior = 1.0
max_tokens = 512
accuracy = {{ base = 0.2, gain = 0.7, rate = 0.02 }}
service = {{ prefill_s = 0.2 }}
"""


async def _start(
    tmp_path: Path, *, chunk_tokens: int = 1, usage_shape: str = "none"
) -> AsyncIterator[tuple[ProxyState, DataPlane]]:
    scenario = make_scenario(
        types=(sim_type("short", natural=40, answer=4, overhead=0.0, rate=0.02),),
        slots=4,
        engine=BatchingEngine(4, A, B),
        time_scale=1.0,
        chunk_tokens=chunk_tokens,
        usage_shape=usage_shape,
        reasoning_field="reasoning_content",
    )
    sim = TestServer(create_sim(scenario), host="127.0.0.1")
    await sim.start_server()
    path = tmp_path / "thinkcap.toml"
    path.write_text(CONFIG.format(url=sim.make_url("/v1")))
    state = build_state(load_settings(path))
    async with create_app(state, "127.0.0.1", 0) as front:
        yield state, front
        await sim.close()


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[tuple[ProxyState, DataPlane]]:
    async for pair in _start(tmp_path):
        yield pair


async def _closed_loop(url: str, clients: int, each: int, *, stream: bool) -> list[dict[str, Any]]:
    """``clients`` closed-loop clients, ``each`` requests apiece, each with its own ``max_tokens``
    (answers of 10 to 44 tokens); returns the answers' usage."""
    out: list[dict[str, Any]] = []

    async def client(session: aiohttp.ClientSession) -> None:
        for i in range(each):
            body = {
                "model": "m",
                "messages": [{"role": "user", "content": "a short question"}],
                "stream": stream,
                "max_tokens": 10 + (7 * i + clients) % 35,
            }
            async with session.post(url + "/chat/completions", json=body) as r:
                assert r.status == 200
                raw = await r.read()
            if not stream:
                out.append(json.loads(raw)["usage"])

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return out


async def _fit_after_closed_loops(state: ProxyState, front: DataPlane, *, stream: bool) -> StepEstimate:
    """The live step fit after closed loops at 1, 2, 3 and 4 clients (12 requests a level)."""
    url = str(front.make_url("/v1"))
    for clients in (1, 2, 3, 4):
        await _closed_loop(url, clients, 12 // clients, stream=stream)
    await asyncio.sleep(0.05)
    assert state.step is not None
    return state.step.get()


async def test_four_requests_run_at_once_and_each_records_its_mean_in_service(
    live: tuple[ProxyState, DataPlane],
) -> None:
    """slots = 4: four clients are in service together, not one after another; each request's
    event carries the time-averaged number in service while it ran."""
    state, front = live
    seen: list[int] = []

    async def watch() -> None:
        while True:
            seen.append(state.pool.in_service)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    with capture_logs() as logs:
        await _closed_loop(str(front.make_url("/v1")), 4, 3, stream=True)
        watcher.cancel()
        await asyncio.sleep(0.05)
    assert max(seen) == 4 and state.pool.in_service == 0 and state.pool.prefilling == 0
    events = [e for e in logs if e["event"] == "request"]
    assert len(events) == 12
    means = [e["mean_in_service"] for e in events]
    assert all(1.0 <= m <= 4.0 for m in means)
    assert sum(means) / len(means) > 3.0  # four closed-loop clients keep the engine nearly full


@pytest.mark.parametrize("stream", [True, False])
async def test_the_step_is_fitted_from_live_traffic_and_planned_with(
    live: tuple[ProxyState, DataPlane], stream: bool
) -> None:
    """Closed loops at 1, 2, 3 and 4 clients: the fitted a and b are within 20 % of the engine's;
    the next decision plans with them, says so, and its record replays to the same problem."""
    state, front = live
    est = await _fit_after_closed_loops(state, front, stream=stream)
    assert est.fitted, est
    assert est.base_s == pytest.approx(A, rel=0.2), est
    assert est.per_seq_s == pytest.approx(B, rel=0.2), est
    assert (est.gaps > 0) is stream
    event = ControlLoop(state, state.settings.controller).step(now=state.clock())
    assert event is not None
    assert event["step"]["source"] == "fitted"
    queue = event["inputs"]["queue"]
    assert (queue["step_base_s"], queue["step_per_seq_s"]) == (est.base_s, est.per_seq_s)
    # streamed, the step is also read per occupancy, and the queue model plans with those levels
    assert (len(est.levels) == 4) is stream, est
    assert queue.get("step_levels_s", []) == list(est.levels)
    for j, level in enumerate(est.levels, start=1):
        assert level == pytest.approx(A + B * j, rel=0.2), est
    problem = problem_from_record(event["inputs"])
    # A cap token costs tau(1) times the share of its cap an answer uses.
    assert problem.types[0].per_token_s == pytest.approx(est.step_time(1) * state.used.get()["short"])
    # The prefill the batch waits for: the fitted one at the type's mean prompt.
    prefill = est.prefill_s(state.estimators.service.prompt_tokens()["short"])
    assert problem.queue.prefill_s == pytest.approx(prefill)
    # One type, its answers of equal work at the cap in force: the requests prefilled together decode together.
    assert problem.queue.overlap == pytest.approx(1.0)
    q = problem.queue
    assert q == BatchingEngine(4, est.base_s, est.per_seq_s, (), est.levels, q.prefill_s, q.overlap)


async def test_a_server_that_streams_several_tokens_per_event_is_read_by_its_usage(tmp_path: Path) -> None:
    """The engine sends 4 tokens in each streamed event and reports its usage: each gap is four
    steps, and the fit, rescaled by the usage's token count, still reads the engine's step
    (it read it four times slower)."""
    async with asynccontextmanager(_start)(tmp_path, chunk_tokens=4, usage_shape="openai") as (state, front):
        est = await _fit_after_closed_loops(state, front, stream=True)
        assert est.gaps > 0 and est.fitted, est
        assert est.step_time(1) == pytest.approx(A + B, rel=0.2), est
        assert est.step_time(4) == pytest.approx(A + 4 * B, rel=0.2), est
        # The engine reads no prompt: its first event comes after four steps, three of them
        # beyond the first token's; the prefill read is the one step left, not the four.
        prefill = est.prefill_s(state.estimators.service.prompt_tokens()["short"])
        assert prefill < 2 * (A + B), est
