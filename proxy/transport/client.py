"""The client of the shaped routes to the model server: a pool of keep-alive connections, each
an asyncio protocol whose answers llhttp (through ``httptools``) parses.

This module writes no framing logic of its own: llhttp, in its strict mode, frames every
answer and refuses invalid framing or status, which is then ``malformed`` and closes the
connection. Interim ``1xx`` answers are consumed, never returned. A pooled connection goes
back to the pool only in one state: its last answer read exactly to its end, with nothing
left over; bytes after an answer, or arriving while it is idle, close it. A request is never
sent twice: a pooled connection that the server closed while idle is dropped before use, and
a request that failed after it was written is an error, not a retry.

It speaks only what the shaped routes need (a ``POST`` with a ``Content-Length`` body): aiohttp's
client, measured in the same run, costs about 150 µs of CPU more per request
(``docs/BENCHMARKS.md``); the pass-through routes use aiohttp's.

Failures are :class:`UpstreamError` (``unreachable``, ``disconnected``, ``malformed``,
``too_large``) or ``TimeoutError`` (no byte within the read timeout).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self, cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from thinkcap.proxy.transport.tcp import no_delay

#: A whole (not streamed) answer larger than this is refused (see ``[backend] max_answer_bytes``).
MAX_ANSWER_BYTES = 32 * 1024 * 1024
#: An answer's head (status line and headers), at most.
MAX_HEAD_BYTES = 64 * 1024
#: Body bytes read ahead of the consumer before reading pauses.
HIGH_WATER = 256 * 1024
#: Idle connections kept, at most.
MAX_IDLE = 256
#: A pooled connection idle longer than this is closed instead of used: below the usual
#: server keep-alive (uvicorn's 5 s, behind vLLM and SGLang), so that the client, not the
#: server, ends an idle connection, and a request seldom meets a close already in flight.
POOL_IDLE_S = 4.0
#: How long closing the pool waits for its connections to let go of their sockets.
CLOSE_WAIT_S = 1.0


def base_url(url: str) -> str:
    """A server's root URL: without a trailing ``/`` or ``/v1`` (the OpenAI routes go after)."""
    return url.rstrip("/").removesuffix("/v1")


class UpstreamError(Exception):
    """The upstream failed: ``kind`` is ``unreachable``, ``disconnected``, ``malformed`` or ``too_large``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _LeftoverError(Exception):
    """Bytes after an answer: the connection is not trusted again."""


class Response:
    """An upstream answer; read it with :meth:`read` or :meth:`iter_chunks`, inside ``async with``."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.keep_alive = False
        #: Whether the body's last byte has been read (set before the piece it ends is handed out).
        self.complete = False
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._head = False

    @property
    def content_type(self) -> str:
        """The media type, without parameters."""
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    # -- fed by the connection --------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _got_head(self, status: int, headers: CIMultiDictProxy[str], keep_alive: bool) -> None:
        self.status, self.headers, self.keep_alive, self._head = status, headers, keep_alive, True
        self._wake()

    def _got_body(self, data: bytes) -> None:
        self._pieces.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _got_end(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None and not self.complete:
            self._error = exc
        self._wake()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self._conn.loop.create_future()
        try:
            await self._conn.timed(self._waiter)
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    # -- read by the request path -----------------------------------------------------------
    async def _read_head(self) -> None:
        while not self._head:
            await self._wait()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: each piece is every byte read since the one before."""
        while True:
            if self._pieces:
                data = self._pieces.popleft() if len(self._pieces) == 1 else b"".join(self._pieces)
                self._pieces.clear()
                self._buffered = 0
                self._conn.resume()
                yield data
            elif self.complete:
                return
            else:
                await self._wait()

    async def read(self) -> bytes:
        """The whole body; ``UpstreamError("too_large")`` beyond the pool's ``max_answer_bytes``,
        told by its ``Content-Length`` before a byte is read, or as the bytes arrive."""
        limit = self._conn.pool.max_answer_bytes
        length = self.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise UpstreamError("too_large", f"the upstream's answer is larger than {limit} bytes")
        pieces, size = [], 0
        async for data in self.iter_chunks():
            size += len(data)
            if size > limit:
                raise UpstreamError("too_large", f"the upstream's answer is larger than {limit} bytes")
            pieces.append(data)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._conn.release(self, reuse=exc is None and self.complete and self.keep_alive and not self._pieces)


class _Connection(asyncio.Protocol):
    """One pooled connection: llhttp parses its answers; at most one request at a time."""

    def __init__(self, pool: Upstream) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.current: Response | None = None
        self.closed = False
        self.paused = False
        self.interim = False
        self.headers: list[tuple[str, str]] = []
        self.head_bytes = 0
        self.framed = False  # the answer under way has a Content-Length or is chunked (else: read to close)
        # The read timeout: one timer per connection, re-armed while bytes keep coming.
        self.last_byte = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timeout_waiter: asyncio.Future[None] | None = None
        self.idle_since = 0.0
        self.lost = False  # the transport has let go of its socket

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        no_delay(transport)

    def data_received(self, data: bytes) -> None:
        current = self.current
        if current is None:  # bytes while idle: nothing can be trusted on this connection any more
            self.close()
            return
        self.last_byte = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _LeftoverError):
                current._fail(UpstreamError("malformed", f"the upstream sent an invalid answer: {exc.__context__}"))
            self.close()
        except httptools.HttpParserUpgrade:
            current._fail(UpstreamError("malformed", "the upstream switched protocols"))
            self.close()
        except httptools.HttpParserError as exc:
            current._fail(UpstreamError("malformed", f"the upstream sent an invalid answer: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        current = self.current
        if current is not None and current._head and not self.framed and not self.interim:
            current._got_end()  # a body without a length ends when the connection does
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.lost = True
        current = self.current
        if current is not None:
            if current._head and not self.framed and not self.interim:
                current._got_end()
            elif current._head:
                current._fail(UpstreamError("disconnected", "the upstream closed the connection mid-answer"))
            else:
                current._fail(UpstreamError("disconnected", "the upstream closed the connection before answering"))
        if self.timer is not None:
            self.timer.cancel()

    # -- llhttp's callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.current is None or self.current.complete:
            raise _LeftoverError
        self.headers = []
        self.head_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise ValueError(f"an answer head over {MAX_HEAD_BYTES} bytes")
        self.headers.append((name.decode("latin-1"), value.decode("latin-1").strip(" \t")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.interim = 100 <= status < 200  # consumed, never returned
        if self.interim or self.current is None:
            return
        headers = CIMultiDictProxy(CIMultiDict(self.headers))
        self.framed = "Content-Length" in headers or "Transfer-Encoding" in headers or status in (204, 304)
        self.current._got_head(status, headers, self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.current is not None and not self.interim:
            self.current._got_body(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
        elif self.current is not None:
            self.current._got_end()

    # -- flow and time ------------------------------------------------------------------
    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.last_byte = self.loop.time()  # time spent paused is the consumer's, not the upstream's
            self.transport.resume_reading()

    async def timed(self, waiter: asyncio.Future[None]) -> None:
        """Wait for ``waiter``; TimeoutError when no byte came for the read timeout."""
        limit = self.pool.read_timeout_s
        if limit is None:
            await waiter
            return
        self.timeout_waiter = waiter
        if self.timer is None:
            self.timer = self.loop.call_at(self.last_byte + limit, self._check_timeout)
        await waiter
        self.timeout_waiter = None

    def _check_timeout(self) -> None:
        self.timer = None
        limit = self.pool.read_timeout_s
        waiter = self.timeout_waiter
        if limit is None or waiter is None or waiter.done() or self.current is None:
            return
        due = self.last_byte + limit
        if self.loop.time() >= due and not self.paused:
            self.current._fail(TimeoutError("no byte from the upstream within the read timeout"))
            self.close()
        else:
            self.timer = self.loop.call_at(max(due, self.loop.time() + 0.001), self._check_timeout)

    # -- requests -------------------------------------------------------------------------
    def send(self, payload: bytes) -> Response:
        assert self.transport is not None
        self.current = Response(self)
        self.last_byte = self.loop.time()
        self.framed = False
        self.interim = False
        self.transport.write(payload)
        return self.current

    def release(self, response: Response, *, reuse: bool) -> None:
        if self.current is not response:
            return
        self.current = None
        self.timeout_waiter = None
        if reuse and not self.closed and not self.paused:
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True


class Upstream:
    """A pool of keep-alive connections to one origin (``base_url`` may carry a path prefix)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float | None = 10.0,
        read_timeout_s: float | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        max_idle: int = MAX_IDLE,
        pool_idle_s: float = POOL_IDLE_S,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http(s)://host[:port][/path], got {base_url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        default = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        self.host_header = self.host if default else f"{self.host}:{self.port}"
        if ":" in self.host:
            self.host_header = f"[{self.host}]" + ("" if default else f":{self.port}")
        self.prefix = parts.path.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_answer_bytes = max_answer_bytes
        self.max_idle = max_idle
        self.pool_idle_s = pool_idle_s
        self._idle: list[_Connection] = []
        self._ssl = ssl.create_default_context() if self.tls else None

    def put(self, conn: _Connection) -> None:
        """Return a connection whose answer was read exactly to its end to the pool."""
        if len(self._idle) < self.max_idle:
            conn.idle_since = conn.loop.time()
            self._idle.append(conn)
        else:
            conn.close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self.tls else None,
                )  # fmt: skip
        except TimeoutError:
            raise UpstreamError("unreachable", f"connecting to {self.host_header} timed out") from None
        except OSError as exc:
            raise UpstreamError("unreachable", f"cannot connect to {self.host_header}: {exc.strerror or exc}") from None
        return conn

    def _head(self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes) -> bytes:
        lines = [f"{method} {self.prefix}{path_qs} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def request(self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes) -> Response:
        """Send one request and read the answer's head (the body is read from the result).

        Never retried: a pooled connection the server closed while idle is dropped before use.
        """
        payload = self._head(method, path_qs, headers, body) + body
        conn = None
        while self._idle:
            candidate = self._idle.pop()
            fresh = candidate.loop.time() - candidate.idle_since < self.pool_idle_s
            transport = candidate.transport
            if fresh and not candidate.closed and transport is not None and not transport.is_closing():
                conn = candidate
                break
            candidate.close()
        if conn is None:
            conn = await self._connect()
        response = conn.send(payload)
        try:
            await response._read_head()
        except BaseException:
            conn.release(response, reuse=False)
            raise
        return response

    async def close(self) -> None:
        """Close every pooled connection."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        # A closed transport lets go of its socket one loop turn later: wait for that (briefly).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_WAIT_S
        while any(not conn.lost for conn in idle) and loop.time() < deadline:
            await asyncio.sleep(0.001)
