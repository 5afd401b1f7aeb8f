"""A shaped request's body read, parsed, classified and capped: what ``serve``'s request path
and the gateway processor (:mod:`thinkcap.proxy.extproc`) share."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from thinkcap.proxy.classify import Decision, UnknownTypeError, prompt_text
from thinkcap.proxy.dialects import ClientLimitError, apply_cap
from thinkcap.proxy.errors import ProxyError
from thinkcap.proxy.request.headers import TYPE_HEADER
from thinkcap.proxy.state import ProxyState
from thinkcap.proxy.transport.server import BodyTooLargeError, HttpRequest


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


def classify(state: ProxyState, headers: Mapping[str, str], body: dict[str, Any]) -> Decision:
    """The ``X-Thinkcap-Type`` header, then the body's ``thinkcap`` object (removed), then
    rules, classifier, default."""
    extra = body.pop("thinkcap", None)
    try:
        if TYPE_HEADER in headers:
            return state.classifier.explicit(headers[TYPE_HEADER])
        if extra is not None:
            if not isinstance(extra, dict) or "type" not in extra:
                raise UnknownTypeError('the "thinkcap" field must be an object like {"type": "math"}')
            return state.classifier.explicit(extra["type"])
    except UnknownTypeError as exc:
        raise ProxyError(400, str(exc), "invalid_request_error", code="unknown_type", param="thinkcap.type") from None
    return state.classifier.classify(prompt_text(body))


def write_cap(state: ProxyState, event: dict[str, Any], body: dict[str, Any], type_name: str, *, chat: bool) -> None:
    """Write the type's cap into ``body`` in the backend's dialect (none while the backend
    rejects the field, see the probe) and note it in the request's ``event``; a bad client
    limit is a 400."""
    backend = state.settings.backend
    cap = state.caps.cap(type_name)
    if state.cap_rejected:
        event.update(cap=cap, effective_limit=None, client_limit=None, limit_field=None, cap_skipped=True)
        return
    try:
        applied = apply_cap(body, cap, backend.dialect, answer_allowance=backend.answer_allowance, chat=chat,
                            thinks=backend.thinks)  # fmt: skip
    except ClientLimitError as exc:
        raise ProxyError(400, str(exc), "invalid_request_error", code="invalid_limit", param=exc.param) from None
    event.update(
        cap=cap, effective_limit=applied.effective, client_limit=applied.client_limit, limit_field=applied.field
    )


def ask_stream_counts(state: ProxyState, body: dict[str, Any]) -> tuple[bool, bool]:
    """For a streamed request, ask the upstream for what counting needs: the usage chunk (the
    first value: whether it is to be kept from a client that did not ask for it) and, from
    llama-server while its model thinks, the running count of generated tokens in each chunk
    (the second: whether asked). llama-server's usage has no reasoning count, and one of its
    deltas can hold several tokens (its parser holds back text that may open a tag), so
    counting deltas alone falls short (by a quarter on a counting prompt here)."""
    options = body.get("stream_options")
    strip_usage = not (isinstance(options, dict) and options.get("include_usage") is True)
    if strip_usage:
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    backend = state.settings.backend
    running = backend.dialect == "llama-server" and backend.thinks and state.budget == "native"
    return strip_usage, running and body.setdefault("timings_per_token", True) is True
