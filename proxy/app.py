"""The proxy's two aiohttp applications: the data plane and the admin listener."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from proxy.dialects import apply_cap, honoured
from proxy.forward import SHAPED, ProxyError, error_response, passthrough, request_id, shaped
from proxy.logs import logger
from proxy.loop import ControlLoop
from proxy.state import STATE_KEY, ProxyState
from proxy.upstream import Upstream

#: The cap the start-up probe asks for.
PROBE_CAP = 8
PROBE_TIMEOUT_S = 60.0
PROBE_RETRY_FIRST_S = 1.0
PROBE_RETRY_MAX_S = 30.0
READY_TIMEOUT_S = 2.0


async def healthz(_: web.Request) -> web.Response:
    """The process is up."""
    return web.json_response({"status": "ok"})


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


async def readyz(request: web.Request) -> web.Response:
    """Upstream reachable and caps loaded; the probe's verdict is in the body."""
    st = request.app[STATE_KEY]
    ok, detail = await upstream_reachable(st)
    body = {"ready": ok, "upstream": detail, "caps": st.caps.effective(), "probe": st.probe, "shedding": st.shedding}
    return web.json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text; estimator gauges are refreshed at each scrape."""
    st = request.app[STATE_KEY]
    st.metrics.set_estimates(st.estimators.snapshot(st.clock()))
    st.metrics.queue_length.set(st.admission.queued)
    st.metrics.set_caps(st.caps.effective())
    return web.Response(body=st.metrics.render(), content_type="text/plain", charset="utf-8")


async def not_found(request: web.Request) -> web.Response:
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


def _session_ctx(state: ProxyState) -> Any:
    async def ctx(_: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0)
        state.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None), cookie_jar=aiohttp.DummyCookieJar()
        )
        b = state.settings.backend
        state.upstream = Upstream(b.base, connect_timeout_s=b.connect_timeout_s, read_timeout_s=b.read_timeout_s)
        task = asyncio.create_task(_run_probe(state)) if state.settings.backend.probe else None
        s = state.settings
        logger().info(
            "startup",
            listen=f"{s.proxy.host}:{s.proxy.port}",
            upstream=s.backend.base,
            dialect=s.backend.dialect,
            caps=dict(state.caps.table.caps),
            caps_source=state.caps.table.source,
            max_concurrency=s.proxy.max_concurrency,
            max_queue=s.proxy.max_queue,
            classifier_cv_accuracy=state.classifier.cv_accuracy,
            classifier_rules=len(state.classifier.rules),
        )
        control = None
        if s.controller.enabled:
            state.controller = ControlLoop(state, s.controller)
            control = asyncio.create_task(state.controller.run())
        yield
        if control is not None:
            control.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control
            state.controller = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await state.session.close()
        state.session = None
        await state.upstream.close()
        state.upstream = None

    return ctx


def create_app(state: ProxyState) -> web.Application:
    """The data plane: ``/v1/*`` plus ``/healthz``, ``/readyz`` and ``/metrics``."""
    app = web.Application(client_max_size=state.settings.proxy.max_body_bytes)
    app[STATE_KEY] = state
    app.cleanup_ctx.append(_session_ctx(state))
    for path in SHAPED:
        app.router.add_post(path, shaped)
    app.router.add_route("*", "/v1/{tail:.*}", passthrough)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
