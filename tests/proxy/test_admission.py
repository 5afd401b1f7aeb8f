"""FIFO admission with a bounded queue, and the count of requests in service."""

from __future__ import annotations

import asyncio

import pytest

from thinkcap.proxy.admission import Admission, QueueFullError
from thinkcap.proxy.pool import Occupancy


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


def test_occupancy_integrates_the_number_in_service() -> None:
    """Two requests overlapping for 1 s of their 2 and 3: each one's mean in service is the
    change of ``area`` over its own time."""
    occ = Occupancy()
    a0 = occ.start(0.0, streamed=False)
    b0 = occ.start(1.0, streamed=False)
    a1 = occ.stop(2.0)
    b1 = occ.stop(4.0)
    assert (a1 - a0) / 2.0 == 1.5  # alone 1 s, with the other 1 s
    assert (b1 - b0) / 3.0 == pytest.approx(4 / 3)
    assert occ.in_service == 0 and occ.area == 5.0


def test_a_gap_is_clean_only_when_no_prompt_was_being_read() -> None:
    """A streamed request reads its prompt until its first token; a whole one for the
    prefill time it is taken to last; a gap that began before either ended is no step."""
    occ = Occupancy(prefill_s=0.3)
    occ.start(0.0, streamed=True)
    assert not occ.clean(-1.0)
    occ.first_token(0.5)
    assert not occ.clean(0.4) and occ.clean(0.5)
    occ.start(1.0, streamed=False)
    assert not occ.clean(1.2) and occ.clean(1.3)
    occ.start(2.0, streamed=True)
    occ.stop(2.5, prefilling=True)  # it ended before a token: its prefill is over too
    assert occ.prefilling == 0 and not occ.clean(2.4) and occ.clean(2.5)


def test_a_gap_during_which_a_request_left_is_no_step() -> None:
    """A request that leaves mid-gap makes the gap steps at two occupancies, read as the one
    left after it: a gap that began before the departure is no step sample, one after it is."""
    occ = Occupancy()
    for _ in range(3):
        occ.start(0.0, streamed=False)
    assert occ.clean(1.0)
    occ.stop(1.5)
    assert occ.in_service == 2 and not occ.clean(1.0) and occ.clean(1.5)
