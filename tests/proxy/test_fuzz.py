"""Hypothesis-generated request bodies: the proxy never answers 500 to any JSON body."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import create_app
from proxy.settings import load_settings
from proxy.state import build_state
from sim.backend import create_app as create_sim
from tests.proxy.conftest import write_config
from tests.sim.conftest import make_scenario

KEYS = [
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "thinking_token_budget",
    "custom_params",
    "thinkcap",
    "model",
    "prompt",
    "n",
    "temperature",
]
scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from([*KEYS, "role", "content", "type", "include_usage", "text"]), inner, max_size=4
        )
    ),
    max_leaves=12,
)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", 3]), "content": values})
bodies = st.dictionaries(st.sampled_from(KEYS), values, max_size=6) | st.fixed_dictionaries(
    {"messages": st.lists(message, max_size=3)}, optional={k: values for k in KEYS if k != "messages"}
)
documents = bodies | values


@pytest.fixture(scope="module", params=["vllm", "sglang", "openai", "llamacpp"])
def proxy_port(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A simulated server and a proxy in a background event loop; yields the proxy's port."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def up() -> None:
        sim = TestServer(create_sim(make_scenario()), host="127.0.0.1")
        await sim.start_server()
        path: Path = write_config(
            tmp_path_factory.mktemp("fuzz"), str(sim.make_url("/v1")), dialect=request.param, backend="probe = false"
        )
        front = create_app(build_state(load_settings(path)))
        await front.start("127.0.0.1", 0)
        box.update(sim=sim, front=front)

    thread = threading.Thread(target=lambda: (loop.run_until_complete(up()), ready.set(), loop.run_forever()))
    thread.start()
    ready.wait(30)
    yield int(box["front"].port)

    async def down() -> None:
        await box["front"].close()
        await box["sim"].close()

    asyncio.run_coroutine_threadsafe(down(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=documents, completions=st.booleans())
def test_no_json_body_gets_a_500(proxy_port: int, doc: Any, completions: bool) -> None:
    """Any JSON document sent to a shaped route gets a 2xx or a 4xx, never a 5xx from the proxy."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30)
    try:
        path = "/v1/completions" if completions else "/v1/chat/completions"
        conn.request("POST", path, body=json.dumps(doc), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    assert resp.status < 500, (resp.status, payload[:300])
