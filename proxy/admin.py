"""The admin listener: state, pinned caps and graded feedback (loopback by default, bearer token optional)."""

from __future__ import annotations

import hmac
from dataclasses import replace
from typing import Any

import numpy as np
from aiohttp import web

from thinkcap.estimators import AccuracyCurve
from thinkcap.proxy.errors import error_body
from thinkcap.proxy.logs import logger
from thinkcap.proxy.state import STATE_KEY, ProxyState, refit_curves, step_record


def _admin_error(status: int, message: str) -> web.Response:
    return web.json_response(error_body(message, "invalid_request_error", code=None), status=status)


@web.middleware
async def _bearer(request: web.Request, handler: Any) -> web.StreamResponse:
    token = request.app[STATE_KEY].settings.proxy.admin_token
    if token is not None:
        scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 9110, section 11.1); the token is compared in constant time
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return _admin_error(401, "a valid bearer token is required")
    resp: web.StreamResponse = await handler(request)
    return resp


async def admin_state(request: web.Request) -> web.Response:
    """Caps (table, pins, in force), estimates, last decision, probe, queue."""
    st = request.app[STATE_KEY]
    snap = st.estimators.snapshot(st.clock())
    await refit_curves(st.accuracy)
    table = st.caps.table
    body = {
        "caps": st.caps.effective(),
        "table": {
            "caps": dict(table.caps),
            "source": table.source,
            "version": table.version,
            "decision_id": table.decision_id,
        },
        "pins": dict(st.caps.pins),
        "estimates": {
            "arrival_rate": snap.arrival_rate,
            "arrival_rate_stderr": snap.arrival_rate_stderr if snap.arrival_rate_stderr != float("inf") else None,
            "types": {t.name: t._asdict() for t in snap.types},
            "accuracy": {n: _curve(c) for n, c in st.accuracy.items()},
        },
        "last_decision": st.last_decision,
        "probe": st.probe,
        "budget": {"mode": st.budget, "reason": st.budget_reason},
        "shedding": st.shedding,
        "queue": {
            "in_flight": st.admission.in_flight,
            "queued": st.admission.queued,
            "in_service": st.pool.in_service,
            "limit": st.admission.max_concurrency,
        },
        "replicas": [r.record(st.clock()) for r in st.pool.replicas],
        "step": None if st.step is None else step_record(st.step.get()),
        "feedback": st.feedback,
        "cluster": None if st.cluster is None else st.cluster.record(),
    }
    return web.json_response(body)


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _admin_error(400, "the request body is not valid JSON")
    if not isinstance(body, dict):
        return _admin_error(400, "the request body must be a JSON object")
    return body


async def pin_caps(request: web.Request) -> web.Response:
    """``PUT /admin/caps`` with ``{"caps": {"math": 256}}`` pins those caps."""
    st = request.app[STATE_KEY]
    body = await _json_object(request)
    if isinstance(body, web.Response):
        return body
    caps = body.get("caps")
    if not isinstance(caps, dict) or not caps:
        return _admin_error(400, 'expected {"caps": {"<type>": <tokens>, ...}}')
    try:
        st.caps.pin(caps)
    except ValueError as exc:
        return _admin_error(400, str(exc))
    st.metrics.set_caps(st.caps.effective())
    logger().info("caps_pinned", pins=dict(st.caps.pins))
    return web.json_response({"caps": st.caps.effective(), "pins": dict(st.caps.pins)})


async def unpin_caps(request: web.Request) -> web.Response:
    """``DELETE /admin/caps`` unpins all; ``?type=math`` (repeatable) unpins some."""
    st = request.app[STATE_KEY]
    names = request.query.getall("type", [])
    unknown = sorted(set(names) - set(st.caps.table.caps))
    if unknown:
        return _admin_error(400, f"unknown types {unknown}")
    st.caps.unpin(names or None)
    st.metrics.set_caps(st.caps.effective())
    logger().info("caps_unpinned", pins=dict(st.caps.pins))
    return web.json_response({"caps": st.caps.effective(), "pins": dict(st.caps.pins)})


async def feedback(request: web.Request) -> web.Response:
    """``POST /admin/feedback`` with ``{"request_id", "correct"}`` (or ``"score"`` in [0, 1]); a request
    is graded once: a second grade answers 409."""
    st = request.app[STATE_KEY]
    body = await _json_object(request)
    if isinstance(body, web.Response):
        return body
    rid = body.get("request_id")
    if not isinstance(rid, str):
        return _admin_error(400, "request_id must be a string")
    if isinstance(body.get("correct"), bool):
        correct = bool(body["correct"])
    elif _is_score(body.get("score")):
        correct = body["score"] >= 0.5
    else:
        return _admin_error(400, 'give "correct": true/false or "score" in [0, 1]')
    item = st.recent.get(rid)
    if item is None:
        return _admin_error(404, f"no recent request {rid!r} (only the last answered requests are kept)")
    if item.reasoning_tokens is None:
        return _admin_error(409, f"request {rid!r} has no token count to learn from")
    if item.graded:
        return _admin_error(409, f"request {rid!r} was graded already (one request, one grade)")
    st.accuracy[item.type].update(item.reasoning_tokens, correct, now=st.clock())
    st.recent[rid] = replace(item, graded=True)
    st.feedback += 1
    logger().info("feedback", request_id=rid, type=item.type, reasoning_tokens=item.reasoning_tokens, correct=correct,
                  time=st.clock())  # fmt: skip
    return web.json_response({"accepted": True, "type": item.type, "reasoning_tokens": item.reasoning_tokens})


def _curve(curve: AccuracyCurve) -> dict[str, Any]:
    """A type's accuracy curve as fitted from feedback (the configured one, with the error, if the fit fails)."""
    try:
        return dict(zip(("base", "gain", "rate"), curve.get(), strict=True))
    except (ArithmeticError, ValueError, np.linalg.LinAlgError) as exc:
        return {"base": curve.base, "gain": curve.gain, "rate": curve.rate, "error": f"{type(exc).__name__}: {exc}"}


def _is_score(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1


def create_admin_app(state: ProxyState) -> web.Application:
    """The admin listener: state, pinned caps, graded feedback."""
    app = web.Application(middlewares=[_bearer])
    app[STATE_KEY] = state
    app.router.add_get("/admin/state", admin_state)
    app.router.add_put("/admin/caps", pin_caps)
    app.router.add_delete("/admin/caps", unpin_caps)
    app.router.add_post("/admin/feedback", feedback)
    return app
