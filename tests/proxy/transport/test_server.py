"""The data plane's HTTP/1.1 server, spoken to over a raw socket, on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkcap.cli.runtime import run
from thinkcap.proxy.transport import server as http1
from thinkcap.proxy.transport.server import HttpRequest, HttpServer, Reply, StreamReply, json_reply

LOOPS = ["asyncio", "uvloop"]
LIMIT = 1000


class Recorder:
    """A handler that echoes method, path, query and body; ``/slow`` waits, ``/stream`` streams."""

    def __init__(self) -> None:
        self.seen: list[HttpRequest] = []
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, request: HttpRequest) -> Reply | StreamReply:
        self.seen.append(request)
        if request.path == "/boom":
            raise RuntimeError("a bug")
        if request.path == "/slow":
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if request.path == "/stream":
            resp = StreamReply(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request, b"first")  # the head and the first chunk in one packet
            self.started.set()
            await self.release.wait()
            await resp.write(b"second")
            await resp.write_eof()
            return resp
        body = b"" if request.too_large else await request.read()
        return json_reply(
            {"method": request.method, "path": request.path, "query": request.query_string,
             "body": body.decode(errors="replace"), "too_large": request.too_large},
        )  # fmt: skip


@asynccontextmanager
async def serving(handler: Callable[[HttpRequest], Awaitable[Reply | StreamReply]], **kw: Any) -> AsyncIterator[Any]:
    server = HttpServer(handler, max_body_bytes=LIMIT, **kw)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.shutdown(1.0)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer: status, headers (lower-case names), body (de-chunked)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
        return status, headers, body
    return status, headers, await reader.readexactly(int(headers.get("content-length", "0")))


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def refused_then_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The handler's answer saw ``too_large``; the connection then ends."""
    status, headers, body = await read_answer(reader)
    assert status == 200 and json.loads(body)["too_large"] is True and headers["connection"] == "close"
    await closed(reader, writer)


async def closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The server ended the connection."""
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


def on(loop: str, scenario: Callable[[], Awaitable[None]]) -> None:
    run(scenario(), loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_keep_alive_and_pipelined_requests_are_answered_in_order(loop: str) -> None:
    """Three requests in one write on one connection: three answers, in order, connection kept."""

    async def scenario() -> None:
        async with serving(Recorder()) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post("/a?x=1", b"one") + post("/b", b"two") + post("/c%20d", b""))
            answers = [await read_answer(reader) for _ in range(3)]
            assert [json.loads(a[2])["path"] for a in answers] == ["/a", "/b", "/c d"]
            assert json.loads(answers[0][2])["query"] == "x=1" and json.loads(answers[1][2])["body"] == "two"
            assert all(a[0] == 200 and "connection" not in a[1] for a in answers)
            writer.write(post("/again", b""))
            assert (await read_answer(reader))[0] == 200
            writer.close()

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_http10_and_connection_close_end_the_connection(loop: str) -> None:
    """HTTP/1.0 without keep-alive, or ``Connection: close``, closes after the answer."""

    async def scenario() -> None:
        async with serving(Recorder()) as (_, port):
            for request in (b"GET /x HTTP/1.0\r\n\r\n", post("/y", b"", "Connection: close")):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                status, headers, _ = await read_answer(reader)
                assert status == 200 and headers["connection"] == "close"
                await closed(reader, writer)

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_chunked_bodies_and_expect_continue(loop: str) -> None:
    """A chunked body arrives whole; ``Expect: 100-continue`` gets its interim answer first."""

    async def scenario() -> None:
        async with serving(Recorder()) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n")
            await asyncio.sleep(0.05)
            writer.write(b"0\r\nX-Trailer: 1\r\n\r\n")
            assert json.loads((await read_answer(reader))[2])["body"] == "abcde"
            writer.write(post("/e", b"", "Expect: 100-continue").replace(b"Content-Length: 0", b"Content-Length: 4"))
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"body")
            assert json.loads((await read_answer(reader))[2])["body"] == "body"
            writer.close()

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_is_handed_over_unread_and_the_connection_closes(loop: str, chunked: bool) -> None:
    """Past ``max_body_bytes`` the handler sees ``too_large`` (and read() raises); then the connection ends."""

    async def scenario() -> None:
        async with serving(Recorder()) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            big = b"x" * (LIMIT + 1)
            if chunked:
                writer.write(b"POST /big HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n" % (len(big), big))
            else:
                writer.write(post("/big", big))
            await refused_then_closed(reader, writer)

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_still_sending_a_refused_body_gets_the_answer_not_a_reset(loop: str) -> None:
    """The answer to a too-large body is sent early; the server reads on until the client is done."""

    async def scenario() -> None:
        async with serving(Recorder()) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            size = 4 * 1024 * 1024
            writer.write(f"POST /big HTTP/1.1\r\nContent-Length: {size}\r\n\r\n".encode())
            piece = b"x" * 65536
            for _ in range(size // len(piece)):  # the whole body, as clients send it before reading
                writer.write(piece)
                await writer.drain()
            await refused_then_closed(reader, writer)

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NONSENSE\r\n\r\n", 400),
        (b"GET nopath HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc", 400),
        ("POST / HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\nab".encode("latin-1"), 400),
        ("G\u00c9T / HTTP/1.1\r\n\r\n".encode("latin-1"), 400),
        (b"GET / HTTP/1.1\r\nX: " + b"y" * (70 * 1024) + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
        (b"POST / HTTP/1.1\r\nContent-Length: \x0b3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: \xa03\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\nContent-Length: 0\n\n", 400),  # bare LF
        (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\x1bb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\nPOST /smuggled HTTP/1.1\r\n\r\n", 400),
        (b"GET /a\x00b HTTP/1.1\r\n\r\n", 400),
        (b"GET /a\x7fb HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"POST / HTTP/1.1\r\nExpect: something-else\r\nContent-Length: 1\r\n\r\nx", 417),
        (b"GET /v1/../health HTTP/1.1\r\n\r\n", 400),
        (b"GET /v1/%2e%2e/health HTTP/1.1\r\n\r\n", 400),
        (b"GET /v1/%2E./health HTTP/1.1\r\n\r\n", 400),
        (b"GET /v1/./models HTTP/1.1\r\n\r\n", 400),
        (b"GET /v1/a%2fb HTTP/1.1\r\n\r\n", 400),
        (b"GET /v1\\..\\health HTTP/1.1\r\n\r\n", 400),
        (b"GET /v1/.. HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_malformed_requests_get_an_error_and_the_connection_closes(
    loop: str, request_bytes: bytes, status: int
) -> None:
    """A bad request line, header, framing or an oversized head: an error answer, then the end."""

    async def scenario() -> None:
        recorder = Recorder()
        async with serving(recorder) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_bytes)
            got, headers, body = await read_answer(reader)
            assert got == status and headers["connection"] == "close" and json.loads(body)["error"]["message"]
            await closed(reader, writer)
            assert recorder.seen == []

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_request_before_a_malformed_one_is_still_answered(loop: str) -> None:
    """Pipelined good-then-bad: the good one's answer, then the error, then the end."""

    async def scenario() -> None:
        async with serving(Recorder()) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post("/good", b"") + b"BAD\r\n\r\n")
            assert (await read_answer(reader))[0] == 200
            assert (await read_answer(reader))[0] == 400
            await closed(reader, writer)

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_streamed_answer_arrives_before_the_handler_ends(loop: str) -> None:
    """The first chunk reaches the client while the handler still waits to send the second."""

    async def scenario() -> None:
        recorder = Recorder()
        async with serving(recorder) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post("/stream", b""))
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"Transfer-Encoding: chunked" in head and b"Content-Type: text/event-stream" in head
            assert await reader.readuntil(b"first\r\n") == b"5\r\nfirst\r\n"
            recorder.release.set()
            assert await reader.readuntil(b"0\r\n\r\n") == b"6\r\nsecond\r\n0\r\n\r\n"
            writer.close()

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("path", ["/slow", "/stream"])
def test_the_handler_ends_when_the_client_goes_away(loop: str, path: str) -> None:
    """Closing the connection cancels a waiting handler at once; a streaming one ends at its next write."""

    async def scenario() -> None:
        recorder = Recorder()
        async with serving(recorder) as (server, port):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(path, b""))
            await asyncio.wait_for(recorder.started.wait(), 5)
            assert len(server.tasks) == 1
            writer.close()
            if path == "/slow":
                await asyncio.wait_for(recorder.cancelled.wait(), 5)
            else:
                await asyncio.sleep(0.05)
                recorder.release.set()
            for _ in range(500):
                if not server.tasks:
                    break
                await asyncio.sleep(0.01)
            assert not server.tasks

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_handler_bug_is_a_500_and_the_connection_goes_on(loop: str) -> None:
    """An exception in the handler answers 500 (and is reported); the next request is served."""

    async def scenario() -> None:
        failures: list[str] = []
        async with serving(Recorder(), on_failure=lambda req, exc: failures.append(f"{req.path} {exc}")) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post("/boom", b"") + post("/ok", b""))
            assert (await read_answer(reader))[0] == 500
            assert (await read_answer(reader))[0] == 200
            assert failures == ["/boom a bug"]
            writer.close()

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_head_answers_carry_no_body(loop: str) -> None:
    """A HEAD request gets the headers (with the length) and no body; the connection stays usable."""

    async def scenario() -> None:
        async def handler(_: HttpRequest) -> Reply:
            return Reply(b"12345", content_type="text/plain")

        async with serving(handler) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"HEAD / HTTP/1.1\r\n\r\n" + post("/", b""))
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"Content-Length: 5" in head
            assert (await read_answer(reader))[2] == b"12345"
            writer.close()

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("shutdown", [False, True], ids=["kept-alive", "shutting-down"])
def test_a_head_built_early_is_sent_as_built_unless_the_connection_must_close_by_then(
    loop: str, shutdown: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``build_head`` makes the head before the answer starts; ``prepare`` then sends it without
    building it again, unless the server began to shut down in between: then the head is made
    again and says that the connection closes."""
    built: list[int] = []
    make = http1._head

    def counting(*args: Any, **kw: Any) -> bytes:
        built.append(1)
        return make(*args, **kw)

    monkeypatch.setattr(http1, "_head", counting)

    async def scenario() -> None:
        started, release = asyncio.Event(), asyncio.Event()

        async def handler(request: HttpRequest) -> StreamReply:
            resp = StreamReply(headers={"Content-Type": "text/event-stream"})
            resp.build_head(request)
            started.set()
            await release.wait()
            await resp.prepare(request, b"first")
            await resp.write_eof(b"last")
            return resp

        server = HttpServer(handler, max_body_bytes=LIMIT)
        port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/", b""))
        await asyncio.wait_for(started.wait(), 5)
        stopping = asyncio.create_task(server.shutdown(5.0)) if shutdown else None
        await asyncio.sleep(0)
        release.set()
        status, headers, body = await read_answer(reader)
        assert (status, body, headers["content-type"]) == (200, b"firstlast", "text/event-stream")
        assert (headers.get("connection") == "close") == shutdown
        assert len(built) == (2 if shutdown else 1)
        if stopping is not None:
            await stopping
        else:
            await server.shutdown(1.0)
        writer.close()

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_shutdown_drains_a_request_in_progress_and_closes_idle_connections(loop: str) -> None:
    """Shutdown: idle keep-alive connections close at once, the one in progress gets its answer."""

    async def scenario() -> None:
        recorder = Recorder()
        server = HttpServer(recorder, max_body_bytes=LIMIT)
        port = await server.start("127.0.0.1", 0)
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        idle_writer.write(post("/warm", b""))
        await read_answer(idle_reader)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/slow", b""))
        await asyncio.wait_for(recorder.started.wait(), 5)
        stopping = asyncio.create_task(server.shutdown(5.0))
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""
        recorder.release.set()
        status, headers, _ = await read_answer(reader)
        assert status == 200 and headers["connection"] == "close"
        await stopping
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        idle_writer.close()

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_idle_keep_alive_connection_times_out(loop: str) -> None:
    """With no request for ``keepalive_timeout_s`` the server closes the connection."""

    async def scenario() -> None:
        async with serving(Recorder(), keepalive_timeout_s=0.1) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post("/x", b""))
            await read_answer(reader)
            await closed(reader, writer)

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_the_keep_alive_clock_restarts_after_each_answer_and_with_a_partial_request(loop: str) -> None:
    """Requests (or part of one) inside the timeout keep the connection open past the first
    deadline; it closes a timeout after the last activity, not before."""

    async def scenario() -> None:
        timeout = 0.3
        async with serving(Recorder(), keepalive_timeout_s=timeout) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            loop_ = asyncio.get_running_loop()
            for _ in range(3):
                writer.write(post("/x", b""))
                await read_answer(reader)
                await asyncio.sleep(0.2)
            request = post("/x", b"hello")
            writer.write(request[:10])  # part of a request restarts the clock too
            await asyncio.sleep(0.2)
            writer.write(request[10:])
            assert (await read_answer(reader))[0] == 200
            last = loop_.time()
            await closed(reader, writer)
            assert loop_.time() - last >= timeout * 0.9

    on(loop, scenario)


#: Pieces that make the random input look like requests more often than random bytes do.
FRAGMENTS = [b"\r\n", b"\r\n\r\n", b"POST / HTTP/1.1\r\n", b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
             b"Expect: 100-continue\r\n", b"5\r\nhello\r\n", b"0\r\n"]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=64), st.sampled_from(FRAGMENTS)), max_size=12))
def test_no_byte_sequence_breaks_the_server(pieces: list[bytes]) -> None:
    """Whatever arrives, the server raises nothing into the event loop and keeps serving others."""

    async def scenario() -> None:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        async with serving(Recorder()) as (server, port):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"".join(pieces))
            await asyncio.sleep(0.01)
            writer.close()
            reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
            writer2.write(post("/after", b"ok"))
            assert json.loads((await read_answer(reader2))[2])["body"] == "ok"
            writer2.close()
            assert server.failures == 0
        assert errors == []

    on("asyncio", scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_100_continue_waits_for_the_answer_before_it_and_never_lands_inside_it(loop: str) -> None:
    """A pipelined ``Expect: 100-continue`` behind a streamed answer gets its ``100 Continue``
    only after that answer's last chunk, then its own answer."""

    async def scenario() -> None:
        recorder = Recorder()
        async with serving(recorder) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                post("/stream", b"") + b"POST /e HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
            )
            await reader.readuntil(b"\r\n\r\n")
            assert await reader.readuntil(b"first\r\n") == b"5\r\nfirst\r\n"
            await asyncio.sleep(0.05)
            recorder.release.set()
            assert await reader.readuntil(b"0\r\n\r\n") == b"6\r\nsecond\r\n0\r\n\r\n"  # no 100 inside it
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"body")
            assert json.loads((await read_answer(reader))[2])["body"] == "body"
            writer.close()

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_expected_body_over_the_limit_gets_no_100_and_is_refused(loop: str) -> None:
    """``Expect: 100-continue`` with a ``Content-Length`` over the limit: no 100, the handler's answer."""

    async def scenario() -> None:
        async with serving(Recorder()) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"POST /e HTTP/1.1\r\nContent-Length: {LIMIT + 1}\r\nExpect: 100-continue\r\n\r\n".encode())
            await refused_then_closed(reader, writer)

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_one_huge_chunk_is_refused_as_its_bytes_arrive(loop: str) -> None:
    """A chunk declared 2^48 bytes long is counted against the limit as it arrives, not buffered first."""

    async def scenario() -> None:
        async with serving(Recorder()) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /big HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000\r\n" + b"x" * (LIMIT + 1)
            )
            await refused_then_closed(reader, writer)

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_head_that_trickles_in_gets_408_at_its_deadline(loop: str) -> None:
    """A head not complete ``head_timeout_s`` after its first byte is answered 408 and the connection closes."""

    async def scenario() -> None:
        recorder = Recorder()
        async with serving(recorder, head_timeout_s=0.3) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for byte in b"POST /slow":
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)
            status, headers, _ = await read_answer(reader)
            assert status == 408 and headers["connection"] == "close" and recorder.seen == []
            await closed(reader, writer)

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_body_slower_than_the_minimum_rate_gets_408(loop: str) -> None:
    """A body that arrives slower than ``body_min_rate`` bytes/s over a window is answered 408."""

    async def scenario() -> None:
        recorder = Recorder()
        async with serving(recorder, body_min_rate=1000, body_rate_window_s=0.2) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /b HTTP/1.1\r\nContent-Length: 900\r\n\r\nabc")
            status, headers, _ = await read_answer(reader)
            assert status == 408 and headers["connection"] == "close" and recorder.seen == []
            await closed(reader, writer)

    on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_connections_beyond_the_cap_get_503_and_a_close(loop: str) -> None:
    """With ``max_connections`` open, the next connection is answered 503 at once and closed;
    once one closes, a new one is served."""

    async def scenario() -> None:
        async with serving(Recorder(), max_connections=2) as (_, port):
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await asyncio.sleep(0.05)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            status, headers, body = await read_answer(reader)
            assert status == 503 and headers["retry-after"] == "1" and json.loads(body)["error"]["code"]
            await closed(reader, writer)
            held[0][1].close()
            await asyncio.sleep(0.05)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post("/ok", b""))
            assert (await read_answer(reader))[0] == 200
            writer.close()
            held[1][1].close()

    on(loop, scenario)
