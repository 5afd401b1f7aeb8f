"""The data plane's routes, start-up and shutdown (the admin listener is in ``proxy.admin``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from yarl import URL

from thinkcap.proxy.backend import run_probe, upstream_reachable, watch_engine_gauges, watch_replicas
from thinkcap.proxy.cluster import Cluster
from thinkcap.proxy.control import ControlLoop
from thinkcap.proxy.errors import ProxyError, error_response
from thinkcap.proxy.logs import logger
from thinkcap.proxy.request.forward import SHAPED, shaped
from thinkcap.proxy.request.headers import new_request_id
from thinkcap.proxy.request.passthrough import passthrough
from thinkcap.proxy.state import ProxyState
from thinkcap.proxy.transport.client import MAX_IDLE, Upstream
from thinkcap.proxy.transport.server import HttpRequest, HttpServer, Reply, StreamReply, json_reply


async def healthz(_: ProxyState, __: HttpRequest) -> Reply:
    """The process is up."""
    return json_reply({"status": "ok"})


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
            "budget": {"mode": st.budget, "reason": st.budget_reason},  # see [backend] budget
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

    An async context manager: ``async with create_app(state) as plane:`` starts it (on
    ``host`` and ``port``, by default ``[proxy] listen``) and closes it. :meth:`start` opens
    the upstream clients, starts the probe and the control loop, and listens; :meth:`close`
    stops accepting, drains the requests in progress (up to ``drain_timeout_s``) and then
    stops the rest. ``handle`` is the request handler.
    """

    def __init__(self, state: ProxyState, host: str | None = None, port: int | None = None) -> None:
        self.state = state
        self._bind = (host, port)
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

    async def __aenter__(self) -> DataPlane:
        await self.start(*self._bind)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

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
            self._tasks.append(asyncio.create_task(run_probe(state)))
        self._tasks.append(asyncio.create_task(watch_replicas(state)))
        if b.engine_gauges_s is not None:
            self._tasks.append(asyncio.create_task(watch_engine_gauges(state)))
        self.host = s.proxy.host if host is None else host
        try:
            self.port = await self.server.start(self.host, s.proxy.port if port is None else port)
            logger().info(
                "startup",
                listen=f"{self.host}:{self.port}",
                upstream=[r.url for r in state.pool.replicas] if len(state.pool) > 1 else b.base,
                dialect=b.dialect,
                budget=state.budget,
                caps=dict(state.caps.table.caps),
                caps_source=state.caps.table.source,
                max_concurrency=s.proxy.max_concurrency,
                max_queue=s.proxy.max_queue,
                classifier_cv_accuracy=state.classifier.cv_accuracy,
                classifier_rules=len(state.classifier.rules),
            )
            controller = s.controller if s.controller.enabled else None
            cluster = None
            if s.cluster.redis_url is not None:
                cluster = state.cluster = Cluster(state, s.cluster, controller)
            if controller is not None:
                strategy = {} if cluster is None else cluster.strategy()
                state.controller = ControlLoop(state, controller, **strategy)
                self._tasks.append(asyncio.create_task(state.controller.run()))
            if cluster is not None:
                cluster.start()
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
        if state.controller is not None:
            state.listeners.remove(state.controller.notice)
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


def create_app(state: ProxyState, host: str | None = None, port: int | None = None) -> DataPlane:
    """The data plane for ``state`` (not yet listening: ``async with`` it, or see
    :meth:`DataPlane.start`), on ``host`` and ``port`` (default: ``[proxy] listen``)."""
    return DataPlane(state, host, port)
