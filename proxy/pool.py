"""The backend's replicas: least-loaded routing, passive ejection and re-admission.

A request goes to the healthy replica with the fewest requests in service relative to its
slots; ties rotate. A replica is ejected after ``eject_after`` consecutive failures (refused
connection, an answer cut off, a 5xx, or no byte before the read timeout); a client that goes
away says nothing of the replica. The health watch (``proxy.app``) probes an ejected replica
with a small shaped request and takes it back once that is answered; after repeated
ejections without a success between them it waits longer before each probe (doubling from
``probe_interval_s`` up to :data:`MAX_PROBE_BACKOFF_S`). While every replica is ejected, all
of them are tried (an ejection may be wrong; a refused connection is a quick, clear 502).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from thinkcap.proxy.serve_file import ReplicaSettings
from thinkcap.proxy.transport.client import Upstream

#: Longest wait between two probes of a replica ejected again and again, seconds.
MAX_PROBE_BACKOFF_S = 60.0


class Occupancy:
    """How many requests are in service upstream, over time, and when a prefill may be running.

    ``area`` is the integral of the number in service since the start, so a request's
    time-averaged number in service is the change of ``area`` over its own service time.
    A streamed request is in its prefill from :meth:`start` to :meth:`first_token`; a
    whole one is taken to be in its prefill for ``prefill_s`` after it starts (no token
    shows when it ends; the control loop keeps it at its longest prefill, through
    :meth:`thinkcap.proxy.pool.Pool.set_prefill_guess`). ``quiet_since`` is when the last
    known prefill ended or a request last left: a token gap that began before it may hold
    another request's prompt, or steps at two occupancies read as one of them (a server that
    sends 16 tokens per event: each level below the full batch read 1-10 % slow on the
    simulated engine), and is no step sample.
    """

    __slots__ = (
        "_last",
        "_weights",
        "area",
        "in_service",
        "prefill_s",
        "prefilling",
        "quiet_since",
        "seq_steps",
        "started",
        "steps",
    )

    def __init__(self, prefill_s: float = 0.0) -> None:
        self.prefill_s = prefill_s
        self.in_service = 0
        self.started = 0  # requests sent upstream so far: each one's prompt holds up the batch
        self.prefilling = 0
        self.area = 0.0
        self.steps = 0.0  # the engine's steps so far, read from the time at each occupancy (see set_step)
        self.seq_steps = 0.0  # the same, each step counted once per sequence in it
        self._weights: tuple[float, ...] = ()  # tau(1) / tau(n), n = 1..: empty, every second a step
        self.quiet_since = float("-inf")
        self._last = 0.0

    def set_step(self, taus: Sequence[float]) -> None:
        """The engine's step at 1, 2, ... sequences (the last one for more), as the queue model
        reads it: ``steps`` and ``seq_steps`` then count the steps the time at each occupancy
        held, so ``d seq_steps / d steps`` over a request's service is the mean number in
        service over its steps, not over its seconds. A whole answer's time is its tokens
        times the mean step over its steps; the time average weighs the slow steps of a full
        batch more, and read the step's intercept 41 % low on the simulated engine with the
        others' prefills counted (4 % low over its steps)."""
        if taus and all(math.isfinite(t) and t > 0 for t in taus):
            self._weights = tuple(taus[0] / t for t in taus)

    def _advance(self, now: float) -> None:
        if now > self._last:
            dt = now - self._last
            n = self.in_service
            self.area += n * dt
            if n:
                w = self._weights
                x = dt * w[min(n, len(w)) - 1] if w else dt
                self.steps += x
                self.seq_steps += n * x
            self._last = now

    def start(self, now: float, *, streamed: bool) -> float:
        """A request is sent upstream at ``now``; returns ``area`` then (its starting mark)."""
        self._advance(now)
        self.in_service += 1
        self.started += 1
        if streamed:
            self.prefilling += 1
        else:
            self.quiet_since = max(self.quiet_since, now + self.prefill_s)
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
        """Whether no prefill ran and no request left between ``since`` and now."""
        return self.prefilling == 0 and self.quiet_since <= since


class Replica:
    """One backend replica as the proxy sees it."""

    def __init__(self, index: int, settings: ReplicaSettings) -> None:
        self.index = index
        self.url = settings.base
        self.slots = settings.slots
        self.occupancy = Occupancy()  # its requests in service, for routing and the step fit
        self.upstream: Upstream | None = None  # the shaped routes' client (open while the app runs)
        self.healthy = True
        self.failures = 0  # consecutive
        self.ejections = 0
        self.ejected_at: float | None = None
        self.probed_at: float | None = None  # its last failed probe while ejected
        self.strikes = 0  # ejections since its last answered request
        self.last_error: str | None = None
        self.sent = 0
        #: The engine's own gauges, ``{"running": n, "waiting": n}``, and when they were read
        #: (``[backend] engine_gauges_s``; ``None`` until read).
        self.engine: dict[str, float] | None = None
        self.engine_at: float | None = None

    @property
    def in_service(self) -> int:
        """Its requests sent and not yet answered in full."""
        return self.occupancy.in_service

    def lean(self) -> Upstream:
        """The keep-alive client of the shaped routes."""
        if self.upstream is None:
            raise RuntimeError("the upstream pool is not open")
        return self.upstream

    def record(self, now: float) -> dict[str, Any]:
        """What ``/admin/state`` and ``/readyz`` show of it."""
        return {
            "url": self.url,
            "slots": self.slots,
            "healthy": self.healthy,
            "in_service": self.in_service,
            "sent": self.sent,
            "consecutive_failures": self.failures,
            "ejections": self.ejections,
            "ejected_for_s": None if self.ejected_at is None else now - self.ejected_at,
            "last_error": self.last_error,
            "engine": self.engine,
        }


class Pool:
    """The replicas, with routing and health. ``on_change(replica)`` hears of every ejection
    and re-admission."""

    def __init__(self, replicas: Sequence[ReplicaSettings], eject_after: int) -> None:
        if not replicas or eject_after < 1:
            raise ValueError("a pool needs >= 1 replica and eject_after >= 1")
        self.replicas = [Replica(i, r) for i, r in enumerate(replicas)]
        self.eject_after = eject_after
        self.on_change: list[Callable[[Replica], None]] = []
        self._turn = 0
        self._taus: tuple[float, ...] = ()  # the step last handed to the replicas (see set_step)

    def __len__(self) -> int:
        return len(self.replicas)

    @property
    def in_service(self) -> int:
        """Requests in service on every replica."""
        return sum(r.in_service for r in self.replicas)

    @property
    def prefilling(self) -> int:
        """Streamed requests sent that have no token yet, on every replica."""
        return sum(r.occupancy.prefilling for r in self.replicas)

    def set_step(self, taus: Sequence[float]) -> None:
        """The engine's step at 1, 2, ... sequences, on every replica (see :meth:`Occupancy.set_step`);
        read up to the largest replica's slots, and only when it changed (each decision hands it over)."""
        head = tuple(float(t) for t in taus[: max(r.slots for r in self.replicas)])
        if head != self._taus:
            self._taus = head
            for r in self.replicas:
                r.occupancy.set_step(head)

    def set_prefill_guess(self, seconds: float) -> None:
        """How long a whole request's prefill is taken to last, on every replica (see
        :class:`Occupancy`)."""
        for r in self.replicas:
            r.occupancy.prefill_s = seconds

    def healthy(self) -> list[Replica]:
        """The replicas in use: the healthy ones, or every one while none is."""
        up = [r for r in self.replicas if r.healthy]
        return up or self.replicas

    def healthy_slots(self) -> tuple[int, ...]:
        """The slots of the replicas in use, in order."""
        return tuple(r.slots for r in self.healthy())

    def pick(self, exclude: frozenset[int] = frozenset()) -> Replica | None:
        """The replica for the next request (``None`` once every one in use is in ``exclude``)."""
        replicas = self.replicas
        if len(replicas) == 1:
            return None if 0 in exclude else replicas[0]
        candidates = [r for r in self.healthy() if r.index not in exclude]
        if not candidates:
            return None
        low = min(r.in_service / r.slots for r in candidates)
        n = len(replicas)
        turn = self._turn
        best = min(
            (r for r in candidates if r.in_service / r.slots == low), key=lambda r: (r.index - turn) % n
        )  # fmt: skip
        self._turn = (best.index + 1) % n
        return best

    def route(self) -> Replica:
        """The replica for the next request, every one in use being a candidate."""
        replica = self.pick()
        assert replica is not None  # healthy() is never empty
        return replica

    def succeeded(self, replica: Replica) -> None:
        """A request on ``replica`` was answered."""
        replica.failures = 0
        replica.strikes = 0

    def probe_due(self, replica: Replica, now: float, interval_s: float) -> bool:
        """Whether an ejected replica is due for a probe: ``interval_s`` after its ejection,
        doubled for each ejection since its last answered request (at most
        :data:`MAX_PROBE_BACKOFF_S`)."""
        if replica.healthy or replica.ejected_at is None:
            return False
        since = max(replica.ejected_at, replica.probed_at or replica.ejected_at)
        wait = min(interval_s * 2.0 ** max(replica.strikes - 1, 0), max(MAX_PROBE_BACKOFF_S, interval_s))
        return now - since >= wait

    def failed(self, replica: Replica, why: str, now: float) -> bool:
        """A request on ``replica`` failed; returns whether that ejected it."""
        replica.failures += 1
        replica.last_error = why
        if not replica.healthy or replica.failures < self.eject_after:
            return False
        replica.healthy = False
        replica.ejected_at = now
        replica.probed_at = None
        replica.ejections += 1
        replica.strikes += 1
        for listener in self.on_change:
            listener(replica)
        return True

    def readmit(self, replica: Replica) -> None:
        """A probe of an ejected replica succeeded: take it back."""
        if replica.healthy:
            return
        replica.healthy = True
        replica.failures = 0
        replica.ejected_at = None
        for listener in self.on_change:
            listener(replica)
