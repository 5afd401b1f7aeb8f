"""Hypothesis-generated requests: no JSON body gets a 500, and no client ever gets another client's answer."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.proxy.conftest import write_config
from tests.sim.conftest import make_scenario
from thinkcap.proxy.app import DataPlane, create_app
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.state import build_state
from thinkcap.sim.backend import create_app as create_sim

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


@contextmanager
def in_background(up: Callable[[], Awaitable[tuple[DataPlane, Callable[[], Awaitable[None]]]]]) -> Iterator[int]:
    """Run ``up`` (which starts an upstream and a proxy in front of it, and returns the proxy and
    how to stop the upstream) in an event loop of its own thread; yields the proxy's port."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def start() -> None:
        box["front"], box["stop"] = await up()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), ready.set(), loop.run_forever()))
    thread.start()
    ready.wait(30)
    try:
        yield int(box["front"].port)
    finally:

        async def down() -> None:
            await box["front"].close()
            await box["stop"]()

        asyncio.run_coroutine_threadsafe(down(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@pytest.fixture(scope="module", params=["vllm", "sglang", "openai", "llamacpp"])
def proxy_port(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A simulated server and a proxy in a background event loop; yields the proxy's port."""

    async def up() -> tuple[DataPlane, Callable[[], Awaitable[None]]]:
        sim = TestServer(create_sim(make_scenario()), host="127.0.0.1")
        await sim.start_server()
        path: Path = write_config(
            tmp_path_factory.mktemp("fuzz"), str(sim.make_url("/v1")), dialect=request.param, backend="probe = false"
        )
        front = create_app(build_state(load_settings(path)))
        await front.start("127.0.0.1", 0)
        return front, sim.close

    with in_background(up) as port:
        yield port


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


#: How the echoing upstream misbehaves, chosen per request by the header ``X-Fuzz-Upstream``.
MISBEHAVIOURS = ("plain", "interim-100", "hints-103", "bytes-after", "negative-length", "two-lengths")
#: Pieces that make random bytes look like requests more often than random bytes do.
FRAGMENTS = [b"\r\n", b"\r\n\r\n", b"POST /v1/chat/completions HTTP/1.1\r\n", b"Content-Length: 5\r\n",
             b"Transfer-Encoding: chunked\r\n", b"Expect: 100-continue\r\n", b"5\r\nhello\r\n", b"0\r\n",
             b"X-Fuzz-Upstream: bytes-after\r\n", b'{"messages": [{"role": "user", "content": "m"}]}']  # fmt: skip


async def echo_upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Answer each request with its prompt (the client's marker), misbehaving as asked."""
    try:
        while True:
            head = (await r.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            fields = dict(line.partition(": ")[::2] for line in head.split("\r\n")[1:] if line)
            body = await r.readexactly(int(fields.get("content-length", "0")))
            marker = json.loads(body)["messages"][0]["content"]
            answer = json.dumps({"choices": [{"index": 0, "message": {"content": marker}, "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()  # fmt: skip
            kind = fields.get("x-fuzz-upstream", "plain")
            length = {"negative-length": b"-1", "two-lengths": b"%d\r\nContent-Length: 7" % len(answer)}.get(
                kind, b"%d" % len(answer)
            )
            before = {"interim-100": b"HTTP/1.1 100 Continue\r\n\r\n",
                      "hints-103": b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"}.get(kind, b"")  # fmt: skip
            after = b'HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{"x": 1}' if kind == "bytes-after" else b""
            w.write(before + b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + length
                    + b"\r\n\r\n" + answer + after)  # fmt: skip
            await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, KeyError, IndexError, TypeError):
        pass
    finally:
        w.close()


@pytest.fixture(scope="module")
def echo_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The proxy in front of :func:`echo_upstream`, in a background event loop; yields its port."""

    async def up() -> tuple[DataPlane, Callable[[], Awaitable[None]]]:
        server = await asyncio.start_server(echo_upstream, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        path = write_config(tmp_path_factory.mktemp("echo"), url, dialect="openai", backend="probe = false",
                            proxy="max_concurrency = 64")  # fmt: skip
        front = create_app(build_state(load_settings(path)))
        await front.start("127.0.0.1", 0)

        async def stop() -> None:
            server.close()

        return front, stop

    with in_background(up) as port:
        yield port


async def answers(reader: asyncio.StreamReader, count: int | None = None) -> list[tuple[int, bytes]]:
    """The final answers on a connection (interim 100s skipped): ``count`` of them, or until it closes."""
    out: list[tuple[int, bytes]] = []
    while count is None or len(out) < count:
        try:
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1").split("\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return out
        status = int(head[0].split(" ")[1])
        if status == 100:
            continue
        fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        out.append((status, await reader.readexactly(int(fields.get("content-length", "0")))))
        if fields.get("connection") == "close":
            return out
    return out


request_plans = st.lists(
    st.tuples(
        st.lists(st.sampled_from(MISBEHAVIOURS), min_size=1, max_size=3),  # pipelined on one connection
        st.booleans(),  # Expect: 100-continue
        st.lists(st.one_of(st.binary(max_size=48), st.sampled_from(FRAGMENTS)), max_size=6),  # junk first
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plans=request_plans)
def test_no_byte_sequence_gives_one_client_another_clients_answer(echo_proxy: int, plans: Any) -> None:
    """Clients send well-formed requests (pipelined, with or without ``Expect``) each carrying a
    unique marker the upstream echoes, while junk bytes arrive on other connections and the
    upstream sends interim answers, bytes after its answers or invalid framing: every answer a
    client gets is its own (its marker, in order) or an error; no marker ever reaches another
    connection."""
    counter = itertools.count()

    async def scenario() -> None:
        markers = [[f"marker-{next(counter)}-{uuid.uuid4().hex}" for _ in kinds] for kinds, _, _ in plans]

        async def client(mine: list[str], kinds: list[str], expect: bool, junk: list[bytes]) -> list[tuple[int, bytes]]:
            if junk:  # on a connection of its own
                jr, jw = await asyncio.open_connection("127.0.0.1", echo_proxy)
                jw.write(b"".join(junk))
                jw.write_eof()
                junk_answers = await answers(jr)
                jw.close()
                assert not any(b"marker-" in body for _, body in junk_answers)
            reader, writer = await asyncio.open_connection("127.0.0.1", echo_proxy)
            for marker, kind in zip(mine, kinds, strict=True):
                body = json.dumps({"messages": [{"role": "user", "content": marker}]}).encode()
                extra = "Expect: 100-continue\r\n" if expect else ""
                head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                        f"X-Fuzz-Upstream: {kind}\r\n{extra}\r\n")  # fmt: skip
                writer.write(head.encode() + body)
            got = await answers(reader, len(kinds))  # (a half-close would read as a client gone away)
            writer.close()
            assert len(got) == len(kinds)
            for (status, body), marker, kind in zip(got, mine, kinds, strict=True):
                if kind in ("negative-length", "two-lengths"):
                    assert status == 502, (kind, status, body[:200])
                else:
                    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == marker, kind
            return got

        results = await asyncio.gather(*(client(m, *plan) for m, plan in zip(markers, plans, strict=True)))
        for i, got in enumerate(results):
            others = [m for j, ms in enumerate(markers) if j != i for m in ms]
            assert not any(m.encode() in body for _, body in got for m in others)

    asyncio.run(scenario())
