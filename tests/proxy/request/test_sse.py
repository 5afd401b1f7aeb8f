"""SSE splitting and token accounting from usage or streamed deltas."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkcap.proxy.request.sse import (
    UNCOUNTED_BYTES,
    Events,
    MalformedStreamError,
    StreamTally,
    Tokens,
    from_usage,
    whole_tokens,
)


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


def test_a_reported_zero_next_to_streamed_reasoning_is_unknown_not_zero() -> None:
    """Usage that says ``reasoning_tokens: 0`` after reasoning deltas were streamed (vLLM does
    for some templates) takes the streamed count; a 0 with no reasoning streamed stays 0; a
    whole answer whose usage says 0 next to reasoning text has an unknown reasoning count."""
    usage = {"prompt_tokens": 2, "completion_tokens": 4, "completion_tokens_details": {"reasoning_tokens": 0}}
    tally = StreamTally(strip_usage=False)
    events = [{"choices": [{"delta": {"reasoning_content": "a"}}]}] * 3 + [{"choices": [], "usage": usage}]
    tally.feed(b"".join(sse(e) for e in events) + b"data: [DONE]\n\n")
    tokens = tally.tokens()
    assert (tokens.reasoning, tokens.reasoning_source, tokens.completion) == (3, "stream", 4)
    plain = StreamTally(strip_usage=False)
    plain.feed(sse({"choices": [{"delta": {"content": "b"}}]}) + sse({"choices": [], "usage": usage}))
    assert plain.tokens().reasoning == 0 and plain.tokens().reasoning_source == "usage"
    whole = {"choices": [{"message": {"content": "4", "reasoning_content": "two and two"}}], "usage": usage}
    assert whole_tokens(whole) == replace(from_usage(usage), reasoning=None, reasoning_source=None)  # type: ignore[type-var]
    whole["choices"][0]["message"].pop("reasoning_content")  # type: ignore[index, union-attr]
    assert whole_tokens(whole) == from_usage(usage)


def test_a_stray_end_tag_in_the_content_is_not_answer_text() -> None:
    """After a budget cut llama-server may send ``</think>`` as a content delta: it is not
    counted as a content token."""
    tally = StreamTally(strip_usage=False)
    events = [{"choices": [{"delta": {"reasoning_content": "r"}}]}] * 2
    events += [{"choices": [{"delta": {"content": "</think>\n\n"}}]}, {"choices": [{"delta": {"content": "ok"}}]}]
    tally.feed(b"".join(sse(e) for e in events) + b"data: [DONE]\n\n")
    assert (tally.reasoning_chunks, tally.content_chunks) == (2, 1)


def test_events_are_split_across_reads_and_a_bad_one_is_an_error() -> None:
    """Events split anywhere across reads come out whole, CRLF or LF, comments skipped; a data
    payload that is not a JSON object is an error."""
    events = Events()
    assert events.feed(b'data: {"a"') == []
    assert events.feed(b": 1}\r\n\r\n: keep-alive\n\ndata: [DONE]\n") == [{"a": 1}]
    assert events.feed(b"\n") == ["[DONE]"]
    with pytest.raises(MalformedStreamError):
        Events().feed(b"data: [1, 2]\n\n")
