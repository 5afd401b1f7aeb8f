"""Write a reasoning-token cap into a request body in the backend's dialect.

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

from thinkcap.proxy.settings import reasoning_cap


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
