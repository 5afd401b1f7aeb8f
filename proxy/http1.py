"""A lean HTTP/1.1 server for the data plane.

The data plane's work per request is small, and on it a general-purpose server's machinery
is a large share of the added latency: measured against a zero-delay upstream at 200 req/s,
a bare forwarder on aiohttp's server added 1.3-2.5 times the median latency of the same
forwarder on a plain asyncio protocol, and thinkcap itself adds about a fifth less on this
server than it did on aiohttp's (``docs/BENCHMARKS.md``). So the data plane serves HTTP/1.1
itself, doing what a JSON API gateway needs and no more:

- keep-alive, and pipelined requests answered in order; HTTP/1.0 closes after each answer;
- request bodies framed by ``Content-Length`` or chunked, read whole up to a limit (a
  larger one is handed to the handler as :attr:`HttpRequest.too_large` and the connection
  closes after the answer); ``Expect: 100-continue`` is honoured;
- whole answers (:class:`Reply`) and streamed ones (:class:`StreamReply`, chunked), with
  write back-pressure;
- the handler is cancelled when its client goes away, an idle keep-alive connection closes
  after a timeout, and :meth:`HttpServer.shutdown` stops accepting, lets requests in
  progress finish up to a deadline, then closes everything.

Malformed requests (bad request line, header or framing; both ``Content-Length`` and
``Transfer-Encoding``; a head over 64 KiB) get a 400 or 431 from ``error_reply`` and the
connection closes. The admin listener stays on aiohttp: it is not on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import json
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast
from urllib.parse import unquote

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.chunked import BodyLimitError, ChunkError, take_chunks

MAX_HEAD_BYTES = 64 * 1024
#: An idle keep-alive connection is closed after this long.
KEEPALIVE_TIMEOUT_S = 75.0
#: Pipelined requests parsed ahead of the one being answered before reading pauses.
MAX_PIPELINED = 16
#: Response framing is the server's: handlers' values for these are ignored.
FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
NO_BODY_STATUS = frozenset({204, 304})
#: A connection that the server ends after an answer keeps reading (and discarding) for up
#: to this long, so that a client still sending a body it will not have read gets the
#: answer instead of a reset.
LINGER_S = 2.0


class HttpRequest:
    """One request, its body read whole (see :attr:`too_large`)."""

    __slots__ = ("_conn", "body", "headers", "keep_alive", "method", "path", "path_qs", "query_string", "too_large")

    def __init__(
        self,
        conn: _Connection,
        method: str,
        path_qs: str,
        headers: CIMultiDictProxy[str],
        body: bytes,
        *,
        keep_alive: bool,
        too_large: bool = False,
    ) -> None:
        self._conn = conn
        self.method = method
        self.path_qs = path_qs
        raw_path, _, self.query_string = path_qs.partition("?")
        self.path = unquote(raw_path)
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        #: The body exceeded the server's limit and was not read; the connection closes after the answer.
        self.too_large = too_large

    async def read(self) -> bytes:
        """The body (it is already in memory); :class:`BodyTooLargeError` past the limit."""
        if self.too_large:
            raise BodyTooLargeError
        return self.body

    def abort(self) -> None:
        """Close the client connection at once (an answer cut short must not look complete)."""
        self._conn.close()


class BodyTooLargeError(Exception):
    """The request body is over the server's limit."""


_REASONS = {s.value: s.phrase for s in http.HTTPStatus}


def _head(status: int, headers: Mapping[str, str] | CIMultiDict[str] | None, framing: str, *, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}", f"Date: {_date()}"]
    if headers:
        lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in FRAMING]
    if framing:
        lines.append(framing)
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_date_cache: tuple[int, str] = (0, "")


def _date() -> str:
    global _date_cache  # noqa: PLW0603 - one formatted date per second, shared by every answer
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


class Reply:
    """A whole answer: status, headers and body."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        body: bytes = b"",
        *,
        status: int = 200,
        headers: Mapping[str, str] | CIMultiDict[str] | None = None,
        content_type: str | None = None,
    ) -> None:
        self.body = body
        self.status = status
        #: Taken as it is when it is a ``CIMultiDict`` (the reply then owns it).
        self.headers: CIMultiDict[str] = headers if isinstance(headers, CIMultiDict) else CIMultiDict(headers or {})
        if content_type is not None:
            self.headers["Content-Type"] = content_type


def json_reply(data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
    """A JSON answer."""
    return Reply(json.dumps(data).encode(), status=status, headers=headers, content_type="application/json")


#: The end of a chunked body (no trailers).
LAST_CHUNK = b"0\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class StreamReply:
    """An answer sent as it is produced, in chunked encoding: ``prepare``, ``write``..., ``write_eof``."""

    def __init__(self, *, status: int = 200, headers: Mapping[str, str] | CIMultiDict[str] | None = None) -> None:
        self.status = status
        self.headers: CIMultiDict[str] = headers if isinstance(headers, CIMultiDict) else CIMultiDict(headers or {})
        self.prepared = False
        self.finished = False
        self._conn: _Connection | None = None
        self._body = True
        self._head: tuple[bytes, bool, bool] | None = None

    def build_head(self, request: HttpRequest) -> None:
        """Make the status line and headers now, so that :meth:`prepare` only has to send them
        (the headers must not change after this; the connection's keep-alive is checked again)."""
        self._head = self._make_head(request)

    def _make_head(self, request: HttpRequest) -> tuple[bytes, bool, bool]:
        body = request.method != "HEAD" and self.status not in NO_BODY_STATUS
        close = request._conn.closing_after(request)
        return _head(self.status, self.headers, "Transfer-Encoding: chunked" if body else "", close=close), body, close

    async def prepare(self, request: HttpRequest, first: bytes = b"") -> None:
        """Send the status line and headers, with the ``first`` chunk of the body if given (one
        packet, so the client reads the answer's start in one go)."""
        if self.prepared:
            return
        conn = self._conn = request._conn
        made = self._head
        if made is None or made[2] != conn.closing_after(request):
            made = self._make_head(request)
        head, self._body, _ = made
        if first and self._body:
            head += _chunk(first)
        conn.send(head)
        self.prepared = True
        await conn.drain()

    async def write(self, data: bytes) -> None:
        """Send one chunk (waits while the client reads slowly); ConnectionResetError if it left."""
        if self._conn is None:
            raise RuntimeError("prepare() the reply before writing to it")
        if data and self._body:
            self._conn.send(_chunk(data))
            await self._conn.drain()

    async def write_eof(self, last: bytes = b"") -> None:
        """End the answer, after a ``last`` chunk if given (one packet)."""
        if self._conn is None:
            raise RuntimeError("prepare() the reply before ending it")
        if not self.finished:
            self.finished = True
            if self._body:
                self._conn.send(_chunk(last) + LAST_CHUNK if last else LAST_CHUNK)
            await self._conn.drain()


Handler = Callable[[HttpRequest], Awaitable[Reply | StreamReply]]
#: Builds the answer to a malformed request: ``(status, message, code)``.
ErrorReply = Callable[[int, str, str], Reply]


def _plain_error(status: int, message: str, code: str) -> Reply:
    return json_reply({"error": {"message": message, "type": "invalid_request_error", "code": code}}, status=status)


DIGITS = frozenset("0123456789")


def _is_number(text: str, digits: frozenset[str]) -> bool:
    """Only digits (``int()`` alone would also take signs, underscores, ``0x`` and non-ASCII digits)."""
    return 0 < len(text) <= 16 and digits.issuperset(text)


def _is_token(text: str) -> bool:
    """A method name: ASCII letters only."""
    return text.isascii() and text.isalpha()


class _BadRequestError(Exception):
    def __init__(self, status: int, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, answers them one at a time, in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.queue: deque[HttpRequest] = deque()
        self.task: asyncio.Task[None] | None = None
        # The keep-alive clock: when it last restarted (None while a request is answered), and one
        # timer that re-arms itself instead of being cancelled and set again on every request.
        self.idle_since: float | None = None
        self.idle: asyncio.TimerHandle | None = None
        self.linger: asyncio.TimerHandle | None = None
        self.paused_reading = False
        self.paused_writing = False
        self.drained: asyncio.Future[None] | None = None
        self.closed = False
        self.ending = False
        self.stop_parsing = False  # after a request whose body was not read, or a malformed one
        # Parse state of the request under way: its head, then its body.
        self.pending: tuple[str, str, CIMultiDictProxy[str], bool] | None = None
        self.length = 0
        self.chunked: bytearray | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        self._start_idle()

    def data_received(self, data: bytes) -> None:
        if self.stop_parsing:
            return
        self.buf += data
        try:
            self._parse()
        except _BadRequestError as exc:
            self.stop_parsing = True
            self.buf.clear()
            reply = self.server.error_reply(exc.status, exc.message, exc.code)
            if self.task is None and not self.queue:
                self._send_reply(reply, close=True)
            else:  # answer the requests before it first
                self.queue.append(_Rejected(self, reply))
        if self.task is None:
            if self.queue:
                self._next()
            elif not self.closed and not self.ending:  # part of a request: the idle clock restarts
                self._start_idle()
        if len(self.queue) >= MAX_PIPELINED and not self.paused_reading and self.transport is not None:
            self.paused_reading = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for timer in (self.idle, self.linger):
            if timer is not None:
                timer.cancel()
        self.queue.clear()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client went away: stop its request (and free its slot)
        self._wake_writer()

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        self._wake_writer()

    # -- writing --------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("the client closed the connection")
        if self.paused_writing:
            self.drained = self.loop.create_future()
            await self.drained
            if self.closed:
                raise ConnectionResetError("the client closed the connection")

    def _wake_writer(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    def close(self) -> None:
        """Close at once."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def end(self) -> None:
        """Close after the answers sent so far: half-close now, discard what still comes, close
        when the client does (or after ``LINGER_S``)."""
        self.stop_parsing = True
        self.buf.clear()
        if self.ending or self.closed or self.transport is None or self.transport.is_closing():
            return
        self.ending = True
        if not self.transport.can_write_eof():
            self.close()
            return
        self.transport.write_eof()
        self.idle_since = None
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        self.linger = self.loop.call_later(LINGER_S, self.close)

    def closing_after(self, request: HttpRequest) -> bool:
        return not request.keep_alive or (self.stop_parsing and not self.queue) or self.server.stopping

    def _send_reply(self, reply: Reply, *, close: bool, head_only: bool = False) -> None:
        body = b"" if reply.status in NO_BODY_STATUS or 100 <= reply.status < 200 else reply.body
        framing = f"Content-Length: {len(body)}"
        with contextlib.suppress(ConnectionResetError):
            self.send(_head(reply.status, reply.headers, framing, close=close) + (b"" if head_only else body))
        if close:
            self.end()

    # -- parsing --------------------------------------------------------------------------
    def _parse(self) -> None:
        while not self.stop_parsing:
            if self.pending is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD_BYTES:
                        raise _BadRequestError(431, "the request head is over 64 KiB", "head_too_large")
                    return
                if end > MAX_HEAD_BYTES:
                    raise _BadRequestError(431, "the request head is over 64 KiB", "head_too_large")
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                if not head.strip():
                    continue  # stray empty lines between requests are allowed
                self._start_request(head)
                if self.pending is None:
                    continue
            if self.chunked is not None:
                if not self._read_chunks():
                    return
                body = bytes(self.chunked)
                self.chunked = None
            else:
                if len(self.buf) < self.length:
                    return
                body = bytes(self.buf[: self.length])
                del self.buf[: self.length]
            method, target, headers, keep_alive = self.pending
            self.pending = None
            self.queue.append(HttpRequest(self, method, target, headers, body, keep_alive=keep_alive))

    def _start_request(self, head: bytes) -> None:
        lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not _is_token(parts[0]) or not parts[2].startswith("HTTP/1."):
            raise _BadRequestError(400, f"bad request line {lines[0][:60]!r}")
        method, target, version = parts
        if target.startswith(("http://", "https://")):  # absolute form: keep the path and query
            slash = target.find("/", target.find("//") + 2)
            target = target[slash:] if slash >= 0 else "/"
        if not target.startswith("/") and target != "*":
            raise _BadRequestError(400, f"bad request target {target[:60]!r}")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or " " in name:
                raise _BadRequestError(400, f"bad header line {line[:60]!r}")
            headers.add(name, value.strip())
        connection = headers.get("Connection")
        if connection is None:
            keep_alive = version != "HTTP/1.0"
        else:
            tokens = {t.strip().lower() for t in connection.split(",")}
            keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
        te = headers.get("Transfer-Encoding")
        lengths = headers.getall("Content-Length", [])
        if te is not None:
            if lengths:
                raise _BadRequestError(400, "both Content-Length and Transfer-Encoding are set")
            if te.split(",")[-1].strip().lower() != "chunked":
                raise _BadRequestError(400, f"unsupported Transfer-Encoding {te[:40]!r}")
            length = -1
        elif lengths:
            if (len(lengths) > 1 and len(set(lengths)) != 1) or not _is_number(lengths[0], DIGITS):
                raise _BadRequestError(400, f"bad Content-Length {','.join(lengths)[:40]!r}")
            length = int(lengths[0])
        else:
            length = 0
        frozen = CIMultiDictProxy(headers)
        if length > self.server.max_body_bytes:
            # Not read: the handler answers 413 and the connection closes after it.
            self.stop_parsing = True
            self.buf.clear()
            self.queue.append(HttpRequest(self, method, target, frozen, b"", keep_alive=False, too_large=True))
            return
        if length != 0 and headers.get("Expect", "").lower() == "100-continue":
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.pending = (method, target, frozen, keep_alive)
        self.length = max(length, 0)
        self.chunked = bytearray() if length < 0 else None

    def _read_chunks(self) -> bool:
        """Move whole chunks from the buffer into the body; True once the last one is in (False
        while more must arrive, or when the body outgrew the limit and was handed over unread)."""
        assert self.chunked is not None
        try:
            return take_chunks(self.buf, self.chunked, self.server.max_body_bytes)
        except ChunkError as exc:
            raise _BadRequestError(400, str(exc)) from None
        except BodyLimitError:
            self.chunked = None
            assert self.pending is not None
            method, target, headers, _ = self.pending
            self.pending = None
            self.stop_parsing = True
            self.buf.clear()
            self.queue.append(HttpRequest(self, method, target, headers, b"", keep_alive=False, too_large=True))
            return False  # handed over unread: parsing stops

    # -- answering ------------------------------------------------------------------------
    def _next(self) -> None:
        self.idle_since = None
        request = self.queue.popleft()
        self.task = self.loop.create_task(self._answer(request))
        self.server.tasks.add(self.task)
        self.task.add_done_callback(self._answered)
        if self.paused_reading and len(self.queue) < MAX_PIPELINED // 2 and self.transport is not None:
            self.paused_reading = False
            self.transport.resume_reading()

    def _answered(self, task: asyncio.Task[None]) -> None:
        self.server.tasks.discard(task)
        self.task = None
        if self.closed:
            return
        if self.queue:
            self._next()
        elif self.stop_parsing or self.server.stopping:
            self.end()
        elif not self.ending:
            self._start_idle()

    def _start_idle(self) -> None:
        """(Re)start the keep-alive clock."""
        self.idle_since = self.loop.time()
        if self.idle is None:
            self.idle = self.loop.call_at(self.idle_since + self.server.keepalive_timeout_s, self._idle_check)

    def _idle_check(self) -> None:
        self.idle = None
        if self.idle_since is None or self.closed:
            return  # answering: the next _start_idle arms a new timer
        due = self.idle_since + self.server.keepalive_timeout_s
        if self.loop.time() >= due:
            self.close()
        else:
            self.idle = self.loop.call_at(due, self._idle_check)

    async def _answer(self, request: HttpRequest) -> None:
        if isinstance(request, _Rejected):
            self._send_reply(request.reply, close=True)
            return
        try:
            reply = await self.server.handler(request)
        except ConnectionResetError:
            self.close()
            return
        except Exception as exc:  # a handler bug must not take the connection's other requests with it
            self.server.failures += 1
            reply = self.server.error_reply(500, "internal error in the proxy", "internal_error")
            if self.server.on_failure is not None:
                self.server.on_failure(request, exc)
        close = self.closing_after(request)
        if isinstance(reply, StreamReply):
            try:
                if not reply.prepared:
                    await reply.prepare(request)
                if not reply.finished:
                    await reply.write_eof()
            except ConnectionResetError:
                self.close()
                return
            if close:
                self.end()
            return
        self._send_reply(reply, close=close, head_only=request.method == "HEAD")


class _Rejected(HttpRequest):
    """A malformed request's place in the pipeline: answered with ``reply``, then the connection closes."""

    __slots__ = ("reply",)

    def __init__(self, conn: _Connection, reply: Reply) -> None:
        super().__init__(conn, "GET", "/", CIMultiDictProxy(CIMultiDict()), b"", keep_alive=False)
        self.reply = reply


class HttpServer:
    """Serves ``handler`` on one listening socket."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
        error_reply: ErrorReply = _plain_error,
        on_failure: Callable[[HttpRequest, Exception], None] | None = None,
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout_s = keepalive_timeout_s
        self.error_reply = error_reply
        self.on_failure = on_failure
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.failures = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def shutdown(self, timeout_s: float) -> None:
        """Stop accepting; let requests in progress finish (up to ``timeout_s``); close every connection."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.task is None and not conn.queue:
                conn.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout_s)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
        for conn in list(self.connections):
            conn.close()
