"""A continuous-batching engine simulated step by step (the ground truth of the batching model).

The engine holds up to ``slots`` sequences. Each engine step gives every sequence in service
one token and takes ``tau(j) = a + b j`` seconds with j sequences. A request waits in FIFO
order for a slot; when it gets one, the engine first evaluates its prompt (``prefill_s``
seconds, during which the other sequences wait, as a prompt batch does in llama.cpp) and the
request then joins the next step. It leaves after its last token. Arrivals join at the next
step boundary.

Event-driven: between two events (a completion, or an arrival while a slot is free) the
occupancy is constant, so the steps in between are taken at once. A global step counter
and a heap of each sequence's last step make every event O(log slots).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.stats import t as student

Array = NDArray[np.float64]


@dataclass(frozen=True)
class EngineRun:
    """Per-request times of one simulated run, seconds, and the time-averaged occupancy."""

    wait: Array
    system: Array
    occupancy: float

    def mean_system_time(self) -> float:
        """Mean time in system."""
        return float(self.system.mean()) if self.system.size else 0.0


def run_engine(
    arrival: Array,
    steps: NDArray[np.int64] | Array,
    prefill_s: Array | None,
    *,
    slots: int,
    step_base_s: float,
    step_per_seq_s: float,
    on_start: Callable[[int, float], int] | None = None,
    on_done: Callable[[int, float], None] | None = None,
) -> EngineRun:
    """Serve requests arriving at ``arrival`` (sorted) that need ``steps`` decode tokens each.

    ``wait`` is the time from arrival until the request gets a slot; ``system`` until its
    last token. ``occupancy`` is the engine's time-averaged number of sequences in service
    (prefill included) from the first arrival to the last departure.

    ``on_start(i, t)``, when given, decides request ``i``'s steps when it gets its slot at
    time ``t`` (a policy whose caps change while the engine runs; ``steps`` is then ignored),
    and ``on_done(i, t)`` hears of each last token. Both are called in time order.
    """
    n = int(arrival.size)
    steps_i = np.asarray(steps, dtype=np.int64)
    pre = np.zeros(n) if prefill_s is None else np.asarray(prefill_s, dtype=float)
    if steps_i.shape != (n,) or pre.shape != (n,):
        raise ValueError("arrival, steps and prefill_s must have the same length")
    if n and (np.any(steps_i < 0) or np.any(pre < 0) or np.any(np.diff(arrival) < 0)):
        raise ValueError("steps and prefill_s must be >= 0 and arrivals sorted")
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots: must be an integer >= 1, got {slots!r}")
    a, b = float(step_base_s), float(step_per_seq_s)
    arr = arrival.tolist()
    need = steps_i.tolist()
    pref = pre.tolist()
    start = [0.0] * n
    done = [0.0] * n
    heap: list[tuple[int, int]] = []  # (global step of the sequence's last token, request)
    counter = 0  # engine steps taken so far
    t = arr[0] if n else 0.0
    head = 0  # FIFO in arrival order: requests before head have a slot or are done
    area = 0.0  # integral of the occupancy over time
    while head < n or heap:
        # Admit the waiting requests (arrived by t) into free slots; each prefill pauses the engine.
        while head < n and len(heap) < slots and arr[head] <= t:
            i = head
            head += 1
            start[i] = t
            if on_start is not None:
                need[i] = on_start(i, t)
            if pref[i] > 0.0:
                area += (len(heap) + 1) * pref[i]
                t += pref[i]
            if need[i] == 0:
                done[i] = t
                if on_done is not None:
                    on_done(i, t)
            else:
                heapq.heappush(heap, (counter + need[i], i))
        j = len(heap)
        if j == 0:  # idle: jump to the next arrival
            if head == n:
                break
            t = max(t, arr[head])
            continue
        tau = a + b * j
        k = heap[0][0] - counter  # steps until the next completion
        if j < slots and head < n:
            # A free slot: the next arrival joins at the first step boundary at or after it.
            k = min(k, max(1, math.ceil((arr[head] - t) / tau)))
        counter += k
        t += k * tau
        area += j * k * tau
        while heap and heap[0][0] <= counter:
            _, i = heapq.heappop(heap)
            done[i] = t
            if on_done is not None:
                on_done(i, t)
    arrival_f = np.asarray(arrival, dtype=float)
    start_a, done_a = np.asarray(start), np.asarray(done)
    span = float(done_a.max() - arrival_f[0]) if n else 0.0
    return EngineRun(start_a - arrival_f, done_a - arrival_f, area / span if span > 0 else 0.0)


def batch_means(values: Array, batches: int = 20, warmup: float = 0.1) -> tuple[float, float]:
    """Mean of ``values`` after dropping the first ``warmup`` share, and the half-width of its
    95 % batch-means interval (``batches`` consecutive batches, Student's t)."""
    kept = values[int(warmup * values.size) :]
    usable = kept[: kept.size - kept.size % batches]
    means = usable.reshape(batches, -1).mean(axis=1)
    half = float(student.ppf(0.975, batches - 1) * means.std(ddof=1) / math.sqrt(batches))
    return float(means.mean()), half


class _Replica:
    """One engine of a pool: its clock at its last step boundary, step counter and sequences."""

    __slots__ = ("area", "counter", "heap", "slots", "t")

    def __init__(self, slots: int, t: float) -> None:
        self.slots = slots
        self.t = t
        self.counter = 0
        self.heap: list[tuple[int, int]] = []
        self.area = 0.0

    def advance(self, k: int, tau: float) -> None:
        self.counter += k
        self.t += k * tau
        self.area += len(self.heap) * k * tau


def run_pool(
    arrival: Array,
    steps: NDArray[np.int64] | Array,
    *,
    pool: tuple[int, ...],
    step_base_s: float,
    step_per_seq_s: float,
    prefill_s: Array | None = None,
) -> EngineRun:
    """Serve requests on a pool of engines (``pool``: each replica's slots, each with step time
    ``a + b j``) behind one FIFO queue and a least-loaded router, as the proxy routes: a request
    goes to the replica with the fewest in service relative to its slots (ties rotate) and joins
    it at that replica's next step boundary; a queued request takes the first slot that frees.
    The replicas step independently. A request's prefill (``prefill_s``, seconds; none when
    not given) pauses its replica when it joins, as in :func:`run_engine`. ``occupancy`` is
    the pool's time-averaged number in service (prefill included).
    """
    n = int(arrival.size)
    need = np.asarray(steps, dtype=np.int64).tolist()
    pref = [0.0] * n if prefill_s is None else np.asarray(prefill_s, dtype=float).tolist()
    if len(need) != n or (n and (min(need) < 1 or np.any(np.diff(arrival) < 0))):
        raise ValueError("steps must be >= 1, one per arrival, and arrivals sorted")
    if len(pref) != n or (n and min(pref) < 0):
        raise ValueError("prefill_s must be >= 0, one per arrival")
    if not pool or min(pool) < 1:
        raise ValueError(f"pool: every replica needs >= 1 slot, got {pool!r}")
    a, b = float(step_base_s), float(step_per_seq_s)
    arr = arrival.tolist()
    start = [0.0] * n
    done = [0.0] * n
    t0 = arr[0] if n else 0.0
    reps = [_Replica(c, t0) for c in pool]
    waiting: list[int] = []  # FIFO of requests that found every slot taken
    w_head = 0
    head = 0
    turn = 0  # where the tie-break rotation starts

    def join(r: _Replica, i: int, now: float) -> None:
        if r.heap:  # the next step boundary at or after now
            tau = a + b * len(r.heap)
            r.advance(max(0, math.ceil((now - r.t) / tau - 1e-12)), tau)
        else:
            r.t = max(r.t, now)
        start[i] = r.t
        if pref[i] > 0.0:
            r.area += (len(r.heap) + 1) * pref[i]
            r.t += pref[i]
        heapq.heappush(r.heap, (r.counter + need[i], i))

    while head < n or any(r.heap for r in reps):
        nxt, nxt_t = None, math.inf
        for r in reps:
            if r.heap:
                when = r.t + (r.heap[0][0] - r.counter) * (a + b * len(r.heap))
                if when < nxt_t:
                    nxt, nxt_t = r, when
        if head < n and arr[head] <= nxt_t:
            i, now = head, arr[head]
            head += 1
            free = [k for k, r in enumerate(reps) if len(r.heap) < r.slots]
            if w_head < len(waiting) or not free:
                waiting.append(i)
                continue
            low = min(len(reps[k].heap) / reps[k].slots for k in free)
            ties = [k for k in free if len(reps[k].heap) / reps[k].slots == low]
            pick = min(ties, key=lambda k: (k - turn) % len(reps))
            turn = (pick + 1) % len(reps)
            join(reps[pick], i, now)
            continue
        assert nxt is not None
        tau = a + b * len(nxt.heap)
        nxt.advance(nxt.heap[0][0] - nxt.counter, tau)
        while nxt.heap and nxt.heap[0][0] <= nxt.counter:
            _, i = heapq.heappop(nxt.heap)
            done[i] = nxt.t
        while w_head < len(waiting) and len(nxt.heap) < nxt.slots:
            join(nxt, waiting[w_head], nxt.t)
            w_head += 1
    arrival_f = np.asarray(arrival, dtype=float)
    start_a, done_a = np.asarray(start), np.asarray(done)
    span = float(done_a.max() - arrival_f[0]) if n else 0.0
    area = sum(r.area for r in reps)
    return EngineRun(start_a - arrival_f, done_a - arrival_f, area / span if span > 0 else 0.0)
