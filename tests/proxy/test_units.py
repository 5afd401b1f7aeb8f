"""Classifier, dialects, admission and stream accounting on their own."""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkcap.controller import TaskType
from thinkcap.proxy.accounting import UNCOUNTED_BYTES, MalformedStreamError, StreamTally, Tokens, from_usage
from thinkcap.proxy.admission import Admission, QueueFullError
from thinkcap.proxy.classify import CLASSIFY_CHARS, Classifier, NaiveBayes, UnknownTypeError, prompt_text
from thinkcap.proxy.config import TypeConfig
from thinkcap.proxy.dialects import ClientLimitError, apply_cap, honoured


def tc(name: str, **kw: Any) -> TypeConfig:
    task = TaskType(
        name=name,
        prior=0.5,
        accuracy_base=0.1,
        accuracy_gain=0.5,
        accuracy_rate=0.01,
        overhead_s=0.1,
        per_token_s=0.01,
        min_tokens=0,
        max_tokens=100,
    )
    return TypeConfig(task=task, **kw)


MATH = ("solve the equation for x", "integrate this function", "compute the sum of the series", "find the derivative")
CODE = ("write a python function", "fix this bug in my code", "refactor the class", "write unit tests for the module")


def test_naive_bayes_learns_from_examples_and_reports_cross_validation() -> None:
    """Trained on a few examples per type it sorts new prompts; leave-one-out accuracy is reported."""
    nb = NaiveBayes({"math": MATH, "code": CODE})
    assert nb.predict("please solve for y") == "math"
    assert nb.predict("a python class with a bug") == "code"
    assert nb.predict("completely unseen words") is None
    cv = nb.leave_one_out()
    assert cv is not None and 0.5 <= cv <= 1.0


def test_leave_one_out_can_fail() -> None:
    """Examples that share nothing with their own type score zero in cross-validation."""
    nb = NaiveBayes({"a": ("alpha beta", "gamma delta"), "b": ("alpha", "gamma")})
    assert nb.leave_one_out() == 0.0


def test_classifier_chain_order_and_errors() -> None:
    """Rules beat the classifier; no evidence falls to the default; bad regexes and types are errors."""
    c = Classifier(
        [tc("math", keywords=("lemma",), examples=MATH), tc("code", patterns=(r"```",), examples=CODE)], "code"
    )
    assert (c.classify("a LEMMA about code").type, c.classify("a LEMMA").source) == ("math", "rule")
    assert c.classify("```x``` solve the equation").source == "rule"
    assert c.classify("solve the series").source == "classifier"
    assert c.classify("zzz").type == "code" and c.classify("zzz").source == "default"
    assert c.classify("lemmas").source != "rule"  # keywords match whole words
    with pytest.raises(UnknownTypeError, match="math, code"):
        c.explicit("poetry")
    with pytest.raises(ValueError, match="not a valid regex"):
        Classifier([tc("math", patterns=("(",))], "math")
    assert Classifier([tc("math")], "math").cv_accuracy is None


def test_prompt_text_reads_chat_parts_and_completions() -> None:
    """The last user message (string or parts) or the completions prompt is classified."""
    body = {
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]},
        ]
    }
    assert prompt_text(body) == "a"
    assert prompt_text({"prompt": ["p", "q"]}) == "p q" and prompt_text({"messages": "nonsense"}) == ""


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


async def test_admission_is_fifo_and_bounded() -> None:
    """Waiters get slots in arrival order; a cancelled waiter leaves; a full line raises."""
    adm = Admission(1, 2)
    await adm.enter()
    order: list[int] = []

    async def wait(i: int) -> None:
        await adm.enter()
        order.append(i)

    tasks = [asyncio.create_task(wait(i)) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError):
        await adm.enter()
    tasks[0].cancel()
    await asyncio.sleep(0)
    adm.leave()
    await tasks[1]
    assert order == [1] and adm.in_flight == 1 and adm.queued == 0
    adm.leave()
    assert adm.in_flight == 0


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def test_stream_tally_splits_counts_and_strips_usage() -> None:
    """Events split across reads are reassembled; the usage-only chunk is dropped when asked."""
    stream = (
        sse({"choices": [{"delta": {"reasoning_content": "a"}}]})
        + sse({"choices": [{"delta": {"reasoning": "b"}}]})
        + sse({"choices": [{"delta": {"content": "c"}}]})
        + sse(
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": 2,
                    "completion_tokens": 3,
                    "completion_tokens_details": {"reasoning_tokens": 2},
                },
            }
        )
        + b"data: [DONE]\n\n"
    )
    tally = StreamTally(strip_usage=True)
    out = b"".join(b"".join(tally.feed(stream[i : i + 7])) for i in range(0, len(stream), 7))
    assert out == stream.replace(stream.split(b"\n\n")[3] + b"\n\n", b"")
    assert tally.done and tally.tokens().reasoning == 2 and tally.tokens().source == "usage"
    whole = StreamTally(strip_usage=True)
    assert b"".join(whole.feed(stream)) == out and whole.tokens() == tally.tokens() and whole.done
    kept = StreamTally(strip_usage=False)
    assert b"".join(kept.feed(stream)) == stream
    counted = StreamTally(strip_usage=False)
    counted.feed(stream.replace(stream.split(b"\n\n")[3] + b"\n\n", b""))
    assert (counted.tokens().reasoning, counted.tokens().completion, counted.tokens().source) == (2, 3, "stream")
    broken = StreamTally(strip_usage=False)
    good = sse({"choices": [{"delta": {"content": "c"}}]})
    assert broken.feed(good + b"data: {oops\n\n" + good) == [good]
    assert isinstance(broken.error, MalformedStreamError) and broken.feed(good) == []


def delta_event(key: str, text: str, compact: bool) -> bytes:
    seps = (",", ":") if compact else (", ", ": ")
    return b"data: " + json.dumps({"choices": [{"delta": {key: text}}]}, separators=seps).encode() + b"\n\n"


EVENTS = st.one_of(
    st.builds(
        delta_event,
        st.sampled_from(["reasoning_content", "reasoning", "content", "role"]),
        st.sampled_from(["", "a", "two words", 'q"uote', "\n"]),
        st.booleans(),
    ),
    st.just(sse({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})),
    st.just(b"data: [DONE]\n\n"),
    st.just(b": keep-alive\n\n"),
    st.just(b"id: 7\nevent: chunk\n" + delta_event("content", "x", True)),
)


def expected_counts(events: list[bytes]) -> tuple[int, int]:
    """Non-empty reasoning and content deltas, read from the parsed JSON."""
    reasoning = content = 0
    for event in events:
        for line in event.split(b"\n"):
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:]).get("choices", []):
                    delta = choice["delta"]
                    reasoning += sum(1 for k in ("reasoning_content", "reasoning") if delta.get(k))
                    content += 1 if delta.get("content") else 0
    return reasoning, content


@settings(max_examples=300, deadline=None)
@given(events=st.lists(EVENTS, max_size=30), cuts=st.lists(st.integers(0, 4000), max_size=6), crlf=st.booleans())
def test_stream_tally_forwards_and_counts_the_same_however_the_stream_is_cut(
    events: list[bytes], cuts: list[int], crlf: bool
) -> None:
    """Whatever reads the stream arrives in, every event is forwarded once, in order, and the
    deltas, chunks and end are counted as the events say."""
    stream = b"".join(events)
    wire = stream.replace(b"\n", b"\r\n") if crlf else stream
    points = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    tally = StreamTally(strip_usage=False)
    out = b"".join(
        b"".join(tally.feed(wire[a:b], first_only=i == 0)) for i, (a, b) in enumerate(itertools.pairwise(points))
    )
    out += b"".join(tally.feed(b"")) + tally.flush()
    assert out == stream and tally.error is None
    usages = [json.loads(e[6:])["usage"] for e in events if e.startswith(b'data: {"choices": [], "usage"')]
    reasoning, content = expected_counts(events)
    filled = (reasoning or None, "stream" if reasoning else None)  # from the deltas, if any were streamed
    counted = Tokens(None, reasoning + content, *filled[:1], 0, "stream", filled[1])
    usage = from_usage(usages[-1]) if usages else None
    if usage is not None and usage.reasoning is None:
        usage = replace(usage, reasoning=filled[0], reasoning_source=filled[1])
    assert tally.tokens() == (usage if usages else counted)
    assert tally.done == (b"data: [DONE]\n\n" in events)
    assert tally.started == any(b"data: {" in e for e in events)


@pytest.mark.parametrize("usage_at_end", [False, True], ids=["no-usage", "usage"])
def test_a_long_stream_is_counted_in_bounded_memory_and_usage_wins(usage_at_end: bool) -> None:
    """Forwarded bytes wait uncounted only up to the bound; a stream many times longer is counted
    exactly, and a usage object at its end is what the tally reports."""
    events = [sse({"choices": [{"delta": {"role": "assistant", "content": ""}}]})]
    events += [sse({"choices": [{"delta": {"reasoning_content": "hmm " * (i % 3)}}]}) for i in range(3000)]
    events += [sse({"choices": [{"delta": {"content": f"w{i}"}}]}) for i in range(1000)]
    usage = {"prompt_tokens": 9, "completion_tokens": 4000, "completion_tokens_details": {"reasoning_tokens": 3000}}
    if usage_at_end:
        events.append(sse({"choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    stream = b"".join(events)
    assert len(stream) > 3 * UNCOUNTED_BYTES
    tally = StreamTally(strip_usage=False)
    out = b""
    for i in range(0, len(stream), 1000):
        out += b"".join(tally.feed(stream[i : i + 1000]))
        assert tally._uncounted_bytes <= UNCOUNTED_BYTES
    assert out == stream and tally.done
    expected = from_usage(usage) if usage_at_end else Tokens(None, 2000 + 1000, 2000, 0, "stream", "stream")
    assert tally.tokens() == expected


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("strip_usage", [False, True])
def test_stream_tally_can_hand_out_the_first_event_before_the_rest(crlf: bool, strip_usage: bool) -> None:
    """``first_only`` returns the first event alone and keeps the rest of the read for
    ``feed(b"")``: together they give what one ``feed`` gives, with the same counts."""
    events = [sse({"choices": [{"delta": {"role": "assistant"}}]})]
    events += [sse({"choices": [{"delta": {"reasoning_content": f"r{i}"}}]}) for i in range(5)]
    events += [sse({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 5}}), b"data: [DONE]\n\n"]
    stream = b"".join(events)
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    whole = StreamTally(strip_usage=strip_usage)
    expected = b"".join(whole.feed(stream))
    split = StreamTally(strip_usage=strip_usage)
    first = split.feed(stream, first_only=True)
    assert first == [events[0]]
    assert b"".join(first + split.feed(b"")) == expected and split.feed(b"") == []
    assert split.tokens() == whole.tokens() and split.done
    assert split.feed(events[1], first_only=True) == [events[1]]  # past the first event the flag does nothing
    broken = StreamTally(strip_usage=strip_usage)
    assert broken.feed(b"data: {oops\n\n" + events[1], first_only=True) == []
    assert isinstance(broken.error, MalformedStreamError) and broken.feed(b"") == []


@pytest.mark.parametrize(
    ("usage", "reasoning"),
    [
        ({"completion_tokens": 9, "completion_tokens_details": {"reasoning_tokens": 7}}, 7),
        ({"completion_tokens": 9, "reasoning_tokens": 6}, 6),  # SGLang
        ({"completion_tokens": 9, "completion_tokens_details": None, "reasoning_tokens": 5}, 5),
        ({"completion_tokens": 9}, None),  # older vLLM, llama.cpp: unknown, not 0
        ({"completion_tokens": 9, "completion_tokens_details": {"audio_tokens": 0}}, None),
    ],
)
def test_usage_reasoning_is_read_where_each_server_writes_it(usage: dict[str, Any], reasoning: int | None) -> None:
    """OpenAI's details, SGLang's top-level count, or unknown."""
    tokens = from_usage(usage)
    assert tokens is not None and tokens.reasoning == reasoning and tokens.completion == 9
    assert tokens.reasoning_source == (None if reasoning is None else "usage")


def test_a_streamed_usage_without_a_reasoning_count_is_filled_from_the_deltas() -> None:
    """Usage at the end with no reasoning count: the reasoning deltas streamed before give it."""
    tally = StreamTally(strip_usage=True)
    events = [{"choices": [{"delta": {"reasoning_content": "a"}}]}] * 3 + [{"choices": [{"delta": {"content": "b"}}]}]
    events.append({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 4}})
    tally.feed(b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n")
    tokens = tally.tokens()
    assert (tokens.reasoning, tokens.reasoning_source, tokens.completion, tokens.source) == (3, "stream", 4, "usage")


def test_classification_reads_a_bounded_prefix_of_the_prompt() -> None:
    """A keyword past the first CLASSIFY_CHARS characters is not seen: a huge prompt costs what a long one does."""
    c = Classifier([tc("math", keywords=("prove",)), tc("chat")], "chat")
    filler = "word " * (CLASSIFY_CHARS // 5)
    assert c.classify("prove " + filler).type == "math"
    assert c.classify(filler + " prove").type == "chat"
