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


class Occupancy:
    """How many requests are in service upstream, over time, and when a prefill may be running.

    ``area`` is the integral of the number in service since the start, so a request's
    time-averaged number in service is the change of ``area`` over its own service time.
    A streamed request is in its prefill from :meth:`start` to :meth:`first_token`; a
    whole one is taken to be in its prefill for ``prefill_s`` after it starts (no token
    shows when it ends). ``quiet_since`` is when the last known prefill ended: a token gap
    that began before it may hold another request's prompt and is no step sample.
    """

    __slots__ = ("_last", "area", "in_service", "prefilling", "quiet_since")

    def __init__(self) -> None:
        self.in_service = 0
        self.prefilling = 0
        self.area = 0.0
        self.quiet_since = float("-inf")
        self._last = 0.0

    def _advance(self, now: float) -> None:
        if now > self._last:
            self.area += self.in_service * (now - self._last)
            self._last = now

    def start(self, now: float, *, streamed: bool, prefill_s: float = 0.0) -> float:
        """A request is sent upstream at ``now``; returns ``area`` then (its starting mark)."""
        self._advance(now)
        self.in_service += 1
        if streamed:
            self.prefilling += 1
        else:
            self.quiet_since = max(self.quiet_since, now + prefill_s)
        return self.area

    def first_token(self, now: float) -> None:
        """A streamed request's first token arrived: its prefill is over."""
        self.prefilling -= 1
        self.quiet_since = max(self.quiet_since, now)

    def stop(self, now: float, *, prefilling: bool = False) -> float:
        """A request left service at ``now`` (still ``prefilling``: it never sent a token); returns ``area``."""
        self._advance(now)
        self.in_service -= 1
        if prefilling:
            self.prefilling -= 1
            self.quiet_since = max(self.quiet_since, now)
        return self.area

    def clean(self, since: float) -> bool:
        """Whether no prefill ran between ``since`` and now."""
        return self.prefilling == 0 and self.quiet_since <= since
