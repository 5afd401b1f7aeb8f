"""Budget forcing's parts: the reasoning count (a field of its own, or
between the tags inside ``content``), the continuation's body, the server's echo of the
prefill and the one usage for both requests. The whole path runs against the real engine in
``tests/e2e/test_forced_budget.py``."""

from __future__ import annotations

from thinkcap.proxy.request.forcing import Echo, Reasoning, combined_usage, continuation
from thinkcap.proxy.request.sse import Tokens, running_count

TAGS = ("<think>", "</think>")


def test_reasoning_in_a_field_counts_one_token_per_delta_until_the_answer() -> None:
    """``reasoning_content`` deltas count one token each; the first content with text ends the
    reasoning (a stray end tag in the content does not)."""
    r = Reasoning(TAGS)
    for piece in ("\n", "I", " add"):
        r.feed({"reasoning_content": piece})
    r.feed({"content": "</think>\n"})
    assert (r.where, r.tokens, r.ended) == ("field", 3, False)
    r.feed({"content": "5"})
    r.feed({"reasoning_content": "late"})
    assert r.ended and r.tokens == 3
    assert r.prefill() == "<think>\n\nI add\n</think>\n\n" and r.closing() == ""  # as generated


def test_reasoning_between_tags_in_the_content() -> None:
    """Content that opens with the start tag (even split over deltas) is reasoning until the
    end tag; the text after the tag counts, the tag does not; the prefill is the content so far
    closed with the end tag, which the client is shown too."""
    r = Reasoning(TAGS)
    for piece in ("\n", "<thi", "nk>\n", "one", " two"):
        r.feed({"content": piece})
    assert (r.where, r.tokens, r.ended) == ("tags", 2, False)
    assert r.prefill() == "\n<think>\none two\n</think>\n\n"
    assert r.closing() == "\n</think>\n\n"
    for piece in ("</", "think", ">"):
        r.feed({"content": piece})
    assert r.ended


def test_content_without_the_start_tag_has_no_reasoning() -> None:
    """An answer that does not open with the start tag is not reasoning: nothing is counted
    and nothing would be forced."""
    r = Reasoning(TAGS)
    r.feed({"content": "  The answer"})
    r.feed({"content": " is 5"})
    assert r.ended and r.tokens == 0 and r.where is None


def test_the_continuation_carries_the_prefill_and_what_is_left_of_the_clients_limit() -> None:
    """The second body adds the assistant prefill, the dialect's continue fields (vLLM's), and
    takes the tokens spent off a client's total limit (never below 1); the first body is left
    as it was."""
    first = {"messages": [{"role": "user", "content": "q"}], "max_tokens": 40, "stream": True}
    second = continuation(first, "<think>\nx\n</think>\n\n", "vllm", 8)
    assert second["messages"][-1] == {"role": "assistant", "content": "<think>\nx\n</think>\n\n"}
    assert second["continue_final_message"] is True and second["add_generation_prompt"] is False
    assert second["max_tokens"] == 32 and first["max_tokens"] == 40 and len(first["messages"]) == 1
    assert continuation(first, "p", "llama-server", 100)["max_tokens"] == 1
    assert "continue_final_message" not in continuation(first, "p", "llama-server", 1)


def test_the_echo_of_the_prefill_is_dropped() -> None:
    """llama-server sends the prefill back (after an empty think block with
    ``--reasoning-format none``), in one delta or several: it is dropped and the rest kept; a
    server that does not echo (vLLM) loses nothing, also when its answer is shorter than the
    prefill (held, then flushed at the end)."""
    prefill = "<think>\nI add\n</think>\n\n"
    assert Echo(prefill).feed(prefill + "5") == "5"
    echo = Echo(prefill)
    assert echo.feed("<think>\n\n</think>\n\n" + prefill[:5]) == ""
    assert echo.feed(prefill[5:] + "The") == "The" and echo.feed(" end") == " end"
    echo = Echo(prefill)
    assert echo.feed("5.") == "" and echo.flush() == "5."
    long_answer = "x" * (len(prefill) + 64)
    assert Echo(prefill).feed(long_answer) == long_answer


def test_one_usage_adds_both_requests() -> None:
    """Prompt, completion and cached tokens are summed; the reasoning count is thinkcap's."""
    usage = combined_usage(Tokens(20, 8, None, 0), Tokens(30, 12, None, 28), 8)
    assert usage == {
        "prompt_tokens": 50,
        "completion_tokens": 20,
        "total_tokens": 70,
        "prompt_tokens_details": {"cached_tokens": 28},
        "completion_tokens_details": {"reasoning_tokens": 8},
    }


def test_the_servers_running_count_wins_over_the_deltas() -> None:
    """Where chunks carry the server's running count (llama-server's ``timings.predicted_n``,
    vLLM's continuous usage), the reasoning is counted by it: a delta that held back text
    (``<count`` held as a possible tag) carries two tokens. Inside ``content`` the tokens up
    to the start tag are not reasoning."""
    r = Reasoning(TAGS)
    for i, piece in enumerate(("\n", "1", "<count", ">")):
        r.feed({"reasoning_content": piece}, running=2 * i + 1)
    assert (r.deltas, r.tokens) == (4, 7)
    tagged = Reasoning(TAGS)
    tagged.feed({"content": "<think>"}, running=3)
    tagged.feed({"content": "\n"}, running=4)
    tagged.feed({"content": "one"}, running=5)
    tagged.feed({"content": " two three"}, running=8)
    assert tagged.tokens == 4  # after "<think>\n" (4 tokens): "one" and " two three"
    assert running_count({"timings": {"predicted_n": 9}}) == 9
    assert running_count({"usage": {"completion_tokens": 4}}) == 4 and running_count({"usage": None}) is None
