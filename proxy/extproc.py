"""thinkcap as an Envoy external processor (``envoy.service.ext_proc.v3.ExternalProcessor``).

A gateway built on Envoy (Envoy Gateway, Envoy AI Gateway, Istio, kgateway, the Gateway API
Inference Extension) keeps routing, TLS and auth, and sends each request to this processor
over one gRPC stream, message by message:

- **request headers**: a route that is not shaped (not ``POST /v1/chat/completions`` or
  ``/v1/completions``) is let through, and the rest of its messages are skipped
  (``mode_override``: Envoy must allow it, ``allow_mode_override: true``);
- **request body** (``BUFFERED``; ``FULL_DUPLEX_STREAMED`` chunks are gathered to
  ``end_of_stream`` and answered in chunks of at most :data:`MAX_CHUNK` bytes): parsed and
  classified exactly as ``serve`` does it (:mod:`thinkcap.proxy.request.parse`), counted as an
  arrival, shed (an ``ImmediateResponse`` 503 with ``Retry-After`` and the OpenAI-style body)
  or capped in the backend's dialect (:func:`thinkcap.proxy.dialects.apply_cap`) as a body
  mutation, with ``Content-Length`` set to the new body's length and
  ``x-gateway-inference-objective`` to its type (the inference extension's endpoint picker
  then prioritises by thinkcap's classes); a bad body is a 400, answered here;
- **response headers and body** (``STREAMED`` for an event stream, ``BUFFERED`` for a whole
  answer, chosen per response by ``mode_override``): read for the accounting that ``serve``
  does (usage, reasoning deltas, the step and service fits,
  :func:`thinkcap.proxy.request.accounting.account`). As ``serve``, thinkcap asks a stream for
  its usage chunk and, if the client did not ask for it, takes it out again: that is the one
  change an answer sees (each chunk's events, re-cut at event boundaries); a whole answer,
  and a stream whose client asked for usage, pass byte for byte.

A gateway holds no queue of thinkcap's: the requests in service are the ones between their
request body and their response's end (the pool's count); the queue model reads that. A
message's work is synchronous (parse, classify, cap, count: well under a millisecond; a
request's accounting, its event and the fits, runs after its last answer went out); one
that takes longer than ``[extproc] message_timeout_s`` is logged (``slow_message``): set
Envoy's ``message_timeout`` above it. An error is answered (the message let through
unchanged), never dropped: a processor that answers nothing becomes a client timeout in Envoy.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from envoy.type.v3 import http_status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from thinkcap.estimators import GapTally
from thinkcap.proxy.errors import ProxyError
from thinkcap.proxy.logs import logger
from thinkcap.proxy.request.accounting import TokenClock, account
from thinkcap.proxy.request.body import upstream_body
from thinkcap.proxy.request.forward import SHAPED
from thinkcap.proxy.request.headers import new_request_id
from thinkcap.proxy.request.parse import ask_stream_counts, classify, parse_json, write_cap
from thinkcap.proxy.request.sse import StreamTally, Tokens, whole_tokens
from thinkcap.proxy.state import ProxyState

#: Largest body chunk sent back to Envoy in FULL_DUPLEX_STREAMED mode (the inference
#: extension's limit: Envoy refuses a larger one).
MAX_CHUNK = 62_000
#: The header the Gateway API Inference Extension reads for a request's objective.
OBJECTIVE_HEADER = "x-gateway-inference-objective"

_Mode = processing_mode_pb2.ProcessingMode
#: Skip everything after the request headers (a route thinkcap does not shape).
SKIP_REST = _Mode(request_body_mode=_Mode.NONE, response_header_mode=_Mode.SKIP, response_body_mode=_Mode.NONE)


def _headers(headers: ext.HttpHeaders) -> dict[str, str]:
    out = {}
    for h in headers.headers.headers:
        out[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def _set(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def immediate(err: ProxyError, rid: str, retry_after: int | None = None) -> ext.ProcessingResponse:
    """An error answered by Envoy on thinkcap's behalf: the status, the OpenAI-style body."""
    headers = [_set("content-type", "application/json"), _set("x-request-id", rid)]
    if retry_after is not None:
        headers.append(_set("retry-after", str(retry_after)))
    return ext.ProcessingResponse(
        immediate_response=ext.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=err.status),
            headers=ext.HeaderMutation(set_headers=headers),
            body=json.dumps(err.body(rid)).encode(),
            details=f"thinkcap_{err.code}",
        )
    )


@dataclass
class Flow:
    """One request's passage through the processor (a gRPC stream)."""

    rid: str
    t_arrival: float
    headers: dict[str, str] = field(default_factory=dict)
    body: list[bytes] = field(default_factory=list)
    event: dict[str, Any] = field(default_factory=dict)
    shaped: bool = False
    t_dispatch: float | None = None
    clock: TokenClock = field(default_factory=TokenClock)  # its tokens' times
    tally: StreamTally | None = None
    whole: list[bytes] = field(default_factory=list)
    tokens: Tokens | None = None
    done: bool = False
    duplex: bool = False  # FULL_DUPLEX_STREAMED: the headers' answer waits for the whole body
    strip_usage: bool = False  # the usage chunk was asked for by thinkcap, not by the client
    running: bool = False  # the stream's chunks carry the server's running token count (llama-server)
    mark: float = 0.0  # the replica's occupancy area when the request went upstream
    t_end: float | None = None  # when its last message came: it is accounted after its answer went out


class Processor(ext_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """The ``Process`` stream: one per HTTP request Envoy sees (see the module)."""

    def __init__(self, state: ProxyState, *, message_timeout_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.state = state
        self.message_timeout_s = message_timeout_s
        self.loop_time = clock

    async def Process(  # noqa: N802 - the gRPC method's name
        self, requests: AsyncIterator[ext.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ext.ProcessingResponse]:
        flow = Flow(new_request_id(), self.loop_time())
        try:
            async for msg in requests:
                if msg.HasField("protocol_config"):
                    flow.duplex = msg.protocol_config.request_body_mode == _Mode.FULL_DUPLEX_STREAMED
                started = self.loop_time()
                try:  # all of a message's work is synchronous: no task per message, nothing to preempt
                    out = self._one(flow, msg)
                except Exception as exc:  # a bug must not drop the message: let it through, say so
                    logger().error("extproc", action="error", request_id=flow.rid, message=msg.WhichOneof("request"),
                                   error=f"{type(exc).__name__}: {exc}")  # fmt: skip
                    out = self._let_through(msg)
                took = self.loop_time() - started
                if took > self.message_timeout_s:
                    logger().warning("extproc", action="slow_message", request_id=flow.rid, seconds=took,
                                     message=msg.WhichOneof("request"), limit_s=self.message_timeout_s)  # fmt: skip
                for response in out:
                    yield response
                if flow.done:
                    break
        finally:
            if flow.shaped and not flow.done:  # the client or Envoy went away before the answer's end
                flow.event.update(status=499, error_kind="client_disconnected")
                self._end(flow)
            if flow.t_end is not None:  # after the last answer went out: the accounting waits for no one
                try:
                    self._finish(flow, flow.t_end)
                except Exception as exc:  # the answers are out; the stream ends cleanly, the bug is said
                    logger().error("extproc", action="error", request_id=flow.rid, message="finish",
                                   error=f"{type(exc).__name__}: {exc}")  # fmt: skip

    def _let_through(self, msg: ext.ProcessingRequest) -> list[ext.ProcessingResponse]:
        kind = msg.WhichOneof("request")
        common = ext.CommonResponse()
        if kind == "request_headers":
            return [ext.ProcessingResponse(request_headers=ext.HeadersResponse(response=common))]
        if kind == "request_body":
            return [ext.ProcessingResponse(request_body=ext.BodyResponse(response=common))]
        if kind == "response_headers":
            return [ext.ProcessingResponse(response_headers=ext.HeadersResponse(response=common))]
        if kind == "response_body":
            return [ext.ProcessingResponse(response_body=ext.BodyResponse(response=common))]
        if kind == "request_trailers":
            return [ext.ProcessingResponse(request_trailers=ext.TrailersResponse())]
        if kind == "response_trailers":
            return [ext.ProcessingResponse(response_trailers=ext.TrailersResponse())]
        return []

    def _one(self, flow: Flow, msg: ext.ProcessingRequest) -> list[ext.ProcessingResponse]:
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            return self._request_headers(flow, msg.request_headers)
        if kind == "request_body":
            return self._request_body(flow, msg.request_body.body, end=msg.request_body.end_of_stream)
        if kind == "request_trailers" and flow.shaped and not flow.done and flow.t_dispatch is None:
            # duplex: a body that ends with trailers ends here; its answer, then the trailers'
            out = self._request_body(flow, b"", end=True)
            return [*out, ext.ProcessingResponse(request_trailers=ext.TrailersResponse())]
        if kind == "response_headers":
            return self._response_headers(flow, msg.response_headers)
        if kind == "response_body":
            return self._response_body(flow, msg.response_body)
        return self._let_through(msg)

    # -- the request ---------------------------------------------------------------------

    def _request_headers(self, flow: Flow, headers: ext.HttpHeaders) -> list[ext.ProcessingResponse]:
        flow.headers = _headers(headers)
        path = flow.headers.get(":path", "").split("?", 1)[0]
        flow.shaped = flow.headers.get(":method") == "POST" and path in SHAPED and not headers.end_of_stream
        response = ext.ProcessingResponse(request_headers=ext.HeadersResponse(response=ext.CommonResponse()))
        if not flow.shaped:
            response.mode_override.CopyFrom(SKIP_REST)
            return [response]
        flow.event = {
            "request_id": flow.rid,
            "client_request_id": flow.headers.get("x-request-id"),
            "route": path,
            "arrival_time": self.state.clock(),
            "type": None,
            "type_source": None,
            "stream": False,
            "status": None,
            "error_kind": None,
            "front": "extproc",
        }
        return [] if flow.duplex else [response]  # duplex: answered with the body's new length

    def _request_body(self, flow: Flow, data: bytes, *, end: bool) -> list[ext.ProcessingResponse]:
        flow.body.append(data)
        if not end:  # FULL_DUPLEX_STREAMED: gather to the end, answer nothing yet
            return []
        raw = b"".join(flow.body)
        flow.body = []
        try:
            new, objective = self._shape(flow, raw)
        except ProxyError as err:
            flow.event.update(status=err.status, error_kind=err.code)
            self._end(flow)
            retry = self.state.settings.proxy.retry_after_s if err.status in (429, 503) else None
            return [immediate(err, flow.rid, retry)]
        mutation = ext.HeaderMutation(
            set_headers=[_set("content-length", str(len(new))), _set(OBJECTIVE_HEADER, objective)]
        )
        if not flow.duplex:  # BUFFERED: the headers are still Envoy's to change with the body
            common = ext.CommonResponse(header_mutation=mutation, body_mutation=ext.BodyMutation(body=new))
            return [ext.ProcessingResponse(request_body=ext.BodyResponse(response=common))]
        # FULL_DUPLEX_STREAMED: the headers' answer first, then the body in chunks
        out = [ext.ProcessingResponse(request_headers=ext.HeadersResponse(response=ext.CommonResponse(
            header_mutation=mutation)))]  # fmt: skip
        for start in range(0, max(len(new), 1), MAX_CHUNK):
            chunk = new[start : start + MAX_CHUNK]
            streamed = ext.StreamedBodyResponse(body=chunk, end_of_stream=start + MAX_CHUNK >= len(new))
            common = ext.CommonResponse(body_mutation=ext.BodyMutation(streamed_response=streamed))
            out.append(ext.ProcessingResponse(request_body=ext.BodyResponse(response=common)))
        return out

    def _shape(self, flow: Flow, raw: bytes) -> tuple[bytes, str]:
        """Parse, classify, count, shed or cap: what ``serve``'s request path does before it
        sends the request upstream. Returns the new body and the type."""
        st = self.state
        body = parse_json(raw)
        before = dict(body)
        decision = classify(st, flow.headers, body)
        ev = flow.event
        ev.update(type=decision.type, type_source=decision.source, stream=body.get("stream") is True)
        st.arrived(decision.type, ev["arrival_time"])
        if st.shedding and random.random() >= st.admit_fraction:
            raise ProxyError(503, "the server is overloaded; retry later", "server_error", code="overloaded")
        write_cap(st, ev, body, decision.type, chat=ev.get("route") == SHAPED[0])
        if ev["stream"]:  # as serve: the usage chunk (kept from a client that did not ask) and running counts
            flow.strip_usage, flow.running = ask_stream_counts(st, body)
        replica = st.pool.replicas[0]
        flow.t_dispatch = self.loop_time()
        flow.mark = flow.clock.enter(replica.occupancy, flow.t_dispatch, streamed=ev["stream"])
        if ev["stream"] and st.step is not None:
            flow.clock.gaps = GapTally()
        return upstream_body(raw, before, body), decision.type

    # -- the response --------------------------------------------------------------------

    def _response_headers(self, flow: Flow, headers: ext.HttpHeaders) -> list[ext.ProcessingResponse]:
        response = ext.ProcessingResponse(response_headers=ext.HeadersResponse(response=ext.CommonResponse()))
        if not flow.shaped or flow.done:
            return [response]
        seen = _headers(headers)
        status = int(seen.get(":status") or 0)
        flow.event["upstream_status"] = status
        flow.event["status"] = status
        if status != 200:
            flow.event["error_kind"] = "upstream_status"
        if headers.end_of_stream:
            self._end(flow)
            response.mode_override.CopyFrom(_Mode(response_body_mode=_Mode.NONE))
            return [response]
        streamed = seen.get("content-type", "").startswith("text/event-stream")
        if streamed:
            flow.tally = StreamTally(strip_usage=flow.strip_usage, running=flow.running)
            accel = ext.HeaderMutation(set_headers=[_set("x-accel-buffering", "no")])  # no nginx holds it back
            response.response_headers.response.header_mutation.CopyFrom(accel)
        mode = _Mode.STREAMED if streamed else _Mode.BUFFERED
        response.mode_override.CopyFrom(_Mode(response_body_mode=mode))
        return [response]

    def _response_body(self, flow: Flow, body: ext.HttpBody) -> list[ext.ProcessingResponse]:
        response = ext.ProcessingResponse(response_body=ext.BodyResponse(response=ext.CommonResponse()))
        if not flow.shaped or flow.done:
            return [response]
        if flow.tally is not None:
            flow.clock.read(body.body, self.loop_time, self.state.pool.replicas[0].occupancy)
            out = b"".join(flow.tally.feed(body.body))
            if body.end_of_stream:
                out += flow.tally.flush()
            if flow.strip_usage:  # the events as the client would have had them: no usage chunk
                response.response_body.response.body_mutation.body = out
        else:
            flow.whole.append(body.body)
        if body.end_of_stream:
            if flow.tally is not None:
                flow.tokens = flow.tally.tokens()
            elif flow.event.get("status") == 200:
                try:
                    data = json.loads(b"".join(flow.whole))
                except (ValueError, UnicodeDecodeError):
                    data = None
                flow.tokens = whole_tokens(data) if isinstance(data, dict) else None
            self._end(flow)
        return [response]

    def _end(self, flow: Flow) -> None:
        """The request's last message: no more to process; its accounting follows its answer."""
        flow.done = True
        flow.t_end = self.loop_time()

    def _finish(self, flow: Flow, end: float) -> None:
        if flow.t_dispatch is not None:
            flow.event["mean_in_service"] = flow.clock.leave(self.state.pool.replicas[0].occupancy, end,
                                                             since=flow.t_dispatch, mark=flow.mark,
                                                             streamed=bool(flow.event.get("stream")))  # fmt: skip
        account(
            self.state,
            flow.event,
            flow.tokens,
            flow.rid,
            end=end,
            t_arrival=flow.t_arrival,
            t_dispatch=flow.t_dispatch,
            clock=flow.clock,
        )


async def serve_grpc(
    state: ProxyState, host: str, port: int, *, message_timeout_s: float
) -> tuple[grpc.aio.Server, int]:
    """The processor and the gRPC health service (liveness and readiness, as gateways probe
    them), started on ``host:port`` on this event loop; returns the server and its port."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                                      ("grpc.max_send_message_length", 64 * 1024 * 1024)])  # fmt: skip
    ext_grpc.add_ExternalProcessorServicer_to_server(Processor(state, message_timeout_s=message_timeout_s), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    for name in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
