"""The proxy's keep-alive HTTP/1.1 client against raw loopback servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from multidict import CIMultiDict

from thinkcap.proxy.transport.client import Upstream, UpstreamError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[str, list[int]]]]]:
    """Start a raw TCP server; yields its base URL and a list counting its connections."""
    servers: list[asyncio.Server] = []
    writers: set[asyncio.StreamWriter] = set()

    async def start(handler: Handler) -> tuple[str, list[int]]:
        connections = [0]

        async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            writers.add(w)
            connections[0] += 1
            try:
                await handler(r, w)
            finally:
                w.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1", connections

    yield start
    for s in servers:
        s.close()
        await s.wait_closed()
    for w in writers:  # closed before the test's event loop ends, so none is left to the collector
        w.close()
        with contextlib.suppress(ConnectionError):
            await w.wait_closed()


async def read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return head + await r.readexactly(length)


def hdrs() -> CIMultiDict[str]:
    return CIMultiDict({"Content-Type": "application/json"})


async def test_keep_alive_reuses_one_connection_and_sends_the_prefix(
    raw_server: Callable[..., Awaitable[tuple[str, list[int]]]],
) -> None:
    """Three requests share one connection; the base URL's path prefixes the route; Host is set."""
    seen: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                seen.append(await read_request(r))
            except asyncio.IncompleteReadError:
                return
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")

    url, conns = await raw_server(handler)
    up = Upstream(url)
    for _ in range(3):
        async with await up.request("POST", "/chat/completions?x=1", hdrs(), b'{"a": 1}') as resp:
            assert resp.status == 200 and await resp.read() == b"{}" and resp.content_type == "application/json"
    await up.close()
    assert conns[0] == 1 and len(seen) == 3
    assert seen[0].startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert seen[0].endswith(b'Content-Length: 8\r\n\r\n{"a": 1}')


async def test_chunked_and_read_to_close_bodies(raw_server: Callable[..., Awaitable[tuple[str, list[int]]]]) -> None:
    """Chunked bodies (with extensions and trailers) arrive as they are sent; a body without length reads to close."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_request(r)
        if b"/chunked" in req:
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n")
            await w.drain()
            await asyncio.sleep(0.05)  # the second chunk comes later: the first is not held back
            w.write(b"6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n")
            await w.drain()
            await read_request(r)  # the connection was reused for a second request
            w.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await w.drain()

    url, conns = await raw_server(handler)
    up = Upstream(url)
    async with await up.request("POST", "/chunked", hdrs(), b"") as resp:
        assert [c async for c in resp.iter_chunks()] == [b"hello", b" world"]
    async with await up.request("POST", "/chunked", hdrs(), b"") as resp:
        assert resp.status == 204 and await resp.read() == b""
    await asyncio.sleep(0.05)  # the server has closed the pooled connection: it is dropped, not used
    async with await up.request("POST", "/close", hdrs(), b"") as resp:
        assert await resp.read() == b"until the end"
    await up.close()
    assert conns[0] == 2


async def test_pieces_arrive_as_read_and_complete_is_set_with_the_piece_that_ends_the_body(
    raw_server: Callable[..., Awaitable[tuple[str, list[int]]]],
) -> None:
    """A piece is handed out as soon as its bytes are read (a later part is not waited for);
    ``complete`` is true once the body's end has been read, and after a read-to-close body
    only when the connection closed."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for _ in range(5):
            req = await read_request(r)
            if b"/many" in req:
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n1\r\nb\r\n1\r\nc\r\n0\r\n\r\n")
            elif b"/single" in req:
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n")
            elif b"/together" in req:
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                await w.drain()
                await asyncio.sleep(0.05)
                w.write(b"6\r\n world\r\n0\r\n\r\n")
            elif b"/apart" in req:
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                await w.drain()
                await asyncio.sleep(0.05)
                w.write(b"0\r\n\r\n")
            else:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc")
                await w.drain()
                await asyncio.sleep(0.05)
                w.write(b"de")
            await w.drain()
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end")
        await w.drain()

    url, _ = await raw_server(handler)
    up = Upstream(url)
    for path, first, body in (
        ("/many", b"abc", b"abc"),
        ("/single", b"a", b"a"),
        ("/together", b"hello", b"hello world"),  # the first part was handed out before the rest was sent
        ("/apart", b"hello", b"hello"),
        ("/length", b"abc", b"abcde"),
        ("/close", b"to the end", b"to the end"),
    ):
        async with await up.request("POST", path, hdrs(), b"") as resp:
            if path in ("/together", "/apart", "/length"):  # their ends come 50 ms after the head
                assert not resp.complete
            pieces = [(piece, resp.complete) async for piece in resp.iter_chunks()]
            assert pieces[0][0] == first and b"".join(p for p, _ in pieces) == body, path
            assert resp.complete
            if path in ("/many", "/single"):
                assert pieces == [(body, True)], path  # the end came with the only read
    await up.close()


async def test_a_connection_closed_while_idle_is_not_used_again(
    raw_server: Callable[..., Awaitable[tuple[str, list[int]]]],
) -> None:
    """The server drops a pooled connection; the next request goes out on a fresh one."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        # then close without Connection: close, as a keep-alive timeout does

    url, conns = await raw_server(handler)
    up = Upstream(url)
    for _ in range(2):
        async with await up.request("POST", "/x", hdrs(), b"") as resp:
            assert await resp.read() == b"ok"
        await asyncio.sleep(0.05)
    await up.close()
    assert conns[0] == 2


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (b"SPDY/9 200 OK\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "disconnected"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200", "disconnected"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nx", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", "malformed"),
        (b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", "malformed"),
    ],
)
async def test_broken_answers_are_named(
    raw_server: Callable[..., Awaitable[tuple[str, list[int]]]], reply: bytes, kind: str
) -> None:
    """Bad status lines, header lines, chunk sizes, lengths (negative, two, beside chunked) and short
    bodies raise UpstreamError of the right kind (llhttp's refusals are ``malformed``)."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(reply)
        await w.drain()

    url, _ = await raw_server(handler)
    up = Upstream(url)
    with pytest.raises(UpstreamError) as err:
        async with await up.request("POST", "/x", hdrs(), b"") as resp:
            await resp.read()
    assert err.value.kind == kind
    await up.close()


async def test_unreachable_and_read_timeout() -> None:
    """A refused connection is ``unreachable``; silence beyond the read timeout is a TimeoutError."""
    up = Upstream("http://127.0.0.1:9")
    with pytest.raises(UpstreamError) as err:
        await up.request("POST", "/x", hdrs(), b"")
    assert err.value.kind == "unreachable"
    await up.close()

    release = asyncio.Event()

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await release.wait()
        w.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        slow = Upstream(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", read_timeout_s=0.2)
        with pytest.raises(TimeoutError):
            await slow.request("POST", "/x", hdrs(), b"")
        await slow.close()
    finally:
        release.set()
        server.close()
        await server.wait_closed()
    with pytest.raises(ValueError, match="http"):
        Upstream("ftp://example.org")


async def test_a_read_timeout_covers_the_head_and_each_body_read_and_then_lets_go(
    raw_server: Callable[..., Awaitable[tuple[str, list[int]]]],
) -> None:
    """One deadline per response: a slow head or a slow body read times out, and after a
    response is done its deadline never cancels the task that read it."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            path = (await read_request(r)).split(b" ")[1]
            if path.endswith(b"/slow-head"):
                await asyncio.sleep(1.0)
                return
            if path.endswith(b"/empty"):
                w.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                continue
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
            await w.drain()
            if path.endswith(b"/slow-body"):
                await asyncio.sleep(1.0)
                return
            w.write(b"cd")

    base, _ = await raw_server(handler)
    up = Upstream(base, read_timeout_s=0.2)
    async with await up.request("POST", "/fine", hdrs(), b"") as resp:
        assert await resp.read() == b"abcd"
    await asyncio.sleep(0.5)  # past the deadline: the finished response's timer must be gone
    async with await up.request("POST", "/empty", hdrs(), b"") as resp:
        assert resp.status == 204 and await resp.read() == b""
        await asyncio.sleep(0.5)  # held open with nothing left to read: no read is timed
    with pytest.raises(TimeoutError):
        await up.request("POST", "/slow-head", hdrs(), b"")
    with pytest.raises(TimeoutError):
        async with await up.request("POST", "/slow-body", hdrs(), b"") as resp:
            await resp.read()
    await asyncio.sleep(0.5)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await up.close()


async def answer_each(r: asyncio.StreamReader, w: asyncio.StreamWriter, before: bytes, after: bytes) -> None:
    """Answer every request on the connection with its own path in the body, ``before`` the
    answer and ``after`` it."""
    while True:
        try:
            path = (await read_request(r)).split(b" ")[1]
        except asyncio.IncompleteReadError:
            return
        w.write(before + b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(path), path) + after)
        await w.drain()


@pytest.mark.parametrize(
    "before",
    [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"],
    ids=["100", "103"],
)
async def test_interim_answers_are_skipped_and_each_request_gets_its_own_answer(
    raw_server: Callable[..., Awaitable[tuple[str, list[int]]]], before: bytes
) -> None:
    """An interim 1xx before each answer is consumed, never returned: every request on the one
    pooled connection reads its own final answer."""
    url, conns = await raw_server(lambda r, w: answer_each(r, w, before, b""))
    up = Upstream(url)
    for path in ("/a", "/b", "/c"):
        async with await up.request("POST", path, hdrs(), b"{}") as resp:
            assert resp.status == 200 and await resp.read() == b"/v1" + path.encode()
    await up.close()
    assert conns[0] == 1


async def test_a_connection_with_bytes_after_the_answer_is_not_reused(
    raw_server: Callable[..., Awaitable[tuple[str, list[int]]]],
) -> None:
    """Bytes after a Content-Length body (here a whole forged answer) close the connection:
    the next request goes out on a new one and reads its own answer."""
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
    url, conns = await raw_server(lambda r, w: answer_each(r, w, b"", forged))
    up = Upstream(url)
    for path in ("/a", "/b", "/c"):
        async with await up.request("POST", path, hdrs(), b"{}") as resp:
            assert await resp.read() == b"/v1" + path.encode()
        await asyncio.sleep(0.01)
    await up.close()
    assert conns[0] == 3


async def test_a_request_the_upstream_received_is_never_sent_again(
    raw_server: Callable[..., Awaitable[tuple[str, list[int]]]],
) -> None:
    """An upstream that dies after reading a request on a pooled connection (mid-generation) is
    ``disconnected``; the request is not resent on another connection."""
    received = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(r)
            received.append(request.split(b" ")[1])
            if b"/die" in request:
                return  # the connection closes with no answer
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()

    url, conns = await raw_server(handler)
    up = Upstream(url)
    async with await up.request("POST", "/warm", hdrs(), b"") as resp:
        await resp.read()
    with pytest.raises(UpstreamError) as err:
        await up.request("POST", "/die", hdrs(), b"{}")
    assert err.value.kind == "disconnected"
    await asyncio.sleep(0.05)
    await up.close()
    assert received == [b"/v1/warm", b"/v1/die"] and conns[0] == 1


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_whole_answer_over_the_limit_is_too_large(
    raw_server: Callable[..., Awaitable[tuple[str, list[int]]]], framing: str
) -> None:
    """Over ``max_answer_bytes``: refused from its Content-Length before a byte of it is read,
    or as a chunked body's bytes arrive."""
    size = 200_000

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        if framing == "length":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        else:
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(size // 10_000):
                w.write(b"%x\r\n%b\r\n" % (10_000, b"x" * 10_000))
        await w.drain()
        await r.read()

    url, _ = await raw_server(handler)
    up = Upstream(url, max_answer_bytes=100_000)
    with pytest.raises(UpstreamError) as err:
        async with await up.request("POST", "/x", hdrs(), b"") as resp:
            await resp.read()
    assert err.value.kind == "too_large"
    await up.close()


async def test_a_connection_idle_past_the_pool_limit_is_closed_not_used(
    raw_server: Callable[..., Awaitable[tuple[str, list[int]]]],
) -> None:
    """After ``pool_idle_s`` idle, a pooled connection is replaced by a new one (the server's own
    keep-alive may be closing it just then)."""
    url, conns = await raw_server(lambda r, w: answer_each(r, w, b"", b""))
    up = Upstream(url, pool_idle_s=0.1)
    for pause in (0.0, 0.0, 0.2):
        await asyncio.sleep(pause)
        async with await up.request("POST", "/a", hdrs(), b"{}") as resp:
            assert await resp.read() == b"/v1/a"
    await up.close()
    assert conns[0] == 2
