"""The request path: parse, classify, admit, cap, forward, stream back, account, log.

``/v1/chat/completions`` and ``/v1/completions`` are shaped; every other ``/v1/`` route is
passed through unchanged. Each shaped request ends in exactly one ``request`` event.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from thinkcap.estimators import GapTally
from thinkcap.proxy.admission import QueueFullError
from thinkcap.proxy.classify import Decision, UnknownTypeError, prompt_text
from thinkcap.proxy.logs import logger
from thinkcap.proxy.pool import Replica
from thinkcap.proxy.request.body import upstream_body
from thinkcap.proxy.request.dialects import ClientLimitError, apply_cap
from thinkcap.proxy.request.errors import REQUEST_ID, ProxyError, error_response
from thinkcap.proxy.request.sse import CONTENT, REASONING, MalformedStreamError, StreamTally, Tokens, from_usage
from thinkcap.proxy.state import Finished, ProxyState
from thinkcap.proxy.transport.client import Response, UpstreamError
from thinkcap.proxy.transport.server import BodyTooLargeError, HttpRequest, Reply, StreamReply

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
#: Response headers not copied back (the body is re-framed; aiohttp's client, used for the
#: pass-through routes, also decompresses it).
NOT_RETURNED = HOP_BY_HOP | {"date", "server"}
NOT_RETURNED_DECODED = NOT_RETURNED | {"content-encoding"}
TYPE_HEADER = "X-Thinkcap-Type"
GOOD_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SHAPED = ("/v1/chat/completions", "/v1/completions")
#: Outcomes that count against a replica's health (with any 5xx it answers).
FAILURES = frozenset({"upstream_unreachable", "upstream_disconnected", "upstream_truncated"})


#: New request ids: a random prefix per process and a counter, 32 hex digits in all (unique
#: without a system call per request, which a fresh UUID costs).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """A request id made here."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def client_request_id(request: HttpRequest) -> str | None:
    """The client's ``X-Request-Id``, if it is sane (it is forwarded upstream and logged)."""
    given = request.headers.get(REQUEST_ID)
    return given if given is not None and GOOD_ID.fullmatch(given) else None


#: Request headers never sent upstream (the proxy asks for an unencoded answer itself, and
#: answers ``Expect: 100-continue`` itself).
NOT_FORWARDED = HOP_BY_HOP | {TYPE_HEADER.lower(), "accept-encoding", "expect"}  # Expect is the proxy's own


def upstream_headers(incoming: CIMultiDictProxy[str], api_key: str | None) -> CIMultiDict[str]:
    """End-to-end request headers for the upstream; the backend key replaces the client's."""
    drop = NOT_FORWARDED
    connection = incoming.get("Connection")
    if connection is not None:  # and the headers it names as hop-by-hop
        drop = drop | {h.strip().lower() for h in connection.split(",") if h.strip()}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in incoming.items():
        if k.lower() not in drop:
            out.add(k, v)
    if api_key is not None:
        out["Authorization"] = f"Bearer {api_key}"
    return out


def returned_headers(
    upstream: CIMultiDict[str] | CIMultiDictProxy[str], rid: str, *, decoded: bool = False
) -> CIMultiDict[str]:
    """Upstream response headers to send back, plus the request id."""
    drop = NOT_RETURNED_DECODED if decoded else NOT_RETURNED
    out: CIMultiDict[str] = CIMultiDict((k, v) for k, v in upstream.items() if k.lower() not in drop)
    out[REQUEST_ID] = rid
    return out


def client_timeout(state: ProxyState) -> aiohttp.ClientTimeout:
    """No total limit unless configured; a read timeout between chunks."""
    b = state.settings.backend
    return aiohttp.ClientTimeout(total=b.total_timeout_s, connect=b.connect_timeout_s, sock_read=b.read_timeout_s)


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The raw body, 413 beyond ``max_body_bytes`` (``limit``)."""
    try:
        return await request.read()
    except BodyTooLargeError:
        raise ProxyError(
            413, f"request body larger than {limit} bytes", "invalid_request_error", code="body_too_large"
        ) from None


def parse_json(raw: bytes) -> dict[str, Any]:
    """A JSON object, or 400 (nested too deep for the parser included)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProxyError(
            400, "the request body is not valid JSON", "invalid_request_error", code="invalid_json"
        ) from None
    except RecursionError:
        raise ProxyError(
            400, "the request body is nested too deeply", "invalid_request_error", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise ProxyError(400, "the request body must be a JSON object", "invalid_request_error", code="invalid_body")
    return body


def classify(state: ProxyState, request: HttpRequest, body: dict[str, Any]) -> Decision:
    """Header, then the body's ``thinkcap`` object (removed), then rules, classifier, default."""
    extra = body.pop("thinkcap", None)
    try:
        if TYPE_HEADER in request.headers:
            return state.classifier.explicit(request.headers[TYPE_HEADER])
        if extra is not None:
            if not isinstance(extra, dict) or "type" not in extra:
                raise UnknownTypeError('the "thinkcap" field must be an object like {"type": "math"}')
            return state.classifier.explicit(extra["type"])
    except UnknownTypeError as exc:
        raise ProxyError(400, str(exc), "invalid_request_error", code="unknown_type", param="thinkcap.type") from None
    return state.classifier.classify(prompt_text(body))


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
        # Service measurements for the step fit (batching engines only, see dispatch).
        self.gaps: GapTally | None = None
        self.t_first_token: float | None = None
        self.first_in_service = 1  # requests in service when the first token came
        self.t_token: float | None = None
        self.counted = 0  # token events counted in the stream (a server may put several tokens in one)
        self.replica: Replica | None = None

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
        decision = classify(st, self.request, body)
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
        cap = st.caps.cap(type_name)
        if st.cap_rejected:  # the backend rejects the cap field (see the probe): send none
            self.event.update(cap=cap, effective_limit=None, client_limit=None, limit_field=None, cap_skipped=True)
        else:
            try:
                applied = apply_cap(
                    body,
                    cap,
                    backend.dialect,
                    answer_allowance=backend.answer_allowance,
                    chat=self.request.path == SHAPED[0],
                    thinks=backend.thinks,
                )
            except ClientLimitError as exc:
                raise ProxyError(
                    400, str(exc), "invalid_request_error", code="invalid_limit", param=exc.param
                ) from None
            self.event.update(
                cap=cap, effective_limit=applied.effective, client_limit=applied.client_limit, limit_field=applied.field
            )
        stream = body.get("stream") is True
        asked_usage = False
        if stream:
            options = body.get("stream_options")
            asked_usage = isinstance(options, dict) and options.get("include_usage") is True
            if not asked_usage:
                body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        headers = upstream_headers(self.request.headers, backend.api_key)
        headers["Content-Type"] = "application/json"
        headers["Accept-Encoding"] = "identity"
        data = upstream_body(raw, before, body)
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
                    raise ProxyError(502, str(exc), "upstream_error", code="upstream_unreachable") from None

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
        mark = occupancy.start(self.t_dispatch, streamed=stream, prefill_s=st.prefill_guess_s)
        if stream and st.step is not None:
            self.gaps = GapTally()
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
            code = {"malformed": "upstream_malformed", "too_large": "upstream_too_large"}.get(
                exc.kind, "upstream_disconnected"
            )
            raise ProxyError(502, str(exc), "upstream_error", code=code) from None
        except TimeoutError:
            err = ProxyError(504, "the upstream server timed out", "upstream_error", code="upstream_timeout")
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
            end = self.loop.time()
            area = occupancy.stop(end, prefilling=stream and self.t_first_token is None)
            # Time-averaged number in service on this replica while this request was (itself included).
            self.event["mean_in_service"] = (area - mark) / (end - self.t_dispatch) if end > self.t_dispatch else 1.0
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
            self.tokens = from_usage(data.get("usage"))
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
        tally = StreamTally(strip_usage=strip_usage)
        resp = self.stream = StreamReply(status=200, headers=returned_headers(up.headers, self.rid))
        resp.build_head(self.request)  # while the upstream has yet to send the body, often
        last = b""
        gaps = self.gaps
        try:
            async for data in up.iter_chunks():
                if gaps is not None:
                    self.timed(data, gaps)
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
            if isinstance(exc, MalformedStreamError):
                err = ProxyError(502, str(exc), "upstream_error", code="upstream_malformed")
            elif isinstance(exc, TimeoutError):
                err = ProxyError(
                    504, "the upstream server timed out mid-stream", "upstream_error", code="upstream_timeout"
                )
            else:
                err = ProxyError(
                    502, "the upstream server dropped the stream", "upstream_error", code="upstream_disconnected"
                )
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

    def timed(self, data: bytes, gaps: GapTally) -> None:
        """Time the tokens in one upstream read: the first ends the prefill, each later read is
        a step sample unless a prefill ran since the read before (see :class:`Occupancy`)."""
        tokens = len(CONTENT.findall(data)) + len(REASONING.findall(data))
        if not tokens:
            return
        self.counted += tokens
        now = self.loop.time()
        assert self.replica is not None
        occupancy = self.replica.occupancy
        if self.t_first_token is None:
            self.t_first_token = now
            self.first_in_service = occupancy.in_service
            occupancy.first_token(now)
        elif occupancy.clean(self.t_token or now):
            gaps.add(now - (self.t_token or now), tokens, occupancy.in_service)
        self.t_token = now

    def finish(self) -> None:
        """Account, remember and log the request (exactly once)."""
        st, ev = self.state, self.event
        end = self.loop.time()
        ev["system_time_s"] = end - self.t_arrival
        if self.t_dispatch is not None:
            ev["service_time_s"] = end - self.t_dispatch
        t = self.tokens
        if t is not None:
            ev.update(
                prompt_tokens=t.prompt,
                completion_tokens=t.completion,
                reasoning_tokens=t.reasoning,
                cached_tokens=t.cached,
                tokens_source=t.source,
                reasoning_tokens_source=t.reasoning_source,
            )
        name = ev["type"]
        status = ev["status"]
        ok = status == 200 and ev["error_kind"] is None
        counted = {"prompt": t.prompt, "reasoning": t.reasoning, "completion": t.completion} if ok and t else {}
        st.metrics.finished(name or "unclassified", str(status), ev["system_time_s"], counted)
        if ok and name is not None and t is not None:
            now = st.clock()
            if t.completion is not None and self.t_dispatch is not None:
                st.estimators.served(
                    name,
                    prompt_tokens=t.prompt or 0,
                    completion_tokens=t.completion,
                    service_time=ev["service_time_s"],
                    cached_tokens=t.cached,
                    now=now,
                )
                if st.step is not None:
                    first = self.t_first_token
                    if self.gaps is not None and self.counted and t.completion:
                        # usage counts the tokens; the stream's events may carry several each
                        self.gaps.rescale(t.completion / self.counted)
                    st.step.update(
                        prompt_tokens=max((t.prompt or 0) - (t.cached or 0), 0),
                        tokens=t.completion,
                        service_s=ev["service_time_s"],
                        mean_in_service=ev.get("mean_in_service", 1.0),
                        gaps=self.gaps,
                        first_token_s=None if first is None else first - self.t_dispatch,
                        first_token_in_service=max(self.first_in_service, 1),
                        now=now,
                    )
            reasoning_dialect = st.settings.backend.reasoning_cap
            used = t.reasoning if reasoning_dialect else t.completion
            st.remember(self.rid, Finished(name, used))
            limit = ev.get("effective_limit")
            if used is not None and isinstance(limit, int) and ev.get("client_limit") is None:
                st.used.update(name, used=used, limit=limit, now=now)
            if reasoning_dialect and t.completion is not None and t.reasoning is not None:
                st.answer.update(name, max(t.completion - t.reasoning, 0), now=now)
        if st.log_requests:
            level = "info" if status is not None and status < 500 else "warning"
            getattr(logger(), level)("request", **ev)


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


def _upstream_failure(exc: BaseException) -> ProxyError:
    """The proxy's answer to an aiohttp client failure on a pass-through route."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ProxyError(
            502, f"cannot connect to the upstream server: {exc.os_error}", "upstream_error", code="upstream_unreachable"
        )
    if isinstance(exc, TimeoutError):
        return ProxyError(504, "the upstream server timed out", "upstream_error", code="upstream_timeout")
    return ProxyError(
        502, f"the upstream connection failed: {type(exc).__name__}", "upstream_error", code="upstream_disconnected"
    )


async def passthrough(st: ProxyState, request: HttpRequest) -> Reply | StreamReply:
    """Any other ``/v1/`` route: method, path, query, body and end-to-end headers, as they are.

    A failure before the upstream answers is an OpenAI-style error; one after the answer
    started cuts the connection, so that the client sees an incomplete body, not a short one.
    """
    rid = new_request_id()
    resp: StreamReply | None = None
    try:
        raw = await read_body(request, st.settings.proxy.max_body_bytes)
        url = st.pool.route().url + request.path_qs
        headers = upstream_headers(request.headers, st.settings.backend.api_key)
        async with st.http().request(
            request.method, url, data=raw or None, headers=headers, timeout=client_timeout(st)
        ) as up:
            resp = StreamReply(status=up.status, headers=returned_headers(up.headers, rid, decoded=True))
            await resp.prepare(request)
            async for data in up.content.iter_any():
                await resp.write(data)
            await resp.write_eof()
            return resp
    except (ProxyError, aiohttp.ClientError, TimeoutError) as exc:
        if resp is not None and resp.prepared:
            request.abort()
            return resp
        return error_response(_upstream_failure(exc), rid)
