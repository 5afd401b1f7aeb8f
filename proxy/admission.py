"""FIFO admission: ``max_concurrency`` requests in flight, at most ``max_queue`` waiting."""

from __future__ import annotations

import asyncio
from collections import deque


class QueueFullError(Exception):
    """The admission queue is full; the request is answered 429."""


class Admission:
    """Slots handed out strictly in arrival order; a waiter that is cancelled leaves the queue."""

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.in_flight = 0
        self._queue: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._queue)

    async def enter(self) -> None:
        """Take a slot, waiting in line if needed; raises :class:`QueueFullError` when the line is full."""
        if self.in_flight < self.max_concurrency and not self._queue:
            self.in_flight += 1
            return
        if len(self._queue) >= self.max_queue:
            raise QueueFullError
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(ticket)
        try:
            await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                self.leave()  # the slot was handed over just as the waiter went away
            elif ticket in self._queue:
                self._queue.remove(ticket)
            raise

    def leave(self) -> None:
        """Give the slot to the next in line, or free it (and drop it, above a smaller limit)."""
        if self.in_flight <= self.max_concurrency:
            while self._queue:
                ticket = self._queue.popleft()
                if not ticket.done():
                    ticket.set_result(None)
                    return
        self.in_flight -= 1

    def resize(self, max_concurrency: int) -> None:
        """A new limit: more slots go to the waiters at once; fewer take effect as requests leave."""
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.max_concurrency = max_concurrency
        while self.in_flight < max_concurrency and self._queue:
            ticket = self._queue.popleft()
            if not ticket.done():
                self.in_flight += 1
                ticket.set_result(None)
