"""The data plane's HTTP/1.1 server: llhttp parses the bytes, a lean asyncio protocol answers.

The bytes of HTTP/1.1 are parsed by llhttp, the parser of Node.js, through ``httptools``, in
its strict mode (no leniency flag set); this module writes no framing logic of its own. The
protocol object feeds ``data_received`` to the parser and reacts to its callbacks. What a
JSON API gateway needs, and no more:

- keep-alive, and pipelined requests answered in order; HTTP/1.0 closes after each answer;
- request bodies framed by ``Content-Length`` or chunked, read whole up to a limit counted
  as the bytes arrive, inside a chunk too (a larger one is handed to the handler unread as
  :attr:`HttpRequest.too_large`, and the connection closes after the answer);
- ``Expect: 100-continue`` is the server's own: ``100 Continue`` is sent when the request is
  the next to be answered and its body is within the limit, never in the middle of another
  answer; other expectations get 417;
- whole answers (:class:`Reply`) and streamed ones (:class:`StreamReply`, chunked), with
  write back-pressure;
- limits where the bytes arrive: the head's size (:data:`MAX_HEAD_BYTES`) and header count
  (:data:`MAX_HEADERS`), a deadline for the whole head, a minimum rate for the body, and a
  cap on open connections (beyond it a 503 and a close);
- the request target is checked once, and what is routed is what is forwarded: dot segments
  and encoded dots, slashes and backslashes are refused (400);
- the handler is cancelled when its client goes away, an idle keep-alive connection closes
  after a timeout, and :meth:`HttpServer.shutdown` stops accepting, lets requests in
  progress finish up to a deadline, then closes everything.

A request the parser rejects (bad request line, header or framing, control bytes anywhere in
the head, a transfer coding other than plain ``chunked``) gets a 400 (431 for a head over
the limits, 505 for a version other than HTTP/1.x, 408 past a deadline) from ``error_reply``
after the answers before it, and the connection closes. The admin listener stays on aiohttp:
it is not on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import json
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast
from urllib.parse import unquote

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from thinkcap.proxy.transport.tcp import no_delay

#: The request line and headers together, at most.
MAX_HEAD_BYTES = 64 * 1024
#: Header lines in one request, at most.
MAX_HEADERS = 100
#: An idle keep-alive connection is closed after this long.
KEEPALIVE_TIMEOUT_S = 75.0
#: A request head must arrive whole within this long of its first byte.
HEAD_TIMEOUT_S = 10.0
#: A request body must keep arriving at this many bytes a second at least, over each window of
#: :data:`BODY_RATE_WINDOW_S`.
BODY_MIN_RATE = 1024
BODY_RATE_WINDOW_S = 5.0
#: Open client connections, at most; more are answered 503 and closed.
MAX_CONNECTIONS = 2048
#: How long shutdown waits for closed connections to let go of their sockets.
CLOSE_WAIT_S = 1.0
#: Seconds a handler cancelled when the drain ran out has to answer with its error.
EXPIRED_ANSWER_S = 1.0
#: Pipelined requests parsed ahead of the one being answered before reading pauses.
MAX_PIPELINED = 16
#: Response framing is the server's: handlers' values for these are ignored.
FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
NO_BODY_STATUS = frozenset({204, 304})
#: A connection that the server ends after an answer keeps reading (and discarding) for up
#: to this long, so that a client still sending a body it will not have read gets the
#: answer instead of a reset.
LINGER_S = 2.0
#: Bytes a request head may not hold anywhere (llhttp refuses most of them; this check is
#: the server's own word for the rest, tab aside).
CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: What a request path may not hold: a dot segment, or a dot, slash or backslash in disguise.
HIDDEN_PATH = re.compile(r"(?:^|/)\.{1,2}(?:/|$)|%2[eEfF]|%5[cC]|\\")


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
        #: The target as the client sent it (checked: see :data:`HIDDEN_PATH`); forwarded as is.
        self.path_qs = path_qs
        raw_path, _, self.query_string = path_qs.partition("?")
        #: The path, percent-decoded, for routing (it names the same resource as ``path_qs``).
        self.path = unquote(raw_path)
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        #: The body exceeded the server's limit and was not read; the connection closes after the answer.
        self.too_large = too_large

    @property
    def drain_expired(self) -> bool:
        """The server's drain ran out (see :meth:`HttpServer.shutdown`): a handler cancelled for
        that reason may still answer with an error instead of dropping the connection."""
        return self._conn.server.expired

    @property
    def client_gone(self) -> bool:
        """The client closed its connection (its handler is being cancelled)."""
        return self._conn.closed

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
    now = int(time.time())  # the Date header is wall-clock time
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
    """``data`` as one chunk of a chunked answer."""
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


class _BadRequestError(Exception):
    def __init__(self, status: int, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _TooLargeError(Exception):
    """The body under way outgrew the limit: the request is handed over unread, parsing stops."""


class _Connection(asyncio.Protocol):
    """One client connection: llhttp parses its requests; they are answered one at a time, in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[HttpRequest] = deque()
        self.task: asyncio.Task[None] | None = None
        # The keep-alive clock: when it last restarted (None while a request is answered), and one
        # timer that re-arms itself instead of being cancelled and set again on every request.
        self.idle_since: float | None = None
        self.idle: asyncio.TimerHandle | None = None
        self.linger: asyncio.TimerHandle | None = None
        self.deadline: asyncio.TimerHandle | None = None  # of the head, then of the body's rate
        self.paused_reading = False
        self.paused_writing = False
        self.drained: asyncio.Future[None] | None = None
        self.closed = False
        self.ending = False
        self.stop_parsing = False  # after a request whose body was not read, or a malformed one
        # The request under way: its head as the parser hands it over, then its body.
        self.url = bytearray()
        self.headers: list[tuple[str, str]] = []
        self.head_bytes = 0
        self.in_body = False
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.body_seen = 0  # body bytes when the rate was last checked
        self.continue_due = False  # 100 Continue is owed once this request is the next to answer
        self.head_made: tuple[str, str, CIMultiDictProxy[str]] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        if len(self.server.connections) >= self.server.max_connections:
            reply = self.server.error_reply(503, "too many open connections; retry later", "too_many_connections")
            reply.headers["Retry-After"] = "1"
            self.closed = True
            with contextlib.suppress(OSError):
                self.transport.write(_head(503, reply.headers, f"Content-Length: {len(reply.body)}", close=True))
                self.transport.write(reply.body)
            self.transport.close()
            return
        no_delay(transport)
        self.server.connections.add(self)
        self._start_idle()

    def data_received(self, data: bytes) -> None:
        if self.stop_parsing or self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.stop_parsing = True  # the request is answered; the connection closes after it
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _BadRequestError):
                self._reject(cause)
            elif not isinstance(cause, _TooLargeError):  # a bug here: the client is told, nothing else breaks
                self.server.failures += 1
                self._reject(_BadRequestError(400, "the request could not be read", "bad_request"))
        except httptools.HttpParserError as exc:
            self._reject(_BadRequestError(400, f"malformed request: {exc}"))
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
        for timer in (self.idle, self.linger, self.deadline):
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

    # -- llhttp's callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url.clear()
        self.headers = []
        self.head_bytes = 0
        self.in_body = False
        self.body = []
        self.body_bytes = 0
        self._set_deadline(self.server.head_timeout_s, "the request head did not arrive in time")

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        if len(self.headers) >= MAX_HEADERS:
            raise _BadRequestError(431, f"more than {MAX_HEADERS} header lines", "too_many_headers")
        if CONTROL.search(value) or CONTROL.search(name):
            raise _BadRequestError(400, "a header holds a control byte")
        self.headers.append((name.decode("latin-1"), value.decode("latin-1").strip(" \t")))

    def on_headers_complete(self) -> None:
        version = self.parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _BadRequestError(505, f"HTTP/{version} is not supported", "http_version_not_supported")
        target = self.url.decode("latin-1")
        if CONTROL.search(self.url) or " " in target:
            raise _BadRequestError(400, "the request target holds a control byte")
        if target.startswith(("http://", "https://")):  # absolute form: keep the path and query
            slash = target.find("/", target.find("//") + 2)
            target = target[slash:] if slash >= 0 else "/"
        if not target.startswith("/") and target != "*":
            raise _BadRequestError(400, f"bad request target {target[:60]!r}")
        if HIDDEN_PATH.search(target.partition("?")[0]):
            raise _BadRequestError(400, "the request path holds a dot segment or an encoded dot, slash or backslash")
        headers: CIMultiDict[str] = CIMultiDict(self.headers)
        codings = headers.getall("Transfer-Encoding", [])
        if codings and [c.strip().lower() for c in codings] != ["chunked"]:
            raise _BadRequestError(400, f"unsupported Transfer-Encoding {', '.join(codings)[:40]!r}")
        frozen = CIMultiDictProxy(headers)
        method = self.parser.get_method().decode("ascii")
        self.head_made = (method, target, frozen)
        self._cancel_deadline()
        self.in_body = True
        length = int(headers.get("Content-Length", "0")) if not codings else -1
        if length > self.server.max_body_bytes:
            self._too_large()
        expect = headers.get("Expect")
        if expect is not None:
            if expect.strip().lower() != "100-continue":
                raise _BadRequestError(417, f"unsupported expectation {expect[:40]!r}", "expectation_failed")
            if length != 0:
                self.continue_due = True
                self._send_continue_if_next()
        if not self.continue_due and length != 0:
            self._watch_body()

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > self.server.max_body_bytes:
            self._too_large()
        self.body.append(body)

    def on_message_complete(self) -> None:
        made = self.head_made
        if made is None:  # (the parser calls this only after on_headers_complete)
            raise _BadRequestError(400, "a message without a head")
        self.head_made = None
        self.in_body = False
        self.continue_due = False
        self._cancel_deadline()
        method, target, headers = made
        body = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body = []
        keep_alive = self.parser.should_keep_alive()
        self.queue.append(HttpRequest(self, method, target, headers, body, keep_alive=keep_alive))

    # -- limits ---------------------------------------------------------------------------
    def _count_head(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _BadRequestError(431, f"the request head is over {MAX_HEAD_BYTES // 1024} KiB", "head_too_large")

    def _too_large(self) -> None:
        """Hand the request over unread (its handler answers 413); the connection closes after it."""
        made = self.head_made
        assert made is not None
        self.head_made = None
        self._cancel_deadline()
        self.stop_parsing = True
        self.continue_due = False
        method, target, headers = made
        self.queue.append(HttpRequest(self, method, target, headers, b"", keep_alive=False, too_large=True))
        raise _TooLargeError

    def _set_deadline(self, seconds: float, message: str) -> None:
        self._cancel_deadline()
        self.deadline = self.loop.call_later(seconds, self._timed_out, message)

    def _cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _watch_body(self) -> None:
        self.body_seen = self.body_bytes
        self.deadline = self.loop.call_later(self.server.body_rate_window_s, self._check_rate)

    def _check_rate(self) -> None:
        self.deadline = None
        if not self.in_body or self.closed:
            return
        if self.body_bytes - self.body_seen < self.server.body_min_rate * self.server.body_rate_window_s:
            self._timed_out(f"the request body arrived slower than {self.server.body_min_rate} bytes/s")
        else:
            self._watch_body()

    def _timed_out(self, message: str) -> None:
        self.deadline = None
        if self.closed or self.stop_parsing:
            return
        self._reject(_BadRequestError(408, message, "request_timeout"))
        if self.task is None and self.queue:
            self._next()

    def _reject(self, exc: _BadRequestError) -> None:
        """Answer ``exc`` after the requests before it; then the connection closes."""
        self.stop_parsing = True
        self.continue_due = False
        self._cancel_deadline()
        reply = self.server.error_reply(exc.status, exc.message, exc.code)
        if self.task is None and not self.queue:
            self._send_reply(reply, close=True)
        else:  # answer the requests before it first
            self.queue.append(_Rejected(self, reply))

    def _send_continue_if_next(self) -> None:
        """Send the ``100 Continue`` owed, if no earlier answer is still being written."""
        if self.continue_due and self.task is None and not self.queue and not self.closed:
            self.continue_due = False
            with contextlib.suppress(ConnectionResetError):
                self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._watch_body()

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
        self._cancel_deadline()
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
            self._send_continue_if_next()
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
    """Serves ``handler`` on one listening socket (limits: see the module's notes)."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
        head_timeout_s: float = HEAD_TIMEOUT_S,
        body_min_rate: int = BODY_MIN_RATE,
        body_rate_window_s: float = BODY_RATE_WINDOW_S,
        max_connections: int = MAX_CONNECTIONS,
        error_reply: ErrorReply = _plain_error,
        on_failure: Callable[[HttpRequest, Exception], None] | None = None,
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout_s = keepalive_timeout_s
        self.head_timeout_s = head_timeout_s
        self.body_min_rate = body_min_rate
        self.body_rate_window_s = body_rate_window_s
        self.max_connections = max_connections
        self.error_reply = error_reply
        self.on_failure = on_failure
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.expired = False  # the drain ran out: what still runs is cancelled
        self.failures = 0
        self._hurry = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    def hurry(self) -> None:
        """End a :meth:`shutdown`'s wait for requests in progress now (a second stop signal)."""
        self._hurry.set()

    async def shutdown(self, timeout_s: float) -> None:
        """Stop accepting; let requests in progress finish (up to ``timeout_s``, or until
        :meth:`hurry`); cancel what still runs, with :attr:`HttpRequest.drain_expired` set so
        that its handler can answer with an error (up to ``EXPIRED_ANSWER_S``); close every
        connection."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.task is None and not conn.queue:
                conn.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        hurry = loop.create_task(self._hurry.wait())
        try:
            while self.tasks and not self._hurry.is_set() and (left := deadline - loop.time()) > 0:
                await asyncio.wait([*self.tasks, hurry], timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
        self.expired = True
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=EXPIRED_ANSWER_S)
        for conn in list(self.connections):
            conn.close()
        # A closed transport lets go of its socket one loop turn later: wait for that (briefly),
        # so that nothing is left open when the caller's event loop ends.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_WAIT_S
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.001)
        if self._server is not None:
            await self._server.wait_closed()
