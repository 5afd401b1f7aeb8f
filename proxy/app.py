"""The data plane's routes, start-up and shutdown (the admin listener is in ``proxy.admin``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from yarl import URL

from thinkcap.proxy.cluster import Cluster
from thinkcap.proxy.control import ControlLoop
from thinkcap.proxy.logs import logger
from thinkcap.proxy.pool import Replica
from thinkcap.proxy.request.dialects import apply_cap, honoured
from thinkcap.proxy.request.errors import ProxyError, error_response
from thinkcap.proxy.request.forward import SHAPED, new_request_id, passthrough, shaped
from thinkcap.proxy.request.sse import from_usage
from thinkcap.proxy.state import ProxyState
from thinkcap.proxy.transport.client import MAX_IDLE, Upstream
from thinkcap.proxy.transport.server import HttpRequest, HttpServer, Reply, StreamReply, json_reply

#: The cap the start-up probe asks for.
PROBE_CAP = 8
PROBE_TIMEOUT_S = 60.0
PROBE_RETRY_FIRST_S = 1.0
PROBE_RETRY_MAX_S = 30.0
READY_TIMEOUT_S = 2.0


async def healthz(_: ProxyState, __: HttpRequest) -> Reply:
    """The process is up."""
    return json_reply({"status": "ok"})


async def upstream_reachable(state: ProxyState, base: str | None = None) -> tuple[bool, str]:
    """``GET /v1/models`` on the backend (or the replica at ``base``) answers (any status below 500)."""
    url = (state.settings.backend.base if base is None else base) + "/v1/models"
    headers = {"Authorization": f"Bearer {state.settings.backend.api_key}"} if state.settings.backend.api_key else {}
    try:
        async with state.http().get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=READY_TIMEOUT_S)) as r:
            await r.read()
            return r.status < 500, f"GET /v1/models answered {r.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return False, f"GET /v1/models failed: {type(exc).__name__}"


async def readyz(st: ProxyState, _: HttpRequest) -> Reply:
    """Some replica reachable, caps loaded and, in a cluster, its loops running; each replica's
    state and the probe's verdict are in the body."""
    replicas = st.pool.replicas
    checks = await asyncio.gather(*(upstream_reachable(st, r.url) for r in replicas))
    ok = any(up for up, _ in checks)
    body: dict[str, Any] = {"ready": ok, "upstream": checks[0][1] if len(replicas) == 1 else None}
    if len(replicas) > 1:
        now = st.clock()
        body["upstream"] = f"{sum(up for up, _ in checks)} of {len(replicas)} replicas answer"
        body["replicas"] = [
            {**r.record(now), "reachable": up, "detail": detail}
            for r, (up, detail) in zip(replicas, checks, strict=True)
        ]
    body.update(
        {
            "caps": st.caps.effective(),
            "caps_applied": not st.cap_rejected,  # False while the backend rejects the cap field (see probe)
            "probe": st.probe,
            "shedding": st.shedding,
        }
    )
    if st.draining:  # the load balancer stops sending here before the listener closes
        ok = body["ready"] = False
        body["reason"] = "draining: this replica is stopping"
    if st.cluster is not None:
        body["cluster"] = st.cluster.record()
        if not body["cluster"]["tasks_running"]:  # a replica that no longer syncs is not ready
            ok = body["ready"] = False
            body["reason"] = "the cluster's sync or listen loop is not running"
    return json_reply(body, status=200 if ok else 503)


async def metrics(st: ProxyState, _: HttpRequest) -> Reply:
    """Prometheus text; estimator gauges are refreshed at each scrape."""
    st.metrics.set_estimates(st.estimators.snapshot(st.clock()))
    if st.step is not None:
        step = st.step.get()
        st.metrics.step_seconds.labels("base").set(step.base_s)
        st.metrics.step_seconds.labels("per_seq").set(step.per_seq_s)
    st.metrics.set_caps(st.caps.effective())
    return Reply(st.metrics.render(), content_type="text/plain; charset=utf-8")


async def not_found(_: ProxyState, request: HttpRequest) -> Reply:
    """Routes outside ``/v1/`` and the operations endpoints."""
    exc = ProxyError(
        404, f"no route {request.method} {request.path} on this proxy", "invalid_request_error", code="not_found"
    )
    return error_response(exc, new_request_id())


#: What to configure when a backend answers 4xx to the cap field alone, by dialect.
CAP_FIELD_ADVICE = {
    "vllm": (
        "vLLM answers 400 to thinking_token_budget unless it knows where reasoning starts and ends: start it "
        "(vLLM >= 0.19) with a --reasoning-parser that defines reasoning start/end strings, or with "
        """--reasoning-config '{"think_start_str": "<think>", "think_end_str": "</think>"}'"""
    ),
    "sglang": "start SGLang with --reasoning-parser and --enable-strict-thinking so that it takes "
    "custom_params.thinking_budget",
    "llama-server": "llama-server takes thinking_budget_tokens where the model's chat template thinks (start it "
    "with --jinja); for a model that does not think set [backend] thinks = false (the cap is then max_tokens)",
}
#: Characters of a backend's error body kept in the probe's verdict.
PROBE_ERROR_CHARS = 2000


async def _probe_post(state: ProxyState, body: dict[str, Any]) -> tuple[int, bytes]:
    """POST ``body`` to the chat route; the status and the raw answer."""
    b = state.settings.backend
    headers = {"Authorization": f"Bearer {b.api_key}"} if b.api_key else {}
    async with state.http().post(
        state.pool.route().url + SHAPED[0],
        json=body,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
    ) as r:
        return r.status, await r.read()


async def probe(state: ProxyState) -> dict[str, Any]:
    """Send one tiny request with a small cap and check the backend honoured it.

    The verdict's ``status``: ``honoured``, ``not_honoured``, ``unknown`` (no count to judge
    by), ``rejected`` (the backend answers 4xx to the cap field and 200 without it: the field
    is then left out of requests until a later probe passes; ``backend_error`` and ``advice``
    say why and what to configure) or ``error`` (no answer, or 4xx/5xx with and without the
    field; ``backend_error`` holds the body).
    """
    b = state.settings.backend
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Count from 1 to 100, one number per line."}]}
    if b.model:
        body["model"] = b.model
    else:
        try:
            async with state.http().get(
                state.pool.route().url + "/v1/models", timeout=aiohttp.ClientTimeout(total=10)
            ) as r:
                models = (await r.json()).get("data") or []
                body["model"] = models[0]["id"] if models else "default"
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, AttributeError):
            body["model"] = "default"
    bare = dict(body, max_tokens=2 * PROBE_CAP)  # without the cap field, if it is the trouble
    applied = apply_cap(body, PROBE_CAP, b.dialect, answer_allowance=b.answer_allowance, thinks=b.thinks)
    try:
        status, raw = await _probe_post(state, body)
        if status != 200:
            error = raw.decode(errors="replace")[:PROBE_ERROR_CHARS]
            if 400 <= status < 500 and (await _probe_post(state, bare))[0] == 200:
                return {
                    "status": "rejected",
                    "field": applied.field,
                    "http_status": status,
                    "backend_error": error,
                    "advice": CAP_FIELD_ADVICE.get(b.dialect, "check [backend] dialect"),
                }
            return {"status": "error", "detail": f"probe answered HTTP {status}", "backend_error": error}
        data = json.loads(raw)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {"status": "error", "detail": f"probe failed: {type(exc).__name__}"}
    tokens = from_usage(data.get("usage") if isinstance(data, dict) else None)
    reasoning = None if tokens is None else tokens.reasoning
    completion = None if tokens is None else tokens.completion
    verdict = honoured(
        b.dialect, applied.effective, reasoning_tokens=reasoning, completion_tokens=completion, thinks=b.thinks
    )
    status_word = {True: "honoured", False: "not_honoured", None: "unknown"}[verdict]
    return {
        "status": status_word,
        "field": applied.field,
        "limit": applied.effective,
        "reasoning_tokens": reasoning,
        "completion_tokens": completion,
    }


async def _run_probe(state: ProxyState) -> None:
    """Probe until the backend answers (backing off up to ``PROBE_RETRY_MAX_S``), then log the verdict.

    A backend that rejects the cap field is probed again every ``PROBE_RETRY_MAX_S``; the
    field goes back into requests once a probe passes.
    """
    log = logger()
    delay = PROBE_RETRY_FIRST_S
    while True:
        state.probe = await probe(state)
        rejected = state.probe["status"] == "rejected"
        if rejected != state.cap_rejected:
            state.cap_rejected = rejected
            if rejected:
                log.error(
                    "probe",
                    warning="the backend rejects the cap field; requests go upstream without it until fixed",
                    **state.probe,
                )
            else:
                log.warning("probe", warning="the backend takes the cap field again; caps apply", **state.probe)
        if state.probe["status"] not in ("error", "rejected"):
            break
        if state.probe["status"] == "error":
            log.warning(
                "probe", warning=f"the backend did not answer the cap probe; retrying in {delay:g} s", **state.probe
            )
        await asyncio.sleep(delay)
        delay = PROBE_RETRY_MAX_S if rejected else min(2 * delay, PROBE_RETRY_MAX_S)
    if state.probe["status"] == "honoured":
        log.info("probe", **state.probe)
    else:
        log.warning(
            "probe",
            warning="the backend did not show that it honours the reasoning cap; check [backend] dialect",
            **state.probe,
        )


async def replica_answers(state: ProxyState, replica: Replica) -> tuple[bool, str]:
    """A small shaped request (one token) to the replica's chat route: answered below 500?
    ``GET /v1/models`` is not enough: a replica can list its models while every generation fails."""
    b = state.settings.backend
    headers = {"Authorization": f"Bearer {b.api_key}"} if b.api_key else {}
    body = {"model": b.model or "default", "max_tokens": 1,
            "messages": [{"role": "user", "content": "Say OK."}]}  # fmt: skip
    try:
        async with state.http().post(
            replica.url + SHAPED[0], json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        ) as r:
            await r.read()
            return r.status < 500, f"POST {SHAPED[0]} answered {r.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return False, f"POST {SHAPED[0]} failed: {type(exc).__name__}"


async def watch_replicas(state: ProxyState) -> None:
    """Probe each ejected replica when it is due (:meth:`Pool.probe_due`) with a small shaped
    request, and take it back once that is answered below 500. Runs for one replica too: an
    ejected single backend is taken back once it answers."""
    log = logger()
    interval = state.settings.backend.probe_interval_s
    while True:
        await asyncio.sleep(min(interval, 1.0))
        for replica in state.pool.replicas:
            if not state.pool.probe_due(replica, state.clock(), interval):
                continue
            try:
                up, detail = await replica_answers(state, replica)
            except Exception as exc:  # the watch logs and goes on: it must not die silently
                log.error("replica", action="probe_failed", replica=replica.url, error=f"{type(exc).__name__}: {exc}")
                continue
            if up:
                state.pool.readmit(replica)
                log.warning("replica", action="readmitted", replica=replica.url, detail=detail,
                            healthy=state.pool.healthy_slots())  # fmt: skip
            else:
                replica.probed_at = state.clock()  # the next probe waits again from now
                replica.last_error = detail


Route = Callable[[ProxyState, HttpRequest], Awaitable[Reply | StreamReply]]
#: Fixed routes of the data plane, by (method, path); other ``/v1/`` routes pass through.
ROUTES: dict[tuple[str, str], Route] = {
    **{("POST", path): shaped for path in SHAPED},
    ("GET", "/healthz"): healthz,
    ("GET", "/readyz"): readyz,
    ("GET", "/metrics"): metrics,
}


class DataPlane:
    """The proxy's listener: ``/v1/*`` plus ``/healthz``, ``/readyz`` and ``/metrics``.

    :meth:`start` opens the upstream clients, starts the probe and the control loop, and
    listens; :meth:`close` stops accepting, drains the requests in progress (up to
    ``drain_timeout_s``) and then stops the rest. ``handle`` is the request handler.
    """

    def __init__(self, state: ProxyState) -> None:
        self.state = state
        p = state.settings.proxy
        self.server = HttpServer(
            self.handle,
            max_body_bytes=p.max_body_bytes,
            head_timeout_s=p.head_timeout_s,
            body_min_rate=p.body_min_rate,
            max_connections=p.max_connections,
            error_reply=self._protocol_error,
            on_failure=self._failed,
        )
        self.port = 0
        self.host = "127.0.0.1"
        self._tasks: list[asyncio.Task[None]] = []

    async def handle(self, request: HttpRequest) -> Reply | StreamReply:
        """Route one request."""
        route = ROUTES.get((request.method, request.path))
        if route is None:
            route = passthrough if request.path.startswith("/v1/") else not_found
        return await route(self.state, request)

    def _protocol_error(self, status: int, message: str, code: str) -> Reply:
        return error_response(ProxyError(status, message, "invalid_request_error", code=code), new_request_id())

    def _failed(self, request: HttpRequest, exc: Exception) -> None:
        logger().error("unhandled", path=request.path, error=f"{type(exc).__name__}: {exc}")

    async def start(self, host: str | None = None, port: int | None = None) -> int:
        """Open the clients, start the background tasks, listen; returns the bound port."""
        state = self.state
        s = state.settings
        b = s.backend
        # keep_alive false (llama-server's default): it closes idle connections, so a reused one
        # can fail the next request (the probe, the passthrough routes) as well as the shaped ones
        connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0, force_close=not b.keep_alive)
        state.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None), cookie_jar=aiohttp.DummyCookieJar()
        )
        for replica in state.pool.replicas:
            replica.upstream = Upstream(
                replica.url,
                connect_timeout_s=b.connect_timeout_s,
                read_timeout_s=b.read_timeout_s,
                max_answer_bytes=b.max_answer_bytes,
                max_idle=MAX_IDLE if b.keep_alive else 0,
            )
        if b.probe:
            self._tasks.append(asyncio.create_task(_run_probe(state)))
        self._tasks.append(asyncio.create_task(watch_replicas(state)))
        self.host = s.proxy.host if host is None else host
        try:
            self.port = await self.server.start(self.host, s.proxy.port if port is None else port)
            logger().info(
                "startup",
                listen=f"{self.host}:{self.port}",
                upstream=[r.url for r in state.pool.replicas] if len(state.pool) > 1 else b.base,
                dialect=b.dialect,
                caps=dict(state.caps.table.caps),
                caps_source=state.caps.table.source,
                max_concurrency=s.proxy.max_concurrency,
                max_queue=s.proxy.max_queue,
                classifier_cv_accuracy=state.classifier.cv_accuracy,
                classifier_rules=len(state.classifier.rules),
            )
            if s.controller.enabled:
                state.controller = ControlLoop(state, s.controller)
                self._tasks.append(asyncio.create_task(state.controller.run()))
            if s.cluster.redis_url is not None:
                state.cluster = Cluster(state, s.cluster, state.controller)
                state.cluster.start()
        except BaseException:  # e.g. the port is taken: leave nothing open behind
            await self.close()
            raise
        return self.port

    async def close(self) -> None:
        """Stop accepting, drain, stop the background tasks and close the clients (idempotent)."""
        state = self.state
        await self.server.shutdown(state.settings.proxy.drain_timeout_s)
        if state.cluster is not None:  # a leader hands the lease on before it stops deciding
            await state.cluster.close()
            state.cluster = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        state.controller = None
        if state.session is not None:
            await state.session.close()
            state.session = None
        for replica in state.pool.replicas:
            if replica.upstream is not None:
                await replica.upstream.close()
                replica.upstream = None

    def make_url(self, path: str = "") -> URL:
        """The URL of ``path`` on this listener."""
        return URL.build(scheme="http", host=self.host, port=self.port, encoded=True).join(URL(path))


def create_app(state: ProxyState) -> DataPlane:
    """The data plane for ``state`` (not yet listening: see :meth:`DataPlane.start`)."""
    return DataPlane(state)
