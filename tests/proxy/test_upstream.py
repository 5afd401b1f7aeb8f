"""The proxy's keep-alive HTTP/1.1 client against raw loopback servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from multidict import CIMultiDict

from proxy.chunked import ChunkError, take_chunks
from proxy.upstream import Upstream, UpstreamError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[str, list[int]]]]]:
    """Start a raw TCP server; yields its base URL and a list counting its connections."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> tuple[str, list[int]]:
        connections = [0]

        async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
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
    async with await up.request("POST", "/close", hdrs(), b"") as resp:
        assert await resp.read() == b"until the end"
    await up.close()
    assert conns[0] == 2


async def test_the_first_chunk_comes_alone_and_complete_is_set_with_the_piece_that_ends_the_body(
    raw_server: Callable[..., Awaitable[tuple[str, list[int]]]],
) -> None:
    """The first chunk comes alone (with the end of the body if it follows at once), then each
    piece is what a read completed; ``complete`` turns true as the last piece is handed out
    when the end of the body came with it, and only after the last piece when the end came
    later (or is the connection closing)."""

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
    for path, expected in (
        ("/many", [(b"a", False), (b"bc", True)]),
        ("/single", [(b"a", True)]),  # the end came right after the first chunk
        ("/together", [(b"hello", False), (b" world", True)]),
        ("/apart", [(b"hello", False)]),
        ("/length", [(b"abc", False), (b"de", True)]),
        ("/close", [(b"to the end", False)]),
    ):
        async with await up.request("POST", path, hdrs(), b"") as resp:
            assert not resp.complete
            assert [(piece, resp.complete) async for piece in resp.iter_chunks()] == expected, path
            assert resp.complete
    await up.close()


async def test_a_connection_closed_while_idle_is_retried_once(
    raw_server: Callable[..., Awaitable[tuple[str, list[int]]]],
) -> None:
    """The server drops a pooled connection; the next request goes out again on a fresh one."""

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
    ],
)
async def test_broken_answers_are_named(
    raw_server: Callable[..., Awaitable[tuple[str, list[int]]]], reply: bytes, kind: str
) -> None:
    """Bad status lines, header lines, chunk sizes and short bodies raise UpstreamError of the right kind."""

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

    release = asyncio.Event()

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await release.wait()
        w.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        slow = Upstream(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", read_timeout_s=0.2)
        with pytest.raises(TimeoutError):
            await slow.request("POST", "/x", hdrs(), b"")
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


CHUNKED = b"5;ext=1\r\nhello\r\n6\r\n world\r\n1a\r\n" + b"z" * 26 + b"\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n"


@dataclass
class Dechunked:
    done: bool
    extra: bytes


def dechunk(pieces: list[bytes]) -> tuple[bytes, Dechunked]:
    """Feed ``pieces`` one after another, as reads would bring them."""
    buf, body, done = bytearray(), bytearray(), False
    for piece in pieces:
        buf += piece
        done = done or take_chunks(buf, body)
    return bytes(body), Dechunked(done, bytes(buf) if done else b"")


def test_a_chunked_body_comes_apart_the_same_however_its_bytes_are_split() -> None:
    """Every split point, and one byte at a time: the same payload, done after the trailers."""
    whole = b"hello world" + b"z" * 26
    for i in range(len(CHUNKED) + 1):
        out, body = dechunk([CHUNKED[:i], CHUNKED[i:]])
        assert out == whole and body.done and body.extra == b"", i
        if i < len(CHUNKED):
            assert not dechunk([CHUNKED[:i]])[1].done
    out, body = dechunk([CHUNKED[i : i + 1] for i in range(len(CHUNKED))])
    assert out == whole and body.done
    out, body = dechunk([b"3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200"])
    assert out == b"abc" and body.done and body.extra == b"HTTP/1.1 200"


def test_one_chunk_at_a_time_gives_each_payload_whole_however_the_bytes_are_split() -> None:
    """``one=True`` takes at most one chunk with data per call, at every split point."""
    for i in range(len(CHUNKED) + 1):
        buf, payloads, done = bytearray(), [], False
        for piece in (CHUNKED[:i], CHUNKED[i:]):
            buf += piece
            while not done:
                body = bytearray()
                done = take_chunks(buf, body, one=True)
                if not body:
                    break
                payloads.append(bytes(body))
        assert payloads == [b"hello", b" world", b"z" * 26] and done and not buf, i


@pytest.mark.parametrize(
    "raw",
    [b"zz\r\n", b"0x3\r\nabc\r\n", b"+3\r\nabc\r\n", b"1_0\r\n", b"\r\n", b"3\r\nabcXY", b"1" * 17 + b"\r\n"],
)
def test_bad_chunk_framing_is_malformed(raw: bytes) -> None:
    """Sizes must be plain hex digits; a chunk must end in CRLF."""
    with pytest.raises(ChunkError):
        dechunk([raw])
