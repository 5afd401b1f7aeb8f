"""Every failure behaviour of the proxy, each against a real misbehaving upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from structlog.testing import capture_logs

from tests.proxy.conftest import Stack, StackFactory, in_front_of, write_config
from tests.sim.conftest import make_scenario, sim_type
from thinkcap.cli.serve import listening
from thinkcap.proxy.app import DataPlane, create_app
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.state import ProxyState, build_state
from thinkcap.proxy.transport.server import StreamReply
from thinkcap.sim.backend import create_app as create_sim

HARD = [{"role": "user", "content": "<hard> prove it"}]


async def post(s: Stack, body: dict[str, Any], **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{s.url}/chat/completions", json=body, headers=headers) as r,
    ):
        return r.status, CIMultiDict(r.headers), await r.read()


def last_request(logs: list[dict[str, Any]]) -> dict[str, Any]:
    events = [e for e in logs if e["event"] == "request"]
    assert len(events) == 1
    return events[0]


async def test_refused_connection_is_502(stack: StackFactory) -> None:
    """An upstream that refuses connections gives 502 upstream_unreachable."""
    s = await stack(upstream="http://127.0.0.1:9/v1")
    with capture_logs() as logs:
        status, headers, raw = await post(s, {"messages": HARD})
    err = json.loads(raw)["error"]
    assert status == 502 and err["code"] == "upstream_unreachable" and err["request_id"] == headers["X-Request-Id"]
    assert last_request(logs)["error_kind"] == "upstream_unreachable"
    assert s.state.admission.in_flight == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_silence_beyond_the_read_timeout_is_504(stack: StackFactory, stream: bool) -> None:
    """A stall longer than read_timeout_s: 504 before any byte, or an error event mid-stream."""
    s = await stack(backend="probe = false\nread_timeout_s = 0.3")
    with capture_logs() as logs:
        status, _, raw = await post(s, {"messages": HARD, "stream": stream}, **{"X-Sim-Fault": "stall"})
    ev = last_request(logs)
    assert ev["status"] == 504 and ev["error_kind"] == "upstream_timeout"
    if stream:
        assert status == 200 and b'"code": "upstream_timeout"' in raw and raw.startswith(b"data: ")
    else:
        assert status == 504 and json.loads(raw)["error"]["code"] == "upstream_timeout"


async def test_total_timeout_when_configured(stack: StackFactory) -> None:
    """A configured total limit cuts a slow answer with 504."""
    s = await stack(
        backend="probe = false\ntotal_timeout_s = 0.2", time_scale=1.0, types=(sim_type("hard", natural=2000),)
    )
    status, _, raw = await post(s, {"messages": HARD})
    assert status == 504 and json.loads(raw)["error"]["code"] == "upstream_timeout"


async def test_upstream_errors_pass_through_with_their_body(stack: StackFactory) -> None:
    """An upstream 500 (and 400) reaches the client with the upstream's status and body."""
    s = await stack()
    with capture_logs() as logs:
        status, _, raw = await post(s, {"messages": HARD}, **{"X-Sim-Fault": "error"})
    assert status == 500 and json.loads(raw)["error"]["message"] == "simulated internal error"
    assert last_request(logs)["error_kind"] == "upstream_status"
    status, _, raw = await post(s, {"messages": []})
    assert status == 400 and json.loads(raw)["error"]["param"] == "messages"


@pytest.mark.parametrize("stream", [False, True])
async def test_malformed_upstream_answers_are_502(stack: StackFactory, stream: bool) -> None:
    """Unparsable JSON is 502; an unparsable SSE event ends the stream with an error event."""
    s = await stack()
    with capture_logs() as logs:
        status, _, raw = await post(s, {"messages": HARD, "stream": stream}, **{"X-Sim-Fault": "malformed"})
    ev = last_request(logs)
    assert ev["status"] == 502 and ev["error_kind"] == "upstream_malformed"
    if stream:
        assert status == 200 and b'"code": "upstream_malformed"' in raw.split(b"\n\n")[-2]
    else:
        assert status == 502 and "not a JSON object" in json.loads(raw)["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_dropped_upstream_connection_is_502(stack: StackFactory, stream: bool) -> None:
    """An upstream that hangs up mid-answer gives 502 (or an error event once streaming)."""
    s = await stack()
    with capture_logs() as logs:
        status, _, raw = await post(s, {"messages": HARD, "stream": stream}, **{"X-Sim-Fault": "drop"})
    ev = last_request(logs)
    assert ev["status"] == 502 and ev["error_kind"] == "upstream_disconnected"
    assert (status == 200 and b"upstream_disconnected" in raw) if stream else status == 502


async def test_client_disconnect_cancels_upstream_and_frees_the_slot(stack: StackFactory) -> None:
    """A client leaving mid-stream cancels the upstream request and frees the admission slot at once."""
    s = await stack(time_scale=1.0, types=(sim_type("hard", natural=4000), sim_type("easy", natural=10)))
    s.state.caps.pin({"hard": 4000})
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(f"{s.url}/chat/completions", json={"messages": HARD, "stream": True})
            assert (await resp.content.readline()).startswith(b"data: ")
            resp.close()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3.0)) as session:
            easy = {"messages": [{"role": "user", "content": "<easy> hi"}]}
            async with session.post(f"{s.url}/chat/completions", json=easy) as r:
                assert r.status == 200
    sim = await s.sim_state()
    assert sim["cancelled"] == 1 and sim["in_service"] == 0
    first = next(e for e in logs if e["event"] == "request")
    assert first["status"] == 499 and first["error_kind"] == "client_disconnected"
    assert s.state.admission.in_flight == 0


async def test_full_queue_is_429_and_shedding_is_503_with_retry_after(stack: StackFactory) -> None:
    """Beyond max_queue waiting requests the proxy answers 429; while shedding, 503; both say when to retry."""
    s = await stack(
        proxy="max_queue = 1\nretry_after_s = 3",
        time_scale=1.0,
        types=(sim_type("hard", natural=300), sim_type("easy")),
    )
    s.state.caps.pin({"hard": 300})
    results = await asyncio.gather(*(post(s, {"messages": HARD}) for _ in range(3)))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 200, 429]
    rejected = next(r for r in results if r[0] == 429)
    assert rejected[1]["Retry-After"] == "3" and json.loads(rejected[2])["error"]["code"] == "queue_full"
    s.state.shedding, s.state.admit_fraction = True, 0.0
    status, headers, raw = await post(s, {"messages": HARD})
    assert status == 503 and headers["Retry-After"] == "3" and json.loads(raw)["error"]["code"] == "overloaded"


async def test_graceful_shutdown_drains_in_flight_requests(stack: StackFactory) -> None:
    """Stopping the server lets an answer in progress finish before the listener goes away."""
    s = await stack(time_scale=1.0, types=(sim_type("hard", natural=500), sim_type("easy")))
    settings = s.state.settings.with_proxy(port=0, admin_port=0, drain_timeout_s=10.0)
    state = build_state(settings)
    state.caps.pin({"hard": 500})  # 0.1 + 0.506 s of service
    async with listening(state) as (plane, port, _), aiohttp.ClientSession() as session:
        task = asyncio.create_task(
            session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"messages": HARD})
        )
        while state.admission.in_flight == 0:
            await asyncio.sleep(0.01)
        await plane.close()  # what leaving the block does (closing twice is harmless)
        resp = await task
        assert resp.status == 200
        assert (await resp.json())["usage"]["completion_tokens_details"]["reasoning_tokens"] == 500


async def probed(tmp: Path, url: str) -> tuple[DataPlane, ProxyState, list[dict[str, Any]]]:
    """A proxy with the start-up probe on, in front of ``url``, once the probe has a verdict; its log."""
    state = build_state(load_settings(write_config(tmp, url, backend="probe = true")))
    front = create_app(state)
    with capture_logs() as logs:
        await front.start("127.0.0.1", 0)
        for _ in range(500):
            if state.probe["status"] != "pending":
                break
            await asyncio.sleep(0.01)
    return front, state, logs


async def test_probe_warns_when_the_backend_ignores_the_cap() -> None:
    """A backend that ignores the cap makes the start-up probe warn and /readyz report it."""

    async def ignore_caps(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": 3,
                    "completion_tokens": 500,
                    "completion_tokens_details": {"reasoning_tokens": 480},
                },
            }
        )

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "stubborn"}]})

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", ignore_caps)
    upstream.router.add_get("/v1/models", models)
    up = TestServer(upstream, host="127.0.0.1")
    await up.start_server()
    with tempfile.TemporaryDirectory() as tmp:
        front, state, logs = await probed(Path(tmp), str(up.make_url("/v1")))
    try:
        assert state.probe["status"] == "not_honoured" and state.probe["reasoning_tokens"] == 480
        warn = [e for e in logs if e["event"] == "probe"]
        assert warn and warn[0]["log_level"] == "warning"
        async with aiohttp.ClientSession() as session, session.get(front.make_url("/readyz")) as r:
            assert r.status == 200 and (await r.json())["probe"]["status"] == "not_honoured"
    finally:
        await front.close()
        await up.close()


async def test_probe_retries_until_the_backend_comes_up(tmp_path: Path) -> None:
    """A backend that starts after the proxy is probed once it answers; the verdict replaces the error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = load_settings(write_config(tmp_path, f"http://127.0.0.1:{port}/v1", backend="probe = true"))
    state = build_state(settings)
    front = create_app(state)
    await front.start("127.0.0.1", 0)
    sim = TestServer(create_sim(make_scenario()), host="127.0.0.1", port=port)
    try:
        for _ in range(200):
            if state.probe["status"] == "error":
                break
            await asyncio.sleep(0.01)
        assert state.probe["status"] == "error"
        await sim.start_server()
        for _ in range(500):
            if state.probe["status"] != "error":
                break
            await asyncio.sleep(0.01)
        assert state.probe["status"] == "honoured" and state.probe["field"] == "thinking_token_budget"
    finally:
        await front.close()
        await sim.close()


async def test_passthrough_cut_mid_body_reaches_the_client_as_a_cut(stack: StackFactory) -> None:
    """An upstream that drops a pass-through answer halfway makes the client see a broken body."""

    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\n{\"dat\r\n")  # fmt: skip
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(half, "127.0.0.1", 0)
    try:
        s = await stack(upstream=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1")
        async with aiohttp.ClientSession() as session, session.get(f"{s.url}/models") as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    finally:
        server.close()
        await server.wait_closed()


async def test_the_first_event_leaves_before_the_rest_of_a_long_read_is_inspected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An upstream that sends a whole stream and its end in one write: the proxy's first write
    carries the head and the first event only, and the rest leaves with the end of the answer,
    in one more write; the client gets every event, in order."""
    events = [b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n']
    events += [b'data: {"choices": [{"delta": {"content": "t%d"}}]}\n\n' % i for i in range(64)]
    events.append(b"data: [DONE]\n\n")

    async def all_at_once(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write_eof(b"".join(events))  # the data and the last chunk in one write
        return resp

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", all_at_once)
    writes: list[tuple[str, bytes]] = []
    prepare, write, write_eof = StreamReply.prepare, StreamReply.write, StreamReply.write_eof

    async def spy_prepare(self: StreamReply, request: Any, first: bytes = b"") -> None:
        writes.append(("prepare", first))
        await prepare(self, request, first)

    async def spy_write(self: StreamReply, data: bytes) -> None:
        writes.append(("write", data))
        await write(self, data)

    async def spy_write_eof(self: StreamReply, last: bytes = b"") -> None:
        writes.append(("write_eof", last))
        await write_eof(self, last)

    monkeypatch.setattr(StreamReply, "prepare", spy_prepare)
    monkeypatch.setattr(StreamReply, "write", spy_write)
    monkeypatch.setattr(StreamReply, "write_eof", spy_write_eof)
    async with in_front_of(upstream, tmp_path) as (_, front):
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with (
            aiohttp.ClientSession() as session,
            session.post(front.make_url("/v1/chat/completions"), json=body) as r,
        ):
            assert r.status == 200
            got = await r.read()
    assert writes == [("prepare", events[0]), ("write_eof", b"".join(events[1:]))]
    assert got == b"".join(events)


async def test_a_backend_that_rejects_the_cap_field_is_shown_and_gets_requests_without_it(tmp_path: Path) -> None:
    """vLLM without a reasoning configuration answers 400 to ``thinking_token_budget``: the probe
    shows the backend's error and what to configure (log and /readyz), stops retrying fast, and
    requests go upstream without the field (answered, not 400) until a probe passes."""
    sim = TestServer(create_sim(make_scenario(thinking_budget_supported=False)), host="127.0.0.1")
    await sim.start_server()
    front, state, logs = await probed(tmp_path, str(sim.make_url("/v1")))
    try:
        probe = state.probe
        assert probe["status"] == "rejected" and probe["http_status"] == 400
        assert "reasoning is not configured" in probe["backend_error"] and "--reasoning-config" in probe["advice"]
        (event,) = [e for e in logs if e["event"] == "probe"]
        assert event["log_level"] == "error" and event["backend_error"] == probe["backend_error"]
        async with aiohttp.ClientSession() as session:
            async with session.get(front.make_url("/readyz")) as r:
                ready = await r.json()
            assert ready["probe"]["advice"] == probe["advice"] and ready["caps_applied"] is False
            url = front.make_url("/v1/chat/completions")
            async with session.post(url, json={"messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200
        async with aiohttp.ClientSession() as session, session.get(sim.make_url("/sim/requests")) as r:
            seen = await r.json()
        assert "thinking_token_budget" not in seen[-1]["body"]
    finally:
        await front.close()
        await sim.close()


@asynccontextmanager
async def behind_raw(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], tmp: Path, backend: str = ""
) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A proxy (the test config) in front of a raw TCP upstream; yields the proxy's ``/v1`` URL
    and the request heads the upstream received."""
    heads: list[bytes] = []
    writers: set[asyncio.StreamWriter] = set()

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.add(w)
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(v)
                        for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n"))
                        if k.lower() == b"content-length"
                    ),
                    0,
                )
                await r.readexactly(length)
                heads.append(head)
                await handler(r, w)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state = build_state(
        load_settings(write_config(tmp, f"http://127.0.0.1:{port}/v1", backend="probe = false\n" + backend))
    )
    async with create_app(state, "127.0.0.1", 0) as front:
        yield str(front.make_url("/v1")), heads
        server.close()
        for w in writers:  # closed before the test's event loop ends, so none is left to the collector
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()


async def raw_post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, CIMultiDict[str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/chat/completions", json=body, headers=headers) as r,
    ):
        return r.status, CIMultiDict(r.headers), await r.read()


async def test_an_invalid_upstream_status_line_is_502(tmp_path: Path) -> None:
    """An upstream status line llhttp refuses is a 502 upstream_malformed, not a 500."""

    async def bad(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 2x0 Fine\r\nContent-Length: 2\r\n\r\n{}")
        await w.drain()

    async with behind_raw(bad, tmp_path) as (url, _):
        status, _, raw = await raw_post(url, {"messages": HARD})
    assert status == 502 and json.loads(raw)["error"]["code"] == "upstream_malformed"


async def test_an_upstream_that_dies_mid_generation_is_502_and_runs_the_request_once(tmp_path: Path) -> None:
    """A request the upstream received on a pooled connection is never sent again."""
    calls = []

    async def dies_on_second(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionError  # the connection closes with no answer
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        await w.drain()

    async with behind_raw(dies_on_second, tmp_path) as (url, heads):
        assert (await raw_post(url, {"messages": HARD}))[0] == 200
        status, _, raw = await raw_post(url, {"messages": HARD})
        await asyncio.sleep(0.05)
    assert status == 502 and json.loads(raw)["error"]["code"] == "upstream_disconnected"
    assert len(heads) == 2


async def test_a_whole_answer_over_max_answer_bytes_is_502(tmp_path: Path) -> None:
    """A non-streamed answer larger than ``[backend] max_answer_bytes`` is a 502, not buffered whole."""

    async def huge(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        body = b'{"pad": "' + b"x" * 300_000 + b'"}'
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await w.drain()

    async with behind_raw(huge, tmp_path, "max_answer_bytes = 100000") as (url, _):
        status, _, raw = await raw_post(url, {"messages": HARD})
    assert status == 502 and json.loads(raw)["error"]["code"] == "upstream_too_large"


async def test_a_stream_that_ends_without_done_gets_an_error_event(tmp_path: Path) -> None:
    """A read-to-close stream cut before ``[DONE]`` ends with an ``error`` event, not a clean end."""
    event = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'

    async def cut(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + event)
        await w.drain()
        raise ConnectionError  # closes: the end of a read-to-close body

    with capture_logs() as logs:
        async with behind_raw(cut, tmp_path) as (url, _):
            status, _, raw = await raw_post(url, {"messages": HARD, "stream": True})
            await asyncio.sleep(0)
    assert status == 200 and raw.startswith(event)
    last = raw.strip().split(b"\n\n")[-1]
    assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "upstream_truncated"
    assert last_request(logs)["error_kind"] == "upstream_truncated"


async def test_a_request_nested_too_deeply_is_400(stack: StackFactory) -> None:
    """100,000 nested brackets are a 400 invalid_json, not a 500."""
    s = await stack()
    async with aiohttp.ClientSession() as session:
        for doc in (b"[" * 100_000, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
            async with session.post(f"{s.url}/chat/completions", data=doc) as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"


async def test_feedback_is_keyed_by_the_proxys_own_request_id(stack: StackFactory) -> None:
    """Two clients sending the same ``X-Request-Id`` get different ids of thinkcap's, and feedback
    reaches each one's own answer only by thinkcap's id."""
    s = await stack()
    with capture_logs() as logs:
        ids = [(await post(s, {"messages": HARD}, **{"X-Request-Id": "same"}))[1]["X-Request-Id"] for _ in range(2)]
        await asyncio.sleep(0)
    assert len(set(ids)) == 2 and "same" not in ids
    assert [e["client_request_id"] for e in logs if e["event"] == "request"] == ["same", "same"]
    async with aiohttp.ClientSession() as session:
        fb = s.admin.make_url("/admin/feedback")
        async with session.post(fb, json={"request_id": "same", "correct": True}) as r:
            assert r.status == 404
        async with session.post(fb, json={"request_id": ids[0], "correct": True}) as r:
            assert r.status == 200
