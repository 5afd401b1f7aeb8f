"""The backend as the proxy watches it: the start-up probe (does the backend honour the cap
field?), readiness (does a replica answer?) and the watch that takes an ejected replica back
once it answers a small shaped request."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from thinkcap.proxy.dialects import CAP_FIELD_ADVICE, apply_cap, honoured
from thinkcap.proxy.logs import logger
from thinkcap.proxy.pool import Replica
from thinkcap.proxy.request.forward import SHAPED
from thinkcap.proxy.request.sse import from_usage
from thinkcap.proxy.state import ProxyState

#: The cap the start-up probe asks for.
PROBE_CAP = 8
PROBE_TIMEOUT_S = 60.0
PROBE_RETRY_FIRST_S = 1.0
PROBE_RETRY_MAX_S = 30.0
READY_TIMEOUT_S = 2.0


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


async def run_probe(state: ProxyState) -> None:
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
