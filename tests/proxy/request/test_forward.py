"""The request path through real HTTP: caps, classification, streaming, accounting, events."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from structlog.testing import capture_logs

from tests.proxy.conftest import StackFactory

HARD = [{"role": "user", "content": "<hard> please prove it"}]
EASY = [{"role": "user", "content": "<easy> say hello"}]


def requests_logged(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "request"]


async def test_sync_client_gets_an_answer_and_the_upstream_sees_the_cap_table(stack: StackFactory) -> None:
    """The official sync client works through the proxy; vLLM's budget equals the table's cap."""
    s = await stack()
    caps = s.state.caps.effective()

    def call() -> Any:
        with openai.OpenAI(base_url=s.url, api_key="k", max_retries=0) as c:
            return c.chat.completions.with_raw_response.create(model="m", messages=HARD)

    with capture_logs() as logs:
        raw = await asyncio.get_running_loop().run_in_executor(None, call)
    r = raw.parse()
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == min(400, caps["hard"])
    body = (await s.upstream_bodies())[-1]
    assert body["thinking_token_budget"] == caps["hard"]
    events = requests_logged(logs)
    assert len(events) == 1
    ev = events[0]
    assert ev["request_id"] == raw.headers["X-Request-Id"]
    assert ev["type"] == "hard" and ev["type_source"] == "rule" and ev["cap"] == caps["hard"]
    assert ev["status"] == 200 and ev["error_kind"] is None and ev["tokens_source"] == "usage"
    assert ev["reasoning_tokens"] == min(400, caps["hard"]) and ev["service_time_s"] <= ev["system_time_s"]
    assert "messages" not in ev and "prompt" not in ev


@pytest.mark.parametrize("asked", [False, True])
async def test_async_stream_passes_chunks_and_usage_only_when_asked(stack: StackFactory, asked: bool) -> None:
    """Streams arrive chunk by chunk; the usage chunk the proxy asked for is stripped unless the client asked."""
    s = await stack()
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if asked else {}
    with capture_logs() as logs:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as c:
            stream = await c.chat.completions.create(model="m", messages=EASY, stream=True, **extra)
            chunks = [ch async for ch in stream]
    usage_chunks = [ch for ch in chunks if ch.usage is not None]
    assert len(usage_chunks) == (1 if asked else 0)
    assert any(ch.choices and ch.choices[0].delta.content for ch in chunks)
    upstream = (await s.upstream_bodies())[-1]
    assert upstream["stream_options"] == {"include_usage": True}
    (ev,) = requests_logged(logs)
    cap = s.state.caps.cap("easy")
    assert ev["tokens_source"] == "usage" and ev["reasoning_tokens"] == min(50, cap)
    assert ev["stream"] is True and ev["first_byte_s"] <= ev["system_time_s"]


async def test_tokens_are_counted_from_deltas_without_usage(stack: StackFactory) -> None:
    """When the upstream ignores include_usage (as llama.cpp does), streamed deltas are counted."""
    s = await stack(chunk_tokens=1, stream_usage=False)
    with capture_logs() as logs:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as c:
            stream = await c.chat.completions.create(model="m", messages=HARD, stream=True)
            chunks = [ch async for ch in stream]
    content = sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content)
    (ev,) = requests_logged(logs)
    reasoning = min(400, s.state.caps.cap("hard"))
    assert ev["tokens_source"] == "stream"
    assert ev["reasoning_tokens"] == reasoning and ev["completion_tokens"] == reasoning + content == reasoning + 6


@pytest.mark.parametrize(
    ("dialect", "client", "check"),
    [
        ("vllm", {}, lambda b, cap: b["thinking_token_budget"] == cap),
        ("vllm", {"thinking_token_budget": 3}, lambda b, cap: b["thinking_token_budget"] == 3),
        ("sglang", {}, lambda b, cap: b["custom_params"] == {"thinking_budget": cap}),
        (
            "sglang",
            {"custom_params": {"thinking_budget": 2, "x": 1}},
            lambda b, cap: b["custom_params"] == {"thinking_budget": 2, "x": 1},
        ),
        ("openai", {}, lambda b, cap: b["max_completion_tokens"] == cap),
        ("openai", {"max_tokens": 5}, lambda b, cap: b["max_completion_tokens"] == 5 and b["max_tokens"] == 5),
        ("llamacpp", {}, lambda b, cap: b["max_tokens"] == max(1, cap)),
        ("llamacpp", {"max_tokens": 0}, lambda b, cap: b["max_tokens"] == max(1, cap)),
        ("llamacpp", {"max_completion_tokens": 4}, lambda b, cap: b["max_tokens"] == 4),
        ("max_tokens", {"max_tokens": 7}, lambda b, cap: b["max_tokens"] == 7),
    ],
)
async def test_each_dialect_writes_its_field_and_never_raises_a_client_limit(
    stack: StackFactory, dialect: str, client: dict[str, Any], check: Any
) -> None:
    """The cap lands in the dialect's field as min(client limit, cap)."""
    s = await stack(dialect=dialect)
    url = f"{s.url}/chat/completions"
    async with aiohttp.ClientSession() as session, session.post(url, json={"messages": HARD, **client}) as r:
        assert r.status == 200
    body = (await s.upstream_bodies())[-1]
    assert check(body, s.state.caps.cap("hard")), body


async def test_classification_sources(stack: StackFactory) -> None:
    """Header, body object (removed upstream), keyword, regex, classifier and default each decide."""
    s = await stack()
    cases = [
        ({"X-Thinkcap-Type": "easy"}, {"messages": HARD}, ("easy", "explicit")),
        ({}, {"messages": HARD, "thinkcap": {"type": "easy"}}, ("easy", "explicit")),
        ({}, {"messages": [{"role": "user", "content": "Prove Fermat"}]}, ("hard", "rule")),
        ({}, {"messages": [{"role": "user", "content": "the INTEGRAL of x"}]}, ("hard", "rule")),
        ({}, {"messages": [{"role": "user", "content": "solve the polynomial"}]}, ("hard", "classifier")),
        ({}, {"messages": [{"role": "user", "content": "tell a joke"}]}, ("easy", "classifier")),
        ({}, {"messages": [{"role": "user", "content": "zzz qqq"}]}, ("easy", "default")),
    ]
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            for headers, body, _ in cases:
                async with session.post(f"{s.url}/chat/completions", json=body, headers=headers) as r:
                    assert r.status == 200
    got = [(e["type"], e["type_source"]) for e in requests_logged(logs)]
    assert got == [want for _, _, want in cases]
    assert all("thinkcap" not in b for b in await s.upstream_bodies())
    assert s.state.classifier.cv_accuracy is not None


async def test_unknown_explicit_type_is_a_clear_400(stack: StackFactory) -> None:
    """An unknown type in the header or body is rejected naming the configured types."""
    s = await stack()
    async with aiohttp.ClientSession() as session:
        for kw in ({"headers": {"X-Thinkcap-Type": "poetry"}}, {}):
            body = {"messages": HARD} if kw else {"messages": HARD, "thinkcap": {"type": "poetry"}}
            async with session.post(f"{s.url}/chat/completions", json=body, **kw) as r:
                err = (await r.json())["error"]
                assert r.status == 400 and err["code"] == "unknown_type" and "hard, easy" in err["message"]
                assert err["request_id"] == r.headers["X-Request-Id"]


async def test_bad_bodies_are_answered_400_and_413(stack: StackFactory) -> None:
    """Non-JSON, non-object, bad client limits and oversized bodies get OpenAI-style errors."""
    s = await stack(proxy="max_body_bytes = 2048")
    url = f"{s.url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        for data, status, code in (
            (b"{oops", 400, "invalid_json"),
            (b"[1, 2]", 400, "invalid_body"),
            (json.dumps({"messages": HARD, "thinking_token_budget": -4}).encode(), 400, "invalid_limit"),
            (json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode(), 413, "body_too_large"),
        ):
            async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
                assert r.status == status
                assert (await r.json())["error"]["code"] == code


async def test_passthrough_routes_and_unknown_paths(stack: StackFactory) -> None:
    """Other /v1/ routes are forwarded as they are; paths outside /v1/ are the proxy's 404."""
    s = await stack()
    async with openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as c:
        models = await c.models.list()
    assert [m.id for m in models.data] == ["sim-reasoner"]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{s.url}/embeddings?x=1") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"  # the upstream's own 404
        async with session.get(s.proxy.make_url("/nowhere")) as r:
            assert r.status == 404 and "request_id" in (await r.json())["error"]


async def test_authorization_is_forwarded_or_replaced_and_never_logged(stack: StackFactory) -> None:
    """The client's key goes upstream unless [backend] api_key is set; no key appears in events."""
    for backend, want in (
        ("probe = false", "Bearer client-secret"),
        ('probe = false\napi_key = "backend-key"', "Bearer backend-key"),
    ):
        s = await stack(backend=backend)
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as session:
                headers = {"Authorization": "Bearer client-secret"}
                async with session.post(f"{s.url}/chat/completions", json={"messages": EASY}, headers=headers) as r:
                    assert r.status == 200
        assert (await s.upstream_seen())[-1]["authorization"] == want
        assert "secret" not in json.dumps(logs) and "backend-key" not in json.dumps(logs)


async def test_sync_stream_and_async_plain_clients(stack: StackFactory) -> None:
    """The sync client streams and the async client reads a plain answer, both with the table's cap."""
    s = await stack()

    def sync_stream() -> list[Any]:
        with openai.OpenAI(base_url=s.url, api_key="k", max_retries=0) as c:
            return list(c.chat.completions.create(model="m", messages=HARD, stream=True))

    chunks = await asyncio.get_running_loop().run_in_executor(None, sync_stream)
    reasoning = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning") or "" for ch in chunks if ch.choices)
    cap = s.state.caps.cap("hard")
    assert len(reasoning.split()) == min(400, cap)
    async with openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as c:
        r = await c.chat.completions.create(model="m", messages=EASY)
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == min(50, s.state.caps.cap("easy"))
    bodies = await s.upstream_bodies()
    assert [b["thinking_token_budget"] for b in bodies[-2:]] == [cap, s.state.caps.cap("easy")]


@pytest.mark.parametrize(
    ("dialect", "shape"),
    [("vllm", "openai"), ("sglang", "sglang"), ("vllm", "none"), ("llamacpp", "none")],
    ids=["vllm", "sglang top-level", "vllm before mid-2026", "llama.cpp"],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_each_servers_usage_shape_is_read_and_a_missing_count_stays_unknown(
    stack: StackFactory, dialect: str, shape: str, stream: bool
) -> None:
    """Reasoning tokens are read where each server writes them (SGLang: ``usage.reasoning_tokens``);
    a count the server does not send is unknown (``None``, counted as unknown in the metrics),
    never 0, unless streamed reasoning deltas can fill it."""
    s = await stack(dialect=dialect, usage_shape=shape, chunk_tokens=1)
    body: dict[str, Any] = {"messages": HARD, "stream": stream}
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{s.url}/chat/completions", json=body) as r:
                assert r.status == 200
                truth = int(r.headers["X-Sim-Reasoning-Tokens"])
                await r.read()
            await asyncio.sleep(0)
            async with session.get(s.proxy.make_url("/metrics")) as m:
                metrics = await m.text()
    (ev,) = requests_logged(logs)
    assert truth > 0
    if shape != "none":
        assert (ev["reasoning_tokens"], ev["reasoning_tokens_source"]) == (truth, "usage")
    elif stream:  # no count in usage: the streamed reasoning deltas give it
        assert (ev["reasoning_tokens"], ev["reasoning_tokens_source"]) == (truth, "stream")
    else:
        assert ev["reasoning_tokens"] is None and ev["reasoning_tokens_source"] is None
        assert 'thinkcap_token_counts_unknown_total{kind="reasoning",type="hard"} 1.0' in metrics
        if dialect == "vllm":  # nothing to learn from: feedback on it is refused, not read as 0 tokens
            assert s.state.recent[ev["request_id"]].reasoning_tokens is None


async def test_vllms_unlimited_thinking_budget_is_no_client_limit(stack: StackFactory) -> None:
    """A client's ``thinking_token_budget: -1`` (vLLM's "unlimited") is accepted and the cap applies."""
    s = await stack()
    body = {"messages": HARD, "thinking_token_budget": -1}
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session, session.post(f"{s.url}/chat/completions", json=body) as r:
            assert r.status == 200
    cap = s.state.caps.cap("hard")
    assert (await s.upstream_bodies())[-1]["thinking_token_budget"] == cap
    (ev,) = requests_logged(logs)
    assert ev["client_limit"] is None and ev["effective_limit"] == cap


async def test_request_times_are_measured_on_the_monotonic_clock(stack: StackFactory) -> None:
    """Arrival stamps fed to the estimators come from the monotonic clock, so a wall-clock step
    (NTP) can neither stop the estimators nor skew a latency; the wall clock stamps log lines only."""
    s = await stack()
    with capture_logs() as logs:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{s.url}/chat/completions", json={"messages": HARD}) as r,
        ):
            assert r.status == 200
        await asyncio.sleep(0)
    (ev,) = requests_logged(logs)
    assert abs(ev["arrival_time"] - time.monotonic()) < 60 and abs(ev["arrival_time"] - time.time()) > 3600
    assert s.state.estimators.snapshot(time.monotonic()).arrivals > 0


async def curl(url: str, body: Path, *headers: str) -> tuple[int, dict[str, Any]]:
    """POST ``body`` with the curl program; its HTTP status and the answer's JSON."""
    args = ["curl", "-sS", "-w", "\\n%{http_code}", "-H", "Content-Type: application/json"]
    for h in headers:
        args += ["-H", h]
    proc = await asyncio.create_subprocess_exec(
        *args, "--data-binary", f"@{body}", url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text, _, code = out.decode().rpartition("\n")
    return int(code), json.loads(text)


@pytest.mark.skipif(shutil.which("curl") is None, reason="make test installs curl; run through make")
async def test_curl_with_a_large_body_and_expect_then_two_clients_each_get_their_own_answer(
    stack: StackFactory, tmp_path: Path
) -> None:
    """curl's ``Expect: 100-continue`` with a 1.4 MiB body gets the proxy's own 100 and its final
    answer; the two clients after it each get theirs (told apart by the prompt's word count)."""
    s = await stack()
    url = f"{s.url}/chat/completions"
    sizes = (734_001, 2, 3)
    files = []
    for i, words in enumerate(sizes):
        f = tmp_path / f"body{i}.json"
        f.write_text(json.dumps({"messages": [{"role": "user", "content": " ".join(["w"] * words)}]}))
        files.append(f)
    assert files[0].stat().st_size > 1.4 * 1024 * 1024
    results = [await curl(url, files[0], "Expect: 100-continue")]
    results += [await curl(url, f) for f in files[1:]]
    assert [(code, r["usage"]["prompt_tokens"]) for code, r in results] == [(200, n) for n in sizes]
    assert [seen["expect"] for seen in await s.upstream_seen()] == [None] * 3  # Expect is the proxy's own
