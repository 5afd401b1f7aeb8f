"""A request's token clock: the first token's time and the decode gaps the step fit learns from."""

from __future__ import annotations

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
