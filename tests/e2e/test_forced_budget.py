"""Budget forcing on a real engine that thinks: llama-server with SmolLM2-135M under the
thinking template, its own budget off (``[backend] budget = "forced"`` writes no
``thinking_budget_tokens``), so thinkcap ends the reasoning itself at the cap and the model
answers after it. Reasoning counted by the server's own ``/tokenize``; the requests the
server ran counted from its log."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from thinkcap.proxy.app import create_app
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.state import ProxyState, build_state
from thinkcap.sim.llamacpp import Server, start_llama_server
from thinkcap.sim.sse import StreamedAnswer

#: Tokens past the cap the reasoning may hold: a delta that carried two tokens, or a tag piece.
SLACK = 2
CAPS = (8, 32, 128)
PROMPT = "count the legs of three spiders, step by step."

CONFIG = """
[objective]
latency_penalty = 0.01

[workload]
arrival_rate = 0.2

[backend]
url = {url}
dialect = "{dialect}"
slots = 1
probe = {probe}
budget = "{budget}"

[proxy]
default_type = "t8"

[controller]
enabled = false
{types}
"""

TYPE = """
[[types]]
name = "t{cap}"
prior = 0.25
max_tokens = 512
keywords = ["budget{cap}"]
accuracy = {{ base = 0.2, gain = 0.6, rate = 0.02 }}
service = {{ overhead_s = 0.05, per_token_s = 0.008 }}
"""
TYPE_CAPS = (*CAPS, 400)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Reasoning parsed into ``reasoning_content``."""
    s = start_llama_server(tmp_path_factory.mktemp("llama"), slots=1, thinking=True)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def server_in_content(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Reasoning left inside ``content`` between ``<think>`` and ``</think>``."""
    s = start_llama_server(tmp_path_factory.mktemp("llama"), slots=1, thinking=True, reasoning_format="none")
    try:
        yield s
    finally:
        s.stop()


def launched(server: Server) -> int:
    """Requests the server has started (one log line each)."""
    return server.log.read_text(errors="replace").count("launch_slot_")


@asynccontextmanager
async def proxied(
    url: str, tmp: Path, *, budget: str = "forced", dialect: str = "llama-server", probe: bool = False
) -> AsyncIterator[tuple[str, ProxyState]]:
    """``thinkcap serve`` in front of ``url``, the types' caps pinned; its chat URL and state."""
    path = tmp / "thinkcap.toml"
    text = CONFIG.format(url=url if url.startswith("[") else f'"{url}"', dialect=dialect, probe=str(probe).lower(),
                         budget=budget, types="".join(TYPE.format(cap=c) for c in TYPE_CAPS))  # fmt: skip
    if url.startswith("["):  # replicas: a batching engine's step, and a prefill per type
        text = text.replace("slots = 1\n", "slots = 1\nstep = { base_s = 0.007, per_seq_s = 0.008 }\n")
        text = text.replace("overhead_s = 0.05, per_token_s = 0.008", "prefill_s = 0.05")
    path.write_text(text)
    state = build_state(load_settings(path))
    state.caps.pin({f"t{c}": c for c in TYPE_CAPS})
    async with create_app(state, "127.0.0.1", 0) as front:
        yield str(front.make_url("/v1/chat/completions")), state


def body(cap: int, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"budget{cap}: {PROMPT}"}], "temperature": 0.0, **extra}


async def read_stream(
    url: str, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[str, str, list[dict[str, Any]]]:
    """The reasoning, the content and every event of a streamed answer, as a client reads them."""
    answer = StreamedAnswer()
    async with aiohttp.ClientSession() as s, s.post(url, json={**payload, "stream": True}, headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.content_type == "text/event-stream"
        async for line in r.content:
            answer.feed(line)
    return answer.reasoning, answer.content, answer.events


def request_event(logs: list[dict[str, Any]]) -> dict[str, Any]:
    (event,) = [e for e in logs if e["event"] == "request"]
    return event


@pytest.mark.parametrize("cap", CAPS)
async def test_forcing_bounds_the_reasoning_and_the_model_answers_after_it(
    server: Server, tmp_path: Path, cap: int
) -> None:
    """With the server's budget off, thinkcap cuts the streamed reasoning at the cap (the
    server's tokenizer counts at most cap + 2 tokens), continues, and the client gets an answer
    after the reasoning, as one stream. Where the model ends its reasoning first (it does near
    46 tokens here), nothing is forced and one request is sent."""
    async with proxied(server.url, tmp_path) as (url, _):
        before = launched(server)
        with capture_logs() as logs:
            reasoning, content, events = await read_stream(url, body(cap, max_tokens=cap + 48))
        event = request_event(logs)
    served = server.tokenize(reasoning)
    assert event["limit_field"] == "forced" and event["effective_limit"] == cap
    assert served <= cap + SLACK, (served, reasoning)
    assert abs(event["reasoning_tokens"] - served) <= 1, (event["reasoning_tokens"], served)
    forcing = event["forcing"]
    assert forcing["forced"] == forcing["second_sent"]
    if forcing["forced"]:  # cut at the cap (a tokenisation of the text may differ by one)
        assert served >= cap - 1, (forcing, served)
    assert launched(server) - before == (2 if forcing["forced"] else 1)
    assert content.strip(), "no answer after the reasoning"
    assert len({e["id"] for e in events}) == 1  # one answer, not two


async def test_a_whole_answer_is_one_answer_with_one_usage_for_both_requests(server: Server, tmp_path: Path) -> None:
    """A client that did not ask for a stream gets one ``chat.completion`` object: the reasoning
    (cut at the cap) in ``reasoning_content``, the continued answer in ``content``, and one
    usage that adds both requests' tokens and reports the reasoning count; a streaming client
    that asked for usage gets the same usage once, at the end."""
    async with proxied(server.url, tmp_path) as (url, _):
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as s, s.post(url, json=body(8, max_tokens=40)) as r:
                assert r.status == 200 and r.content_type == "application/json"
                whole = await r.json()
        event = request_event(logs)
        _, _, events = await read_stream(url, body(8, max_tokens=40, stream_options={"include_usage": True}))
    assert whole["object"] == "chat.completion" and len(whole["choices"]) == 1
    message = whole["choices"][0]["message"]
    assert server.tokenize(message["reasoning_content"]) <= 8 + SLACK and message["content"].strip()
    usage = whole["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 8 == event["reasoning_tokens"]
    assert usage["completion_tokens"] > 8 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert event["forcing"]["forced"] and event["stream"] is False
    usages = [e["usage"] for e in events if e.get("usage")]
    assert len(usages) == 1 and usages[0]["completion_tokens_details"]["reasoning_tokens"] == 8
    assert events[-1].get("usage") and not events[-1]["choices"]


@pytest.mark.parametrize("cap", (8, 32))
async def test_reasoning_inside_content_is_cut_between_the_tags(
    server_in_content: Server, tmp_path: Path, cap: int
) -> None:
    """A server that leaves the reasoning in ``content`` (``--reasoning-format none``): thinkcap
    counts the text after ``<think>``, cuts it at the cap, shows the client the reasoning
    closed with ``</think>`` (the server's echo of the prefill removed), and the answer follows
    it."""
    async with proxied(server_in_content.url, tmp_path) as (url, _):
        with capture_logs() as logs:
            reasoning, content, _ = await read_stream(url, body(cap, max_tokens=cap + 48))
        event = request_event(logs)
    assert reasoning == "" and content.lstrip().startswith("<think>")
    thought, _, answer = content.lstrip()[len("<think>") :].partition("</think>")
    assert event["forcing"]["forced"]  # the first </think> is thinkcap's cut (the model may write more)
    assert server_in_content.tokenize(thought.strip()) <= cap + SLACK, thought
    assert answer.strip(), content


async def test_a_reasoning_that_ends_before_the_cap_is_one_request(server: Server, tmp_path: Path) -> None:
    """The model ends its reasoning by itself below the cap: one upstream request, nothing
    forced, the answer as the server gives it directly. The cap is set above what the
    server, asked directly with no budget, thinks on the question (SmolLM2 thinks about 8
    tokens on it and stops)."""
    question = {"messages": [{"role": "user", "content": "What is 2+3?"}], "temperature": 0.0, "max_tokens": 150}
    direct, _, direct_events = await read_stream(server.url + "/v1/chat/completions", question)
    cap = server.tokenize(direct) + 16
    async with proxied(server.url, tmp_path) as (url, state):
        state.caps.pin({"t400": cap})
        before = launched(server)
        with capture_logs() as logs:
            reasoning, _, events = await read_stream(url, question, {"X-Thinkcap-Type": "t400"})
        event = request_event(logs)
    assert 0 < server.tokenize(reasoning) < cap
    assert event["forcing"] == {"cap": cap, "forced": False, "second_sent": False}
    finish = [[e["choices"][0]["finish_reason"] for e in evs if e["choices"]][-1] for evs in (events, direct_events)]
    assert finish[0] == finish[1] and reasoning == direct  # as the server answers it directly
    assert launched(server) - before == 1


async def test_a_client_gone_before_the_continuation_gets_no_second_request(server: Server, tmp_path: Path) -> None:
    """A client that hangs up during the reasoning: the first request is stopped and the
    continuation is never sent (the server ran one request)."""
    async with proxied(server.url, tmp_path) as (url, _):
        before = launched(server)
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as s:
                r = await s.post(url, json=body(128, max_tokens=200, stream=True))
                assert r.status == 200
                async for line in r.content:
                    if b"reasoning_content" in line:
                        break
                r.close()  # gone before the cap
            for _ in range(200):
                if any(e["event"] == "request" for e in logs):
                    break
                await asyncio.sleep(0.05)
        event = request_event(logs)
    assert event["status"] == 499 and event["error_kind"] == "client_disconnected"
    assert event["forcing"]["second_sent"] is False
    await asyncio.sleep(0.5)
    assert launched(server) - before == 1


@asynccontextmanager
async def first_only(target: Server) -> AsyncIterator[str]:
    """A loopback relay to ``target`` that carries the first connection and answers every later
    one with a 503 (thinkcap opens one connection per request to llama-server)."""
    port = int(target.url.rsplit(":", 1)[1])
    seen = 0

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        seen += 1
        if seen == 1:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            return
        await reader.readuntil(b"\r\n\r\n")
        error = b'{"error": {"message": "the model is unloading", "code": 503}}'
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(error)).encode() + b"\r\nConnection: close\r\n\r\n" + error)  # fmt: skip
        await writer.drain()
        writer.close()

    relay = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{relay.sockets[0].getsockname()[1]}"
    finally:
        relay.close()


@pytest.mark.parametrize("stream", (True, False))
async def test_a_failed_continuation_is_an_openai_error_and_the_log_says_so(
    server: Server, tmp_path: Path, stream: bool
) -> None:
    """The continuation fails (the server answers it 503): a streaming client's stream ends with
    an ``error`` event after the reasoning it got, a whole answer is a 502 error object, both
    coded ``forcing_failed``, and the request event carries the backend's answer."""
    async with first_only(server) as relay, proxied(relay, tmp_path) as (url, _):
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as s, s.post(url, json=body(8, max_tokens=40, stream=stream)) as r:
                raw = await r.read()
                status = r.status
        event = request_event(logs)
    assert event["error_kind"] == "forcing_failed" and "HTTP 503" in event["forcing"]["error"]
    assert event["forcing"]["second_sent"] is True
    if stream:
        assert status == 200
        events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
        assert any((e.get("choices") or [{}])[0].get("delta", {}).get("reasoning_content") for e in events)
        assert events[-1]["error"]["code"] == "forcing_failed" and b"[DONE]" not in raw
    else:
        assert status == 502 and json.loads(raw)["error"]["code"] == "forcing_failed"


async def wait_probe(state: ProxyState) -> None:
    for _ in range(1200):
        if state.probe["status"] != "pending":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the probe gave no verdict")


async def test_the_probe_keeps_a_native_budget_that_binds(server: Server, tmp_path: Path) -> None:
    """``budget = "auto"`` against llama-server (dialect llama-server): the probe sees
    ``thinking_budget_tokens`` honoured and the reasoning in ``reasoning_content``; the mode
    stays native, and ``/readyz`` says so and why."""
    async with proxied(server.url, tmp_path, budget="auto", probe=True) as (url, state):
        await wait_probe(state)
        async with aiohttp.ClientSession() as s, s.get(url.replace("/v1/chat/completions", "/readyz")) as r:
            ready = await r.json()
    assert state.probe["status"] == "honoured" and state.probe["reasoning"] == "reasoning_content", state.probe
    assert ready["budget"]["mode"] == "native" and "honoured" in ready["budget"]["reason"]


async def test_the_probe_forces_a_budget_the_backend_ignores(server: Server, tmp_path: Path) -> None:
    """``budget = "auto"`` with a budget field the server does not know (vLLM's
    ``thinking_token_budget``, which llama-server ignores): the probe sees the reasoning run
    past it, picks forced, says why in ``/readyz``, and the next request's reasoning is cut at
    its cap."""
    async with proxied(server.url, tmp_path, budget="auto", probe=True, dialect="vllm") as (url, state):
        await wait_probe(state)
        async with aiohttp.ClientSession() as s, s.get(url.replace("/v1/chat/completions", "/readyz")) as r:
            ready = await r.json()
        with capture_logs() as logs:
            reasoning, content, _ = await read_stream(url, body(8, max_tokens=40))
        event = request_event(logs)
    assert state.probe["status"] == "not_honoured" and state.probe["reasoning"] == "reasoning_content"
    assert ready["budget"]["mode"] == "forced" and "ignores thinking_token_budget" in ready["budget"]["reason"]
    assert event["forcing"]["forced"] and server.tokenize(reasoning) <= 8 + SLACK and content.strip()


async def test_a_refused_replica_hands_a_forced_request_to_the_next(server: Server, tmp_path: Path) -> None:
    """Two replicas, the first refusing connections: a forced request that picked it was never
    sent, so it goes to the other, is cut at its cap there and answered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    urls = f'["{dead}", "{server.url}"]'
    async with proxied(urls, tmp_path) as (url, _):
        with capture_logs() as logs:
            answers = [await read_stream(url, body(8, max_tokens=40)) for _ in range(2)]
        events = [e for e in logs if e["event"] == "request"]
    assert [e["status"] for e in events] == [200, 200] and all(e["forcing"]["forced"] for e in events)
    assert all(e["replica"] == server.url for e in events)
    assert all(server.tokenize(reasoning) <= 8 + SLACK and content.strip() for reasoning, content, _ in answers)
