"""Fixtures for the simulated world: a small scenario and a running simulated server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from thinkcap.controller import TaskType
from thinkcap.sim.backend import create_app
from thinkcap.sim.scenario import Scenario, SimType


def sim_type(name: str, *, natural: int = 400, answer: int = 6, overhead: float = 0.1, per_token: float = 0.001,
             base: float = 0.2, gain: float = 0.7, rate: float = 0.005, prior: float = 0.5) -> SimType:  # fmt: skip
    task = TaskType(
        name=name,
        prior=prior,
        accuracy_base=base,
        accuracy_gain=gain,
        accuracy_rate=rate,
        overhead_s=overhead,
        per_token_s=per_token,
        min_tokens=0,
        max_tokens=4096,
    )
    return SimType(task=task, marker=f"<{name}>", natural_tokens=natural, answer_tokens=answer,
                   prompts=(f"a {name} question", f"another {name} question"))  # fmt: skip


def make_scenario(**changes: Any) -> Scenario:
    """Two types, instant service (time_scale 0) unless changed."""
    base = Scenario(
        types=(sim_type("hard", natural=400), sim_type("easy", natural=50, base=0.6, gain=0.3, rate=0.05)),
        latency_penalty=0.05,
        time_scale=0.0,
        chunk_tokens=5,
        seed=7,
    )
    return replace(base, **changes)


ServerFactory = Callable[..., Any]


@pytest.fixture
async def sim_server() -> AsyncIterator[ServerFactory]:
    """Start simulated servers on loopback: ``await sim_server(**scenario_changes)``."""
    servers: list[TestServer] = []

    async def start(**changes: Any) -> TestServer:
        server = TestServer(create_app(make_scenario(**changes)), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for s in servers:
        await s.close()
