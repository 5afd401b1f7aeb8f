"""The backend as the proxy watches it: the start-up probe (does the backend honour the cap
field?), readiness (does a replica answer?) and the watch that takes an ejected replica back
once it answers a small shaped request."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from thinkcap.proxy.dialects import (
    CAP_FIELD_ADVICE,
    ENGINE_GAUGES,
    Applied,
    apply_cap,
    ask_running_count,
    honoured,
)
from thinkcap.proxy.logs import logger
from thinkcap.proxy.pool import Replica
from thinkcap.proxy.request.forcing import Reasoning
from thinkcap.proxy.request.forward import SHAPED
from thinkcap.proxy.request.sse import Events, Tokens, delta_of, from_usage, running_count
from thinkcap.proxy.state import ProxyState

#: The cap the start-up probe asks for.
PROBE_CAP = 8
#: Probes whose reasoning keeps within a reasoning budget before it is read as honoured:
#: one reasoning that ends early by itself looks like a budget that binds (2 of 20 single
#: probes on llama-server with SmolLM2 ignoring the field), while a budget ignored shows as
#: soon as one reasoning runs past it.
PROBE_ATTEMPTS = 5
#: Failed probe requests (no answer, or 5xx) a series sends again before its verdict is
#: ``error``: one connection the server resets at start-up is not a backend that fails.
PROBE_RETRIES = 2
PROBE_TIMEOUT_S = 60.0
PROBE_RETRY_FIRST_S = 1.0
#: Pause before a failed probe request of a series is sent again.
PROBE_RETRY_GAP_S = 0.2
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


def _read_answer(raw: bytes, tags: tuple[str, str]) -> tuple[Tokens | None, Reasoning]:
    """The probe's answer, streamed (SSE) or whole (JSON): its usage and its reasoning."""
    reasoning = Reasoning(tags)
    text = raw.lstrip()
    if text.startswith(b"{"):
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        choices = data.get("choices")
        message = choices[0].get("message") if isinstance(choices, list) and choices else None
        if isinstance(message, dict):
            reasoning.feed({k: v for k, v in message.items() if k in ("reasoning_content", "reasoning", "content")})
            reasoning.deltas = 0  # one message is not one token: a whole answer's reasoning is not counted
        return from_usage(data.get("usage")), reasoning
    tokens, deltas = None, 0
    for item in Events().feed(raw + b"\n\n"):
        if isinstance(item, dict):
            tokens = from_usage(item.get("usage")) or tokens
            delta = delta_of(item)
            reasoning.feed(delta, running_count(item))
            deltas += any(
                isinstance(delta.get(k), str) and delta[k] for k in ("content", "reasoning_content", "reasoning")
            )
    if tokens is None and deltas:  # no usage in the stream: one token per delta, as the request path counts
        tokens = Tokens(completion=deltas, source="stream")
    return tokens, reasoning


#: Tokens past the budget a native field may let through: the end tag the server forces.
END_TAG_SLACK = 3


async def probe(state: ProxyState) -> dict[str, Any]:
    """Send one tiny streamed request with a small cap and see what the backend does with it.

    The verdict's ``status``: ``honoured`` (for a reasoning budget, by each of
    :data:`PROBE_ATTEMPTS` probes, ``probes``, that had a count), ``not_honoured``,
    ``unknown`` (no count to judge by: no reasoning seen, no usage), ``rejected`` (the
    backend answers 4xx to the cap field and 200 without it: the field is then left out of
    requests until a later probe passes; ``backend_error`` and ``advice`` say why and what
    to configure) or ``error`` (no answer, or 4xx/5xx with and without the field, in
    more than :data:`PROBE_RETRIES` requests of the series; ``backend_error`` holds the body).
    ``reasoning`` says where the answer's reasoning was: ``reasoning_content`` (a field of
    its own), ``tags`` (inside ``content``, between ``[backend] reasoning_tags``) or
    ``none`` seen. The reasoning count is the usage's, else
    counted as budget forcing counts it (:class:`~thinkcap.proxy.request.forcing.Reasoning`).
    """
    b = state.settings.backend
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Count from 1 to 100, one number per line."}],
                            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
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
    body["max_tokens"] = 8 * PROBE_CAP  # room to show a budget ignored, where the field bounds the reasoning
    ask_running_count(body, b.dialect)  # the reasoning counted as forcing counts it
    applied = apply_cap(body, PROBE_CAP, b.dialect, answer_allowance=b.answer_allowance, thinks=b.thinks)
    kept: dict[str, Any] | None = None  # the last probe that kept within the budget
    attempts = PROBE_ATTEMPTS if b.reasoning_cap else 1
    retries = PROBE_RETRIES
    done = 0
    while done < attempts:
        verdict = await _probe_once(state, body, bare, applied)
        if verdict["status"] == "error" and retries > 0:
            retries -= 1
            await asyncio.sleep(PROBE_RETRY_GAP_S)
            continue
        done += 1
        if verdict["status"] not in ("honoured", "unknown"):
            return verdict
        if verdict["status"] == "honoured":
            kept = verdict
    return verdict if kept is None else kept | {"probes": attempts}


async def _probe_once(
    state: ProxyState, body: dict[str, Any], bare: dict[str, Any], applied: Applied
) -> dict[str, Any]:
    """One probe request and the verdict it gives (see :func:`probe`)."""
    b = state.settings.backend
    try:
        status, raw = await _probe_post(state, body)
        if status != 200:
            error = raw.decode(errors="replace")[:PROBE_ERROR_CHARS]
            if 400 <= status < 500:
                bare_status, bare_raw = await _probe_post(state, bare)
                if bare_status == 200:
                    return {
                        "status": "rejected",
                        "field": applied.field,
                        "http_status": status,
                        "backend_error": error,
                        "advice": CAP_FIELD_ADVICE.get(b.dialect, "check [backend] dialect"),
                        "reasoning": _where(_read_answer(bare_raw, b.reasoning_tags)[1]),
                    }
            return {"status": "error", "detail": f"probe answered HTTP {status}", "backend_error": error}
        tokens, seen = _read_answer(raw, b.reasoning_tags)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {"status": "error", "detail": f"probe failed: {type(exc).__name__}"}
    reasoning = None if tokens is None else tokens.reasoning
    if reasoning is None and seen.tokens:
        reasoning = seen.tokens
    completion = None if tokens is None else tokens.completion
    verdict = honoured(
        b.dialect, applied.effective + (END_TAG_SLACK if b.reasoning_cap else 0), reasoning_tokens=reasoning,
        completion_tokens=completion, thinks=b.thinks,
    )  # fmt: skip
    status_word = {True: "honoured", False: "not_honoured", None: "unknown"}[verdict]
    return {
        "status": status_word,
        "field": applied.field,
        "limit": applied.effective,
        "reasoning_tokens": reasoning,
        "completion_tokens": completion,
        "reasoning": _where(seen),
    }


def _where(seen: Reasoning) -> str:
    return {"field": "reasoning_content", "tags": "tags"}.get(seen.where or "", "none")


def choose_budget(state: ProxyState) -> None:
    """With ``[backend] budget = "auto"``: forced once the probe saw the cap field rejected, or
    a reasoning cap ignored; native otherwise. Logs a change."""
    b = state.settings.backend
    verdict = state.probe
    if b.budget != "auto" or verdict["status"] in ("pending", "error"):
        return
    if verdict["status"] == "rejected":
        mode, why = "forced", f"auto: the backend rejects {verdict['field']} (HTTP {verdict.get('http_status')})"
    elif verdict["status"] == "not_honoured" and b.reasoning_cap:
        mode, why = "forced", (f"auto: the backend ignores {verdict['field']} ({verdict['reasoning_tokens']} "
                               f"reasoning tokens against a budget of {verdict['limit']})")  # fmt: skip
    else:
        mode, why = "native", f"auto: the probe found {verdict['field']} {verdict['status']}"
    if mode == "forced" and not state.can_force:
        mode, why = "native", why + "; the gateway processor cannot force a budget (it sees one request per answer)"
    elif verdict.get("reasoning") == "none" and mode == "forced":
        why += "; the probe saw no reasoning to count (check [backend] reasoning_tags)"
    changed = mode != state.budget
    state.budget, state.budget_reason = mode, why
    if changed:
        logger().warning("budget", mode=mode, reason=why, reasoning=verdict.get("reasoning"))


async def run_probe(state: ProxyState) -> None:
    """Probe until the backend answers (backing off up to ``PROBE_RETRY_MAX_S``), then log the verdict.

    A backend that rejects the cap field is probed again every ``PROBE_RETRY_MAX_S``; the
    field goes back into requests once a probe passes.
    """
    log = logger()
    delay = PROBE_RETRY_FIRST_S
    while True:
        state.probe = await probe(state)
        choose_budget(state)
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


def parse_gauges(text: str) -> dict[str, float] | None:
    """The engine's requests ``running`` and ``waiting`` from its Prometheus text (the names in
    :data:`~thinkcap.proxy.dialects.ENGINE_GAUGES`, summed over labels); ``None`` if it has
    none of them."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        kind = ENGINE_GAUGES.get(family.name)
        if kind is not None:
            out[kind] = out.get(kind, 0.0) + sum(sample.value for sample in family.samples)
    return out or None


async def watch_engine_gauges(state: ProxyState) -> None:
    """Every ``engine_gauges_s``, read each replica's ``/metrics``: the engine's own requests
    running and waiting, which also count traffic that did not come through this thinkcap (other
    gateways, other replicas, clients sent straight to the engine). A read that fails leaves the
    last one to age out (see :func:`engine_waiting`)."""
    log = logger()
    interval = state.settings.backend.engine_gauges_s
    assert interval is not None
    warned: set[str] = set()
    while True:
        for replica in state.pool.replicas:
            try:
                async with state.http().get(replica.url + "/metrics",
                                            timeout=aiohttp.ClientTimeout(total=READY_TIMEOUT_S)) as r:  # fmt: skip
                    text = await r.text() if r.status == 200 else ""
                gauges = parse_gauges(text) if text else None
            except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError):
                gauges = None
            if gauges is None:
                if replica.url not in warned:
                    warned.add(replica.url)
                    log.warning("engine_gauges", replica=replica.url,
                                warning="no engine gauges on its /metrics (vLLM, SGLang, or llama-server with "
                                "--metrics); thinkcap's own count stands alone")  # fmt: skip
                continue
            warned.discard(replica.url)
            replica.engine, replica.engine_at = gauges, state.clock()
            state.metrics.engine(replica.url, gauges)
        await asyncio.sleep(interval)


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
