"""Every fact about a backend dialect, in one leaf module (it imports nothing of the proxy).

A dialect is how a server takes a reasoning-token cap and reports what it spent. Adding a
backend is this module plus its tests: its name in :data:`DIALECTS`, the field
:func:`apply_cap` writes, whether the cap bounds the reasoning alone (:func:`reasoning_cap`),
the usage :func:`honoured` reads, its keep-alive default (:data:`KEEP_ALIVE`) and what to
configure when it rejects the field (:data:`CAP_FIELD_ADVICE`). The request path, the
start-up probe, the settings and ``thinkcap calibrate`` all read them from here.

The effective limit is never above one the client set: ``effective = min(client, cap)``.

- ``vllm``: ``thinking_token_budget`` (vLLM >= 0.19; the server needs reasoning start and end
  strings, from ``--reasoning-parser`` where the parser defines them, else
  ``--reasoning-config``; a client's ``-1``, vLLM's "unlimited", is no client limit);
- ``sglang``: ``custom_params.thinking_budget`` (strict thinking, ``--enable-strict-thinking``);
- ``openai``: ``max_completion_tokens`` (reasoning and answer together);
- ``llamacpp`` / ``max_tokens``: ``max_tokens``, at least 1, because llama.cpp reads
  ``max_tokens: 0`` as "no limit"; a client's ``max_completion_tokens``, which llama.cpp
  ignores, is enforced through ``max_tokens`` too;
- ``llama-server`` (llama.cpp's own server): for a model that thinks (``thinks``, the
  default), ``thinking_budget_tokens``, which bounds the reasoning alone (a client's own
  ``thinking_budget_tokens`` or ``reasoning_budget_tokens`` is kept where smaller; ``-1``
  is its "unlimited"); for a model that does not, ``max_tokens`` as ``llamacpp``.

For the total-count dialects the cap is raised by ``answer_allowance`` tokens for the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The dialects ``[backend] dialect`` takes.
DIALECTS = ("vllm", "sglang", "openai", "llamacpp", "max_tokens", "llama-server")

#: ``[backend] budget``: ``native`` writes the dialect's cap field; ``forced`` has thinkcap end
#: the reasoning itself at the cap (see :mod:`thinkcap.proxy.request.forcing`); ``auto`` (the
#: default) is native until the start-up probe finds the field rejected or ignored, forced then.
BUDGETS = ("native", "forced", "auto")

#: Fields that make a trailing assistant message a prefill the model continues, by dialect
#: (budget forcing's second request). llama-server continues a trailing assistant message by
#: itself (and echoes it at the start of the answer); vLLM and SGLang need to be told.
CONTINUE_FIELDS: dict[str, dict[str, Any]] = {
    "vllm": {"continue_final_message": True, "add_generation_prompt": False},
    "sglang": {"continue_final_message": True},
}

#: Fields that make a server report its running count of generated tokens in every streamed
#: chunk, by dialect (budget forcing counts the reasoning by it: a delta can hold several
#: tokens, as llama-server's parser holds back text that may open a tag). llama-server puts
#: ``timings.predicted_n`` in each chunk; vLLM and SGLang put ``usage.completion_tokens``.
RUNNING_COUNT_FIELDS: dict[str, dict[str, Any]] = {
    "llama-server": {"timings_per_token": True},
    "vllm": {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    "sglang": {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
}


def ask_running_count(body: dict[str, Any], dialect: str) -> None:
    """Ask for the dialect's running count of generated tokens (:data:`RUNNING_COUNT_FIELDS`)
    in ``body``, in place; ``stream_options`` already there are kept beside it."""
    for key, value in RUNNING_COUNT_FIELDS.get(dialect, {}).items():
        held = body.get(key)
        body[key] = {**held, **value} if isinstance(value, dict) and isinstance(held, dict) else value


#: The engines' own gauges on their Prometheus ``/metrics``: requests running, and requests
#: waiting for a slot (``[backend] engine_gauges_s``). vLLM's come with labels (summed here).
ENGINE_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "llamacpp:requests_processing": "running",
    "llamacpp:requests_deferred": "waiting",
    "sglang:num_running_reqs": "running",
    "sglang:num_queue_reqs": "waiting",
}

#: Whether the shaped routes keep upstream connections alive, by dialect (default: true).
#: llama-server closes a connection it answered with ``Keep-Alive`` now and then just as the
#: next request goes out on it (seen here under load: a 502 ``upstream_disconnected`` 3 ms
#: after sending); the request may have been read, so it is not sent again, and a new
#: connection per request (about 0.1 ms on loopback) avoids the race.
KEEP_ALIVE = {"llama-server": False}

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


def reasoning_cap(dialect: str, thinks: bool = True) -> bool:
    """Whether a dialect's cap bounds the reasoning alone (else the whole answer)."""
    return dialect in ("vllm", "sglang") or (dialect == "llama-server" and thinks)


class ClientLimitError(ValueError):
    """A client-set limit that is not a non-negative integer; ``param`` names it."""

    def __init__(self, param: str, value: Any) -> None:
        super().__init__(f"{param} must be a non-negative integer, got {value!r}")
        self.param = param


@dataclass(frozen=True)
class Applied:
    """What was written: the field, the client's own limit (if any) and the effective limit."""

    field: str
    client_limit: int | None
    effective: int


def _client(
    holder: dict[str, Any], key: str, param: str, *, zero_is_unset: bool = False, minus_one_is_unset: bool = False
) -> int | None:
    value = holder.get(key)
    if value is None:
        return None
    if minus_one_is_unset and value == -1 and not isinstance(value, bool):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ClientLimitError(param, value)
    if value == 0 and zero_is_unset:
        return None
    return value


def _min(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def apply_cap(
    body: dict[str, Any],
    cap: int,
    dialect: str,
    *,
    answer_allowance: int = 0,
    chat: bool = True,
    thinks: bool = True,
) -> Applied:
    """Set the cap in ``body`` (in place) and report the effective limit. Top-level values are
    replaced, never changed in place (``proxy.upstream_body`` relies on it).

    On ``/v1/completions`` (``chat=False``) the ``openai`` dialect writes ``max_tokens``, the
    only limit that API has.
    """
    if dialect == "vllm":  # -1 is vLLM's "unlimited": no client limit, so the cap applies
        client = _client(body, "thinking_token_budget", "thinking_token_budget", minus_one_is_unset=True)
        effective = cap if client is None else min(client, cap)
        body["thinking_token_budget"] = effective
        return Applied("thinking_token_budget", client, effective)
    if dialect == "sglang":
        params = body.get("custom_params")
        if params is None:
            params = {}
        elif not isinstance(params, dict):
            raise ClientLimitError("custom_params", params)
        client = _client(params, "thinking_budget", "custom_params.thinking_budget")
        effective = cap if client is None else min(client, cap)
        body["custom_params"] = {**params, "thinking_budget": effective}  # a new object: the client's is left as it was
        return Applied("custom_params.thinking_budget", client, effective)
    if dialect == "llama-server" and thinks:
        client = _min(
            _client(body, "thinking_budget_tokens", "thinking_budget_tokens", minus_one_is_unset=True),
            _client(body, "reasoning_budget_tokens", "reasoning_budget_tokens", minus_one_is_unset=True),
        )
        effective = cap if client is None else min(client, cap)
        body["thinking_budget_tokens"] = effective
        body.pop("reasoning_budget_tokens", None)  # the server reads this one first
        return Applied("thinking_budget_tokens", client, effective)
    total = cap + answer_allowance
    if dialect == "openai" and chat:
        client = _min(
            _client(body, "max_completion_tokens", "max_completion_tokens", zero_is_unset=True),
            _client(body, "max_tokens", "max_tokens", zero_is_unset=True),
        )
        effective = max(1, total if client is None else min(client, total))
        body["max_completion_tokens"] = effective
        if "max_tokens" in body:
            body["max_tokens"] = effective
        return Applied("max_completion_tokens", client, effective)
    if dialect in ("llamacpp", "max_tokens", "openai", "llama-server"):
        client = _min(
            _client(body, "max_tokens", "max_tokens", zero_is_unset=True),
            _client(body, "max_completion_tokens", "max_completion_tokens", zero_is_unset=True),
        )
        effective = max(1, total if client is None else min(client, total))
        body["max_tokens"] = effective
        return Applied("max_tokens", client, effective)
    raise ValueError(f"unknown dialect {dialect!r}")


def honoured(
    dialect: str, limit: int, *, reasoning_tokens: int | None, completion_tokens: int | None, thinks: bool = True
) -> bool | None:
    """Whether an answer respected ``limit`` (``None`` when the usage needed is missing)."""
    if reasoning_cap(dialect, thinks):
        return None if reasoning_tokens is None else reasoning_tokens <= limit
    return None if completion_tokens is None else completion_tokens <= limit
