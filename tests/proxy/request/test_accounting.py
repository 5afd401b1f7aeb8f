"""A request's token clock: the first token's time and the decode gaps the step fit learns from."""

from __future__ import annotations

import json

import pytest

from thinkcap.estimators import GapTally
from thinkcap.proxy.pool import Occupancy
from thinkcap.proxy.request.accounting import TokenClock

TOKEN = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'


def test_the_gap_before_a_continuation_is_not_a_step() -> None:
    """Budget forcing sends a second upstream request: the time before its first token is its
    prefill, so after ``pause`` that read adds no gap; the gaps before and after it count."""
    occupancy = Occupancy()
    occupancy.start(0.0, streamed=True)
    clock = TokenClock(gaps=GapTally())
    times = iter([1.00, 1.01, 1.02, 1.50, 1.51])
    for k in range(5):
        if k == 3:
            clock.pause()
        clock.read(TOKEN, lambda: next(times), occupancy)
    assert clock.t_first_token == 1.00 and clock.counted == 5
    assert clock.gaps is not None and clock.gaps.samples == 3
    assert abs(clock.gaps.seconds - 0.03) < 1e-9  # 0.01 three times; the 0.48 s before the continuation left out


def event(field: str, tokens: int) -> bytes:
    """One SSE event carrying ``tokens`` words of text, as the simulated engine sends them."""
    return b"data: " + json.dumps({"choices": [{"delta": {field: "hmm " * tokens}}]}).encode() + b"\n\n"


@pytest.mark.parametrize(("reasoning", "answer"), [(50, 24), (144, 16), (7, 3), (64, 12)])
def test_events_of_several_tokens_are_counted_by_their_text(reasoning: int, answer: int) -> None:
    """A server that sends 16 tokens per event sends short ones where the reasoning ends and
    at the end: counting every event as the usage's mean read them as too many tokens (the
    50 + 24-token answer's step 6 % short). Apportioned by their text, each gap's step is the
    engine's."""
    tau = 0.01
    sizes = [min(16, reasoning - k) for k in range(0, reasoning, 16)]
    sizes += [min(16, answer - k) for k in range(0, answer, 16)]
    fields = ["reasoning_content"] * -(-reasoning // 16) + ["content"] * -(-answer // 16)
    occupancy = Occupancy()
    occupancy.start(0.0, streamed=True)
    occupancy.start(0.0, streamed=False)  # another request decoding beside it: two in service
    clock = TokenClock(gaps=GapTally())
    t = 1.0
    for k, (field, size) in enumerate(zip(fields, sizes, strict=True)):
        if k:
            t += size * tau  # the event leaves once its tokens are made, one step each
        clock.read(event(field, size), lambda t=t: t, occupancy)
    clock.settle(reasoning + answer)
    assert clock.gaps is not None
    sxx, sxy, _, count = clock.gaps.levels[2]
    assert count == len(sizes) - 1
    assert sxy / sxx == pytest.approx(tau, rel=1e-9)
    assert clock.gaps.tokens == pytest.approx(reasoning + answer - sizes[0])


def test_one_token_per_event_is_counted_in_events() -> None:
    """A server that sends one token per event (llama-server, vLLM) is read in events, however
    long each token's text: a one-letter token and a long word are one step each."""
    occupancy = Occupancy()
    occupancy.start(0.0, streamed=True)
    clock = TokenClock(gaps=GapTally())
    words = ["a", "tremendously", "b", "c", "photosynthesis"]
    for k, word in enumerate(words):
        data = b"data: " + json.dumps({"choices": [{"delta": {"content": word}}]}).encode() + b"\n\n"
        clock.read(data, lambda k=k: 1.0 + 0.01 * k, occupancy)
    clock.settle(len(words))
    assert clock.gaps is not None
    sxx, sxy, _, _ = clock.gaps.levels[1]
    assert sxy / sxx == pytest.approx(0.01, rel=1e-9)


def test_a_gap_during_which_another_request_left_is_not_read_as_one_occupancy() -> None:
    """Two requests decode; the other leaves in the middle of a gap: that gap's steps ran at 2
    and then at 1, so it is no sample of either (read at 1, it made one sequence's step look
    slow); the gaps before and after are samples at 2 and at 1."""
    occupancy = Occupancy()
    occupancy.start(0.0, streamed=True)
    occupancy.start(0.0, streamed=False)  # the other one
    clock = TokenClock(gaps=GapTally())
    for t in (1.00, 1.01):
        clock.read(TOKEN, lambda t=t: t, occupancy)
    occupancy.stop(1.015)
    for t in (1.02, 1.03):
        clock.read(TOKEN, lambda t=t: t, occupancy)
    assert clock.gaps is not None and clock.gaps.samples == 2
    assert {j: row[3] for j, row in clock.gaps.levels.items()} == {2: 1.0, 1: 1.0}
