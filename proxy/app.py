"""The data plane's routes, start-up and shutdown (the admin listener is in ``proxy.admin``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from yarl import URL

from proxy.dialects import apply_cap, honoured
from proxy.forward import SHAPED, ProxyError, error_response, new_request_id, passthrough, request_id, shaped
from proxy.http1 import HttpRequest, HttpServer, Reply, StreamReply, json_reply
from proxy.logs import logger
from proxy.loop import ControlLoop
from proxy.state import ProxyState
from proxy.upstream import Upstream

#: The cap the start-up probe asks for.
PROBE_CAP = 8
PROBE_TIMEOUT_S = 60.0
PROBE_RETRY_FIRST_S = 1.0
PROBE_RETRY_MAX_S = 30.0
READY_TIMEOUT_S = 2.0


async def healthz(_: ProxyState, __: HttpRequest) -> Reply:
    """The process is up."""
    return json_reply({"status": "ok"})


async def upstream_reachable(state: ProxyState) -> tuple[bool, str]:
    """``GET /v1/models`` on the backend answers (any status below 500)."""
    url = state.settings.backend.base + "/v1/models"
    headers = {"Authorization": f"Bearer {state.settings.backend.api_key}"} if state.settings.backend.api_key else {}
    try:
        async with state.http().get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=READY_TIMEOUT_S)) as r:
            await r.read()
            return r.status < 500, f"GET /v1/models answered {r.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return False, f"GET /v1/models failed: {type(exc).__name__}"


async def readyz(st: ProxyState, _: HttpRequest) -> Reply:
    """Upstream reachable and caps loaded; the probe's verdict is in the body."""
    ok, detail = await upstream_reachable(st)
    body = {"ready": ok, "upstream": detail, "caps": st.caps.effective(), "probe": st.probe, "shedding": st.shedding}
    return json_reply(body, status=200 if ok else 503)


async def metrics(st: ProxyState, _: HttpRequest) -> Reply:
    """Prometheus text; estimator gauges are refreshed at each scrape."""
    st.metrics.set_estimates(st.estimators.snapshot(st.clock()))
    st.metrics.set_caps(st.caps.effective())
    return Reply(st.metrics.render(), content_type="text/plain; charset=utf-8")


async def not_found(_: ProxyState, request: HttpRequest) -> Reply:
    """Routes outside ``/v1/`` and the operations endpoints."""
    exc = ProxyError(
        404, f"no route {request.method} {request.path} on this proxy", "invalid_request_error", code="not_found"
    )
    return error_response(exc, request_id(request))


async def probe(state: ProxyState) -> dict[str, Any]:
    """Send one tiny request with a small cap and check the backend honoured it."""
    b = state.settings.backend
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Count from 1 to 100, one number per line."}]}
    if b.model:
        body["model"] = b.model
    else:
        try:
            async with state.http().get(b.base + "/v1/models", timeout=aiohttp.ClientTimeout(total=10)) as r:
                models = (await r.json()).get("data") or []
                body["model"] = models[0]["id"] if models else "default"
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, AttributeError):
            body["model"] = "default"
    applied = apply_cap(body, PROBE_CAP, b.dialect, answer_allowance=b.answer_allowance)
    headers = {"Authorization": f"Bearer {b.api_key}"} if b.api_key else {}
    try:
        async with state.http().post(
            b.base + SHAPED[0], json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        ) as r:
            data = json.loads(await r.read())
            if r.status != 200:
                return {"status": "error", "detail": f"probe answered HTTP {r.status}"}
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {"status": "error", "detail": f"probe failed: {type(exc).__name__}"}
    usage = data.get("usage") if isinstance(data, dict) else None
    details = usage.get("completion_tokens_details") if isinstance(usage, dict) else None
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
    verdict = honoured(b.dialect, applied.effective, reasoning_tokens=reasoning, completion_tokens=completion)
    status = {True: "honoured", False: "not_honoured", None: "unknown"}[verdict]
    return {
        "status": status,
        "field": applied.field,
        "limit": applied.effective,
        "reasoning_tokens": reasoning,
        "completion_tokens": completion,
    }


async def _run_probe(state: ProxyState) -> None:
    """Probe until the backend answers (backing off up to ``PROBE_RETRY_MAX_S``), then log the verdict."""
    log = logger()
    delay = PROBE_RETRY_FIRST_S
    while True:
        state.probe = await probe(state)
        if state.probe["status"] != "error":
            break
        log.warning(
            "probe", warning=f"the backend did not answer the cap probe; retrying in {delay:g} s", **state.probe
        )
        await asyncio.sleep(delay)
        delay = min(2 * delay, PROBE_RETRY_MAX_S)
    if state.probe["status"] == "honoured":
        log.info("probe", **state.probe)
    else:
        log.warning(
            "probe",
            warning="the backend did not show that it honours the reasoning cap; check [backend] dialect",
            **state.probe,
        )


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
        self.server = HttpServer(
            self.handle,
            max_body_bytes=state.settings.proxy.max_body_bytes,
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
        connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0)
        state.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None), cookie_jar=aiohttp.DummyCookieJar()
        )
        b = s.backend
        state.upstream = Upstream(b.base, connect_timeout_s=b.connect_timeout_s, read_timeout_s=b.read_timeout_s)
        if b.probe:
            self._tasks.append(asyncio.create_task(_run_probe(state)))
        self.host = s.proxy.host if host is None else host
        try:
            self.port = await self.server.start(self.host, s.proxy.port if port is None else port)
            logger().info(
                "startup",
                listen=f"{self.host}:{self.port}",
                upstream=b.base,
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
        except BaseException:  # e.g. the port is taken: leave nothing open behind
            await self.close()
            raise
        return self.port

    async def close(self) -> None:
        """Stop accepting, drain, stop the background tasks and close the clients (idempotent)."""
        state = self.state
        await self.server.shutdown(state.settings.proxy.drain_timeout_s)
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
        if state.upstream is not None:
            await state.upstream.close()
            state.upstream = None

    def make_url(self, path: str = "") -> URL:
        """The URL of ``path`` on this listener."""
        return URL.build(scheme="http", host=self.host, port=self.port, encoded=True).join(URL(path))


def create_app(state: ProxyState) -> DataPlane:
    """The data plane for ``state`` (not yet listening: see :meth:`DataPlane.start`)."""
    return DataPlane(state)
