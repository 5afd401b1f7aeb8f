"""A lean HTTP/1.1 client with a keep-alive pool, for the proxy's hot path to the model server.

The shaped routes send one JSON body and relay one answer; a general-purpose client spends
more time per request than the proxy's own work, so this one does only what they need:
``Content-Length`` request bodies; ``Content-Length``, chunked or read-to-close responses;
a connect timeout, a read timeout between bytes, and pooled connections. A pooled connection
that the server closed while idle fails before any response byte; such a request is retried
once on a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from multidict import CIMultiDict

from proxy.chunked import ChunkError, take_chunks

MAX_HEAD_BYTES = 64 * 1024
READ_SIZE = 64 * 1024


class UpstreamError(Exception):
    """The upstream failed: ``kind`` is ``unreachable``, ``disconnected`` or ``malformed``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class Response:
    """An upstream answer; read it with :meth:`read` or :meth:`iter_chunks`, inside ``async with``."""

    def __init__(
        self, pool: Upstream, conn: _Conn, status: int, headers: CIMultiDict[str], method: str, *, wait: _ReadDeadline
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._wait = wait
        self.status = status
        self.headers = headers
        self._done = False
        #: Whether the body's last byte has been read (set before the piece it ends is handed out).
        self.complete = False
        self._reuse = headers.get("Connection", "").lower() != "close"
        te = headers.get("Transfer-Encoding", "").lower()
        self._chunked = "chunked" in te
        length = headers.get("Content-Length")
        self._remaining: int | None = None
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            self._remaining = 0
        elif not self._chunked and length is not None:
            try:
                self._remaining = int(length)
            except ValueError:
                raise UpstreamError("malformed", f"bad Content-Length {length!r}") from None
        elif not self._chunked:
            self._reuse = False  # read to close

    @property
    def content_type(self) -> str:
        """The media type, without parameters."""
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: each piece is what one read brought (for a chunked body, the
        payloads of the whole chunks it completed, joined; one read often holds many)."""
        r = self._conn.reader
        wait = self._wait
        try:
            if self._chunked:
                # The first piece is the first chunk alone, handed out before the rest of its read
                # is taken apart; after it, each piece is every whole chunk that a read completed.
                buf, done, first, buffered = bytearray(), False, True, False
                while not done:
                    if not buffered:
                        wait.start()
                        data = await r.read(READ_SIZE)
                        wait.stop()
                        if not data:
                            raise UpstreamError("disconnected", "the upstream closed the connection mid-body")
                        buf += data
                    payload = bytearray()
                    try:
                        done = self.complete = take_chunks(buf, payload, one=first)
                    except ChunkError as exc:
                        raise UpstreamError("malformed", f"the upstream's chunked body: {exc}") from None
                    buffered = first and bool(payload) and bool(buf)
                    if payload:
                        first = False
                        yield bytes(payload)
                if buf:
                    self._reuse = False  # bytes after the body: the connection is not trusted again
            elif self._remaining is not None:
                while self._remaining > 0:
                    wait.start()
                    data = await r.read(min(READ_SIZE, self._remaining))
                    wait.stop()
                    if not data:
                        raise UpstreamError("disconnected", "the upstream closed the connection mid-body")
                    self._remaining -= len(data)
                    self.complete = self._remaining <= 0
                    yield data
            else:
                while True:
                    wait.start()
                    data = await r.read(READ_SIZE)
                    wait.stop()
                    if not data:
                        break
                    yield data
        except ConnectionError as exc:
            raise UpstreamError("disconnected", f"the upstream connection broke: {type(exc).__name__}") from None
        except asyncio.CancelledError:
            if wait.expired():
                raise TimeoutError("no byte from the upstream within the read timeout") from None
            raise
        self._done = self.complete = True

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self.iter_chunks()])

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._wait.close()
        if self._done and self._reuse and exc is None:
            self._pool.put(self._conn)
        else:
            self._conn.close()


class _ReadDeadline:
    """The read timeout of one response: a read (the head, one chunk, or one buffer) that takes
    longer than ``limit`` seconds cancels the reader, which then raises ``TimeoutError``.

    ``start()`` before a read and ``stop()`` after it cost a clock read; one timer per response
    checks them and re-arms itself while bytes keep coming. A timer per read (``asyncio.timeout``)
    costs more than relaying the read's bytes on a stream of one-token chunks. The time the
    consumer spends between reads (writing to a slow client) does not count.
    """

    def __init__(self, limit: float | None) -> None:
        self.limit = limit
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.since: float | None = None
        self.fired = False
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self.limit is None:
            return
        self.since = now = self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_at(now + self.limit, self._check)

    def stop(self) -> None:
        self.since = None
        if self.fired and self.expired():  # it struck just as the read completed
            raise TimeoutError("no byte from the upstream within the read timeout")

    def _check(self) -> None:
        self.timer = None
        if self.since is None or self.limit is None or self.task is None:
            return  # not reading now: the next start() arms a new timer
        due = self.since + self.limit
        if self.loop.time() >= due:
            self.fired = True
            self.task.cancel()
        else:
            self.timer = self.loop.call_at(due, self._check)

    def expired(self) -> bool:
        """Whether this deadline cancelled the reader (and the cancellation is then withdrawn)."""
        if self.fired and self.task is not None:
            self.fired = False
            return self.task.uncancel() == 0
        return False

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Upstream:
    """A pool of keep-alive connections to one origin."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float | None = 10.0,
        read_timeout_s: float | None = None,
        max_idle: int = 256,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http(s)://host[:port][/path], got {base_url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        default = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        self.host_header = self.host if default else f"{self.host}:{self.port}"
        if ":" in self.host and not default:
            self.host_header = f"[{self.host}]:{self.port}"
        self.prefix = parts.path.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_idle = max_idle
        self._idle: list[_Conn] = []
        self._ssl = ssl.create_default_context() if self.tls else None

    def put(self, conn: _Conn) -> None:
        """Return a healthy connection to the pool."""
        if len(self._idle) < self.max_idle and not conn.writer.is_closing():
            self._idle.append(conn)
        else:
            conn.close()

    async def _connect(self) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self._ssl, limit=MAX_HEAD_BYTES,
                    server_hostname=self.host if self.tls else None,
                )  # fmt: skip
        except TimeoutError:
            raise UpstreamError("unreachable", f"connecting to {self.host_header} timed out") from None
        except OSError as exc:
            raise UpstreamError("unreachable", f"cannot connect to {self.host_header}: {exc.strerror or exc}") from None
        return _Conn(reader, writer)

    def _head(self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes) -> bytes:
        lines = [f"{method} {self.prefix}{path_qs} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def request(self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes) -> Response:
        """Send one request and read the response head (the body is read from the result)."""
        payload = self._head(method, path_qs, headers, body) + body
        while self._idle:
            conn = self._idle.pop()
            if conn.writer.is_closing():
                conn.close()
                continue
            try:
                return await self._exchange(conn, payload, method)
            except _StaleError:
                continue  # the server closed it while it was idle: try another
        return await self._exchange(await self._connect(), payload, method, fresh=True)

    async def _exchange(self, conn: _Conn, payload: bytes, method: str, *, fresh: bool = False) -> Response:
        r, w = conn.reader, conn.writer
        wait = _ReadDeadline(self.read_timeout_s)
        response: Response | None = None
        try:
            w.write(payload)
            if w.transport.get_write_buffer_size() > READ_SIZE:
                await w.drain()
            wait.start()
            head = await r.readuntil(b"\r\n\r\n")
            wait.stop()
            status, headers = _parse_head(head)
            response = Response(self, conn, status, headers, method, wait=wait)  # it closes the deadline
            return response
        except asyncio.IncompleteReadError as exc:
            conn.close()
            if not exc.partial and not fresh:
                raise _StaleError from None
            raise UpstreamError("disconnected", "the upstream closed the connection before answering") from None
        except ConnectionError as exc:
            conn.close()
            if not fresh:
                raise _StaleError from None
            raise UpstreamError("disconnected", f"the upstream connection broke: {type(exc).__name__}") from None
        except asyncio.LimitOverrunError:
            conn.close()
            raise UpstreamError("malformed", "the upstream response head is too long") from None
        except asyncio.CancelledError:
            conn.close()
            if wait.expired():
                raise TimeoutError("no response from the upstream within the read timeout") from None
            raise
        except BaseException:
            conn.close()
            raise
        finally:
            if response is None:
                wait.close()

    async def close(self) -> None:
        """Close every pooled connection."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
            with contextlib.suppress(ConnectionError, OSError):
                await conn.writer.wait_closed()


class _StaleError(Exception):
    pass


def _parse_head(head: bytes) -> tuple[int, CIMultiDict[str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise UpstreamError("malformed", f"bad upstream status line {lines[0][:60]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise UpstreamError("malformed", f"bad upstream header line {line[:60]!r}")
        headers.add(name.strip(), value.strip())
    return int(parts[1]), headers
