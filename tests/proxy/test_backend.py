"""The backend as thinkcap watches it.

The start-up probe decides the budget mode (``[backend] budget = "auto"``): native where the
backend's field bounds the reasoning, forced where it rejects or ignores it; it says where
the reasoning is (its own field, between tags inside the content, or not seen). Against stub
backends on loopback; the real engine's verdicts are in ``tests/e2e/test_forced_budget.py``.
The engines' own gauges are read from a real llama-server's ``/metrics``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from tests.proxy.conftest import write_config
from thinkcap.proxy.app import create_app
from thinkcap.proxy.backend import PROBE_ATTEMPTS, PROBE_RETRIES, choose_budget, parse_gauges, probe
from thinkcap.proxy.control import engine_waiting
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.state import ProxyState, build_state
from thinkcap.sim.llamacpp import start_llama_server


def sse(deltas: list[dict[str, Any]]) -> bytes:
    chunks = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


@asynccontextmanager
async def stub(answer: Any) -> AsyncIterator[str]:
    """A chat route answering ``answer(body)``: a status and SSE deltas."""

    async def chat(request: web.Request) -> web.Response:
        status, deltas = answer(await request.json())
        if status != 200:
            return web.json_response({"error": {"message": "unknown field"}}, status=status)
        return web.Response(body=sse(deltas), content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/v1"))
    finally:
        await server.close()


def state_for(tmp: Path, url: str, budget: str = "auto", dialect: str = "vllm") -> ProxyState:
    return build_state(load_settings(write_config(tmp, url, dialect=dialect, backend=f'budget = "{budget}"')))


def thinking(n: int) -> list[dict[str, Any]]:
    return [{"reasoning_content": f" r{i}"} for i in range(n)] + [{"content": "done"}]


async def decided(state: ProxyState) -> dict[str, Any]:
    """Probe once (as the app does at start-up) and let auto decide."""
    async with aiohttp.ClientSession() as state.session:
        state.probe = await probe(state)
    choose_budget(state)
    return state.probe


async def test_a_budget_that_binds_stays_native(tmp_path: Path) -> None:
    """The field honoured (reasoning within the probe's cap): native, and the probe reports
    the reasoning in its own field."""
    async with stub(lambda body: (200, thinking(min(body["thinking_token_budget"], 64)))) as url:
        state = state_for(tmp_path, url)
        verdict = await decided(state)
    assert verdict["status"] == "honoured" and verdict["reasoning"] == "reasoning_content"
    assert state.budget == "native" and "honoured" in state.budget_reason


async def test_an_ignored_budget_is_forced(tmp_path: Path) -> None:
    """The reasoning runs past the field's budget: auto picks forced and logs why; with
    ``budget = "native"`` the mode stays, and behind a gateway (no second request possible)
    it stays native with the reason given."""
    async with stub(lambda body: (200, thinking(40))) as url:
        state = state_for(tmp_path, url)
        with capture_logs() as logs:
            verdict = await decided(state)
        native = state_for(tmp_path, url, budget="native")
        await decided(native)
        gateway = state_for(tmp_path, url)
        gateway.can_force = False
        await decided(gateway)
    assert verdict["status"] == "not_honoured" and verdict["reasoning_tokens"] == 40
    assert state.budget == "forced" and "ignores thinking_token_budget" in state.budget_reason
    (event,) = [e for e in logs if e["event"] == "budget"]
    assert event["mode"] == "forced" and event["reasoning"] == "reasoning_content"
    assert native.budget == "native" and native.budget_reason == "configured"
    assert gateway.budget == "native" and "cannot force" in gateway.budget_reason


async def test_a_reasoning_that_ends_early_by_itself_does_not_pass_for_a_budget_that_binds(tmp_path: Path) -> None:
    """A backend that ignores the budget, whose first reasoning happens to end within it (a
    model that thinks 5 tokens, then 40): one short reasoning looks like a budget that binds,
    so the probe asks again and sees the budget ignored. A budget that binds is honoured in
    every probe of a row."""
    lengths = iter([5, 6, 40])
    seen: list[int] = []

    def answer(body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
        seen.append(1)
        return 200, thinking(next(lengths, 40))

    async with stub(answer) as url:
        state = state_for(tmp_path, url)
        verdict = await decided(state)
    assert verdict["status"] == "not_honoured" and verdict["reasoning_tokens"] == 40 and len(seen) == 3
    assert state.budget == "forced"
    async with stub(lambda body: (200, thinking(min(body["thinking_token_budget"], 64)))) as url:
        verdict = await decided(state_for(tmp_path, url))
    assert verdict["status"] == "honoured" and verdict["probes"] == PROBE_ATTEMPTS


async def test_a_probe_request_that_fails_once_is_sent_again_not_reported_as_an_error(tmp_path: Path) -> None:
    """A backend that ignores the budget, whose first connection is reset and whose next answer
    is a 500 (llama-server reset the probe's connection at start-up in one suite run): the
    series sends those again and reads the budget as ignored (the failure was its verdict, and
    auto stayed native until the next probe). A backend that always fails is an error after
    ``PROBE_RETRIES`` more requests."""
    answers = iter(["reset", 500])

    async def chat(request: web.Request) -> web.StreamResponse:
        what = next(answers, 200)
        if what == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if what == 500:
            return web.json_response({"error": {"message": "busy"}}, status=500)
        return web.Response(body=sse(thinking(40)), content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        state = state_for(tmp_path, str(server.make_url("/v1")))
        verdict = await decided(state)
    finally:
        await server.close()
    assert verdict["status"] == "not_honoured" and verdict["reasoning_tokens"] == 40, verdict
    assert state.budget == "forced"
    calls: list[int] = []

    def failing(body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
        calls.append(1)
        return 500, []

    async with stub(failing) as url:
        verdict = await decided(state_for(tmp_path, url))
    assert verdict["status"] == "error" and len(calls) == PROBE_RETRIES + 1, (verdict, calls)


async def test_a_rejected_budget_is_forced_and_the_reasoning_in_tags_is_seen(tmp_path: Path) -> None:
    """The field answered 400 and the request without it 200, reasoning inside the content
    between the tags: auto picks forced, the probe says ``tags``."""

    def answer(body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
        if "thinking_token_budget" in body:
            return 400, []
        return 200, [{"content": "<think>"}, *({"content": " r"} for _ in range(20)), {"content": "</think>ok"}]

    async with stub(answer) as url:
        state = state_for(tmp_path, url)
        verdict = await decided(state)
    assert verdict["status"] == "rejected" and verdict["reasoning"] == "tags"
    assert state.budget == "forced" and "rejects thinking_token_budget (HTTP 400)" in state.budget_reason


async def test_a_total_count_dialect_is_never_forced_by_the_probe(tmp_path: Path) -> None:
    """``max_tokens`` bounds the whole answer, so a long answer says nothing of a reasoning
    budget: the mode stays native."""
    async with stub(lambda body: (200, [{"content": "x"}] * 30)) as url:
        state = state_for(tmp_path, url, dialect="llamacpp")
        verdict = await decided(state)
    assert verdict["status"] == "not_honoured" and verdict["reasoning"] == "none"
    assert state.budget == "native"


VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
"""


def test_engine_gauges_are_read_from_prometheus_text() -> None:
    """vLLM's gauges summed over their labels (one per engine core); a page without any known
    gauge is ``None``."""
    assert parse_gauges(VLLM_METRICS) == {"running": 5.0, "waiting": 4.0}
    assert parse_gauges("# TYPE other gauge\nother 1\n") is None


async def test_the_engines_own_queue_is_read_and_confirms_an_overload(tmp_path: Path) -> None:
    """A real llama-server with one slot, sent three requests straight (not through thinkcap):
    with ``engine_gauges_s`` thinkcap reads its ``requests_deferred`` from ``/metrics``, shows
    it (``thinkcap_engine_requests``, the replica's record) and counts it as waiting in the
    queue that confirms an overload, though its own count sees nothing in service."""
    server = start_llama_server(tmp_path, slots=1)
    try:
        path = write_config(tmp_path, server.url + "/v1", dialect="llama-server",
                            backend="thinks = false\nprobe = false\nengine_gauges_s = 0.1")  # fmt: skip
        state = build_state(load_settings(path))
        assert engine_waiting(state) == 0.0
        body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 200}
        async with create_app(state, "127.0.0.1", 0) as front, aiohttp.ClientSession() as s:
            sent = [asyncio.create_task(s.post(server.url + "/v1/chat/completions", json=body)) for _ in range(3)]
            replica = state.pool.replicas[0]
            for _ in range(200):
                if replica.engine is not None and replica.engine.get("waiting", 0) >= 1:
                    break
                await asyncio.sleep(0.05)
            assert replica.engine is not None and replica.engine["running"] == 1 and replica.engine["waiting"] >= 1
            assert state.pool.in_service == 0 and engine_waiting(state) >= 1
            async with s.get(front.make_url("/metrics")) as r:
                text = await r.text()
            assert 'thinkcap_engine_requests{replica="' in text and 'state="waiting"' in text
            for task in sent:
                (await task).close()
    finally:
        server.stop()
