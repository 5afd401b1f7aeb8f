"""The request path: parse, classify, admit, cap, forward, stream back, account, log.

``/v1/chat/completions`` and ``/v1/completions`` are shaped; every other ``/v1/`` route is
passed through unchanged. Each shaped request ends in exactly one ``request`` event.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from multidict import CIMultiDict

from thinkcap.estimators import GapTally
from thinkcap.proxy.admission import QueueFullError
from thinkcap.proxy.classify import prompt_text
from thinkcap.proxy.errors import ProxyError, error_response
from thinkcap.proxy.logs import logger
from thinkcap.proxy.pool import Replica
from thinkcap.proxy.request.accounting import TokenClock, account
from thinkcap.proxy.request.body import upstream_body
from thinkcap.proxy.request.failures import upstream_failure
from thinkcap.proxy.request.forcing import ForcedRelay
from thinkcap.proxy.request.headers import client_request_id, new_request_id, returned_headers, upstream_headers
from thinkcap.proxy.request.parse import ask_stream_counts, classify, parse_json, read_body, write_cap
from thinkcap.proxy.request.sse import MalformedStreamError, StreamTally, Tokens, whole_tokens
from thinkcap.proxy.state import ProxyState
from thinkcap.proxy.transport.client import Response, UpstreamError
from thinkcap.proxy.transport.server import HttpRequest, Reply, StreamReply

SHAPED = ("/v1/chat/completions", "/v1/completions")
#: Outcomes that count against a replica's health (with any 5xx it answers).
FAILURES = frozenset({"upstream_unreachable", "upstream_disconnected", "upstream_truncated"})


class Exchange:
    """One shaped request on its way through; collects the fields of its ``request`` event."""

    def __init__(self, state: ProxyState, request: HttpRequest) -> None:
        self.state = state
        self.request = request
        self.rid = new_request_id()  # thinkcap's own: it keys feedback, so no client chooses it
        self.loop = asyncio.get_running_loop()
        self.t_arrival = self.loop.time()
        self.t_dispatch: float | None = None
        self.event: dict[str, Any] = {
            "request_id": self.rid,
            "client_request_id": client_request_id(request),
            "route": request.path,
            "arrival_time": state.clock(),
            "type": None,
            "type_source": None,
            "stream": False,
            "status": None,
            "error_kind": None,
        }
        self.tokens: Tokens | None = None
        self.stream: StreamReply | None = None
        self.clock = TokenClock()  # its tokens' times (gaps for the step fit: batching engines only)
        self.replica: Replica | None = None
        self.forced: tuple[int, bool] | None = None  # budget forcing: the cap, and whether the client streams
        self.upstream: dict[str, Any] = {}  # the body sent upstream
        self.running = False  # the stream's chunks carry the server's running token count

    def fail(self, exc: ProxyError) -> Reply:
        self.event["status"] = exc.status
        self.event["error_kind"] = self.event["error_kind"] or exc.code
        retry = self.state.settings.proxy.retry_after_s if exc.status in (429, 503) else None
        return error_response(exc, self.rid, retry_after=retry)

    async def run(self) -> Reply | StreamReply:
        st = self.state
        raw = await read_body(self.request, st.settings.proxy.max_body_bytes)
        body = parse_json(raw)
        before = dict(body)  # what the client sent, for upstream_body
        decision = classify(st, self.request.headers, body)
        self.event.update(type=decision.type, type_source=decision.source, stream=body.get("stream") is True)
        if st.settings.proxy.log_content:
            self.event["prompt"] = prompt_text(body)
        # Bookkeeping that no answer waits for runs while the upstream works on this request.
        self.loop.call_soon(st.arrived, decision.type, self.event["arrival_time"])
        if st.shedding and random.random() >= st.admit_fraction:
            raise ProxyError(503, "the server is overloaded; retry later", "server_error", code="overloaded")
        try:
            await st.admission.enter()
        except QueueFullError:
            raise ProxyError(
                429, "too many requests are waiting; retry later", "rate_limit_error", code="queue_full"
            ) from None
        self.event["queue_wait_s"] = self.loop.time() - self.t_arrival
        self.loop.call_soon(st.metrics.waited, decision.type, self.event["queue_wait_s"])
        try:
            return await self.dispatch(raw, before, body, decision.type)
        finally:
            st.admission.leave()

    async def dispatch(
        self, raw: bytes, before: dict[str, Any], body: dict[str, Any], type_name: str
    ) -> Reply | StreamReply:
        st = self.state
        backend = st.settings.backend
        chat = self.request.path == SHAPED[0]
        stream = body.get("stream") is True
        if chat and st.budget == "forced" and body.get("n") in (None, 1) and isinstance(body.get("messages"), list):
            cap = st.caps.cap(type_name)  # thinkcap ends the reasoning itself: no cap field is written
            self.event.update(cap=cap, effective_limit=cap, client_limit=None, limit_field="forced")
            self.forced = (cap, stream)
            stream = body["stream"] = True  # counted as it comes, whatever the client asked for
        else:
            write_cap(st, self.event, body, type_name, chat=chat)
        asked_usage = False
        if stream:
            strip_usage, self.running = ask_stream_counts(st, body)
            asked_usage = not strip_usage
        headers = upstream_headers(self.request.headers, backend.api_key)
        headers["Content-Type"] = "application/json"
        headers["Accept-Encoding"] = "identity"
        data = upstream_body(raw, before, body)
        self.upstream = body
        pool = st.pool
        tried: frozenset[int] = frozenset()
        replica = pool.pick(tried)
        while True:
            assert replica is not None
            try:
                return await self.attempt(replica, headers, data, stream=stream, asked_usage=asked_usage)
            except UpstreamError as exc:  # refused: nothing was sent, so another replica may take it
                tried |= {replica.index}
                replica = pool.pick(tried)
                if replica is None:
                    raise upstream_failure(exc) from None

    async def attempt(
        self, replica: Replica, headers: CIMultiDict[str], data: bytes, *, stream: bool, asked_usage: bool
    ) -> Reply | StreamReply:
        """Send the request to one replica. Raises :class:`UpstreamError` only when it could not
        be sent (a refused connection); every other failure is the client's answer."""
        st = self.state
        backend = st.settings.backend
        self.replica = replica
        if len(st.pool) > 1:
            self.event["replica"] = replica.url
        replica.sent += 1
        self.t_dispatch = self.loop.time()
        occupancy = replica.occupancy
        mark = self.clock.enter(occupancy, self.t_dispatch, streamed=stream)
        if stream and st.step is not None:
            self.clock.gaps = GapTally()
        # What the outcome says of the replica: a failure, a success (``counted``), or nothing
        # (the client went away; a timeout after the answer started is the generation's length).
        failure: str | None = None
        counted = False
        try:
            if backend.total_timeout_s is None:  # the default: no timer to set and cancel
                reply = await self.relay(replica, headers, data, stream=stream, asked_usage=asked_usage)
            else:
                async with asyncio.timeout(backend.total_timeout_s):
                    reply = await self.relay(replica, headers, data, stream=stream, asked_usage=asked_usage)
            status = self.event.get("upstream_status")
            counted = self.event["error_kind"] != "upstream_timeout"
            if self.event["error_kind"] in FAILURES:
                failure = self.event["error_kind"]
            elif isinstance(status, int) and status >= 500:
                failure = f"HTTP {status}"
            return reply
        except UpstreamError as exc:
            failure = str(exc)
            if exc.kind == "unreachable":
                raise
            raise upstream_failure(exc) from None
        except TimeoutError as exc:
            err = upstream_failure(exc)
            if self.stream is not None and self.stream.prepared:  # the total limit struck mid-stream
                return await self.end_stream(self.stream, err)
            failure = "timed out before the first byte"
            raise err from None
        except ProxyError as exc:
            if exc.code in FAILURES:
                failure = exc.code
            elif exc.code == "upstream_timeout":  # raised by the stream before its first event
                failure = "timed out before the first byte"
            counted = True
            raise
        finally:
            self.event["mean_in_service"] = self.clock.leave(occupancy, self.loop.time(), since=self.t_dispatch,
                                                             mark=mark, streamed=stream)  # fmt: skip
            if failure is None:
                if counted:
                    st.pool.succeeded(replica)
            elif st.pool.failed(replica, failure, st.clock()):
                logger().error(
                    "replica", action="ejected", replica=replica.url, error=failure, healthy=st.pool.healthy_slots()
                )

    async def relay(
        self, replica: Replica, headers: CIMultiDict[str], data: bytes, *, stream: bool, asked_usage: bool
    ) -> Reply | StreamReply:
        """Send the shaped request upstream and relay the answer, streamed or whole."""
        if self.forced is not None:
            cap, client_stream = self.forced
            return await ForcedRelay(self, replica, headers, self.upstream, cap=cap, client_stream=client_stream,
                                     asked_usage=asked_usage).run()  # fmt: skip
        async with await replica.lean().request("POST", self.request.path_qs, headers, data) as up:
            self.event["upstream_status"] = up.status
            if stream and up.status == 200 and up.content_type == "text/event-stream":
                return await self.relay_stream(up, strip_usage=not asked_usage)
            return await self.relay_body(up)

    async def relay_body(self, up: Response) -> Reply:
        raw = await up.read()
        if up.status == 200:
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                data = None
            if not isinstance(data, dict):
                raise ProxyError(
                    502,
                    "the upstream server sent a response that is not a JSON object",
                    "upstream_error",
                    code="upstream_malformed",
                )
            self.tokens = whole_tokens(data)
        else:
            self.event["error_kind"] = "upstream_status"
        self.event["status"] = up.status
        return Reply(raw, status=up.status, headers=returned_headers(up.headers, self.rid))

    async def end_stream(self, resp: StreamReply, err: ProxyError) -> StreamReply:
        """End a stream already under way with an ``error`` event (its status line is sent)."""
        self.event.update(status=err.status, error_kind=err.code)
        await resp.write(b"data: " + json.dumps(err.body(self.rid)).encode() + b"\n\n")
        await resp.write_eof()
        return resp

    async def relay_stream(self, up: Response, *, strip_usage: bool) -> StreamReply:
        tally = StreamTally(strip_usage=strip_usage, running=self.running)
        headers = returned_headers(up.headers, self.rid)
        headers["X-Accel-Buffering"] = "no"  # an nginx in front would otherwise hold the stream back
        resp = self.stream = StreamReply(status=200, headers=headers)
        resp.build_head(self.request)  # while the upstream has yet to send the body, often
        last = b""
        assert self.replica is not None
        occupancy = self.replica.occupancy
        try:
            async for data in up.iter_chunks():
                self.clock.read(data, self.loop.time, occupancy)
                rest = data
                if not resp.prepared:  # the head and the first event leave before the rest of the read is looked at
                    events = tally.feed(data, first_only=True)
                    if events:
                        self.event["first_byte_s"] = self.loop.time() - self.t_arrival
                        await resp.prepare(self.request, b"".join(events))
                    if tally.error is not None:
                        raise tally.error
                    rest = b""  # now in the tally's buffer
                events = tally.feed(rest)
                if events:
                    if not resp.prepared:
                        self.event["first_byte_s"] = self.loop.time() - self.t_arrival
                        await resp.prepare(self.request, b"".join(events))
                    elif up.complete and tally.error is None:
                        last = b"".join(events)  # the upstream is done: it leaves with the end of the answer
                    else:
                        await resp.write(b"".join(events))
                if tally.error is not None:
                    raise tally.error
        except (MalformedStreamError, UpstreamError, TimeoutError) as exc:
            err = upstream_failure(exc, mid_stream=True)
            if not resp.prepared:
                raise err from None
            return await self.end_stream(resp, err)
        tail = tally.flush()
        if not resp.prepared:
            await resp.prepare(self.request)
        self.tokens = tally.tokens()
        if not tally.done:  # the upstream ended without [DONE]: the client must not take the answer as whole
            await resp.write(last + tail)
            err = ProxyError(
                502, "the upstream ended the stream before [DONE]", "upstream_error", code="upstream_truncated"
            )
            return await self.end_stream(resp, err)
        await resp.write_eof(last + tail)
        self.event["status"] = 200
        return resp

    def finish(self) -> None:
        """Account, remember and log the request (exactly once)."""
        account(self.state, self.event, self.tokens, self.rid, end=self.loop.time(), t_arrival=self.t_arrival,
                t_dispatch=self.t_dispatch, clock=self.clock)  # fmt: skip


async def shaped(state: ProxyState, request: HttpRequest) -> Reply | StreamReply:
    """``POST /v1/chat/completions`` and ``POST /v1/completions``."""
    ex = Exchange(state, request)
    try:
        return await ex.run()
    except ProxyError as exc:
        return ex.fail(exc)
    except asyncio.CancelledError:
        if request.drain_expired:  # stopping: the drain ran out before this answer finished
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            err = ProxyError(503, "thinkcap is stopping and this answer did not finish within its drain_timeout_s; "
                             "retry", "server_error", code="shutting_down")  # fmt: skip
            if ex.stream is not None and ex.stream.prepared:
                return await ex.end_stream(ex.stream, err)
            return ex.fail(err)
        ex.event.update(status=499, error_kind="client_disconnected")
        raise
    except ConnectionResetError:
        ex.event.update(status=499, error_kind="client_disconnected")
        raise
    finally:
        # Accounting and the log line run just after the response is written, off its path.
        ex.loop.call_soon(ex.finish)
