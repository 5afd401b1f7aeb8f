"""Each dialect's cap field, never above a client's limit."""

from __future__ import annotations

from typing import Any

import pytest

from thinkcap.proxy.dialects import ClientLimitError, apply_cap, honoured


@pytest.mark.parametrize("dialect", ["vllm", "sglang", "openai", "llamacpp", "max_tokens"])
@pytest.mark.parametrize("client", [None, 0, 5, 500])
def test_effective_limit_is_min_of_client_and_cap(dialect: str, client: int | None) -> None:
    """For every dialect and client limit the effective limit is min(client, cap), never raised."""
    field = {"vllm": "thinking_token_budget", "sglang": "thinking_budget", "openai": "max_completion_tokens"}.get(
        dialect, "max_tokens"
    )
    body: dict[str, Any] = {}
    if client is not None:
        if dialect == "sglang":
            body["custom_params"] = {field: client}
        else:
            body[field] = client
    applied = apply_cap(body, 40, dialect)
    zero_unset = dialect not in ("vllm", "sglang")
    limit = None if client is None or (client == 0 and zero_unset) else client
    want = 40 if limit is None else min(limit, 40)
    assert applied.effective == (max(1, want) if zero_unset else want)
    written = body["custom_params"][field] if dialect == "sglang" else body[field]
    assert written == applied.effective


def test_cap_zero_never_becomes_unlimited_on_llamacpp() -> None:
    """A zero cap is sent as max_tokens 1, because llama.cpp reads 0 as no limit."""
    body: dict[str, Any] = {}
    assert apply_cap(body, 0, "llamacpp").effective == 1 and body["max_tokens"] == 1
    body = {}
    assert apply_cap(body, 0, "vllm").effective == 0 and body["thinking_token_budget"] == 0


def test_answer_allowance_and_client_limit_errors() -> None:
    """Total-count dialects add the answer allowance; malformed client limits are named."""
    body: dict[str, Any] = {}
    assert apply_cap(body, 100, "openai", answer_allowance=50).effective == 150
    with pytest.raises(ClientLimitError, match="max_tokens"):
        apply_cap({"max_tokens": "lots"}, 10, "llamacpp")
    with pytest.raises(ClientLimitError, match="custom_params"):
        apply_cap({"custom_params": [1]}, 10, "sglang")
    assert honoured("vllm", 8, reasoning_tokens=9, completion_tokens=3) is False
    assert honoured("llamacpp", 8, reasoning_tokens=None, completion_tokens=8) is True
    assert honoured("openai", 8, reasoning_tokens=None, completion_tokens=None) is None


@pytest.mark.parametrize(
    ("body", "want"),
    [({}, 40), ({"thinking_budget_tokens": 10}, 10), ({"thinking_budget_tokens": -1}, 40),
     ({"reasoning_budget_tokens": 7}, 7), ({"thinking_budget_tokens": 90, "reasoning_budget_tokens": 20}, 20)],
)  # fmt: skip
def test_llama_server_caps_the_thinking_budget_where_the_model_thinks(body: dict[str, Any], want: int) -> None:
    """thinking_budget_tokens = min(client's budget, cap), -1 being no client limit; the alias
    reasoning_budget_tokens, which the server reads first, is folded into it."""
    body = dict(body)
    applied = apply_cap(body, 40, "llama-server")
    assert applied.field == "thinking_budget_tokens" and applied.effective == want
    assert body["thinking_budget_tokens"] == want and "reasoning_budget_tokens" not in body
    with pytest.raises(ClientLimitError, match="thinking_budget_tokens"):
        apply_cap({"thinking_budget_tokens": -2}, 40, "llama-server")
    assert honoured("llama-server", 8, reasoning_tokens=None, completion_tokens=3) is None


def test_llama_server_caps_max_tokens_where_the_model_does_not_think() -> None:
    """For a model that does not think, llama-server's cap is max_tokens with the answer allowance,
    judged on the completion tokens."""
    body: dict[str, Any] = {"max_tokens": 0}
    applied = apply_cap(body, 12, "llama-server", answer_allowance=4, thinks=False)
    assert applied.field == "max_tokens" and body == {"max_tokens": 16}
    assert honoured("llama-server", 16, reasoning_tokens=None, completion_tokens=16, thinks=False) is True
