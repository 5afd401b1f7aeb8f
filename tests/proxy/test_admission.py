"""FIFO admission with a bounded queue."""

from __future__ import annotations

import asyncio

import pytest

from thinkcap.proxy.admission import Admission, QueueFullError


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
