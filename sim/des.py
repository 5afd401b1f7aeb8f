"""A discrete-event FIFO queue driven by the typed service model: the paper's single server
(M/G/1), or a continuous-batching engine simulated step by step (:mod:`sim.engine`) when the
problem's queue model is one.

The single server's waits follow Lindley's recursion ``W_{n+1} = max(0, W_n + S_n - A_{n+1})``, evaluated
without a Python loop: with ``X_n = sum_{k<n} (S_k - A_{k+1})`` (X_0 = 0) it is
``W_n = X_n - min_{k<=n} X_k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from thinkcap.controller import Problem
from thinkcap.controller.queue import BatchingEngine
from thinkcap.sim.engine import run_engine

Array = NDArray[np.float64]


@dataclass(frozen=True)
class Phase:
    """A stretch of constant arrival rate."""

    duration_s: float
    arrival_rate: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"duration_s: must be a finite number > 0, got {self.duration_s!r}")
        if not (np.isfinite(self.arrival_rate) and self.arrival_rate >= 0):
            raise ValueError(f"arrival_rate: must be a finite number >= 0, got {self.arrival_rate!r}")


@dataclass(frozen=True)
class Workload:
    """One sampled sequence of requests: arrival times, true types and the random numbers
    that decide service noise and correctness, shared by every policy evaluated on it."""

    arrival: Array
    phase: NDArray[np.int64]
    type: NDArray[np.int64]
    noise: Array
    uniform: Array

    @property
    def size(self) -> int:
        """Number of requests."""
        return int(self.arrival.size)


def sample_workload(phases: Sequence[Phase], prior: Array, rng: np.random.Generator) -> Workload:
    """Poisson arrivals with a piecewise-constant rate and i.i.d. types drawn from ``prior``."""
    times, tags = [], []
    start = 0.0
    for k, ph in enumerate(phases):
        n = int(rng.poisson(ph.arrival_rate * ph.duration_s))
        times.append(start + np.sort(rng.uniform(0.0, ph.duration_s, n)))
        tags.append(np.full(n, k, dtype=np.int64))
        start += ph.duration_s
    arrival = np.concatenate(times) if times else np.zeros(0)
    n = arrival.size
    prior = np.asarray(prior, dtype=float)
    types = np.searchsorted(np.cumsum(prior / prior.sum()), rng.random(n), side="right").astype(np.int64)
    types = np.minimum(types, prior.size - 1)
    return Workload(arrival, np.concatenate(tags) if tags else np.zeros(0, np.int64), types,
                    rng.standard_normal(n), rng.random(n))  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    """Per-request results of one policy on one workload."""

    wait: Array
    service: Array
    system: Array
    correct: NDArray[np.bool_]
    tokens: Array

    def mean_system_time(self) -> float:
        """Mean time in system, seconds."""
        return float(self.system.mean()) if self.system.size else 0.0


def simulate(problem: Problem, caps: Array | NDArray[np.int64], work: Workload) -> Outcome:
    """Serve ``work`` FIFO with per-type reasoning caps ``caps`` (the true model in ``problem``).

    Service time is ``t0 + c * cap + sqrt(v) * Z`` (``Z`` from the workload, truncated at 0)
    and an answer is correct with probability ``p_k(cap)``, decided by the workload's
    uniform numbers, so policies compared on one workload share their luck.

    ``caps`` may also be a 2-D array (one row of caps per phase).
    """
    table: Array = np.asarray(caps, dtype=float)
    tokens: Array = table[work.phase, work.type] if table.ndim == 2 else table[work.type]
    return serve(problem, tokens, work)


def serve(problem: Problem, tokens: Array, work: Workload) -> Outcome:
    """Serve ``work`` FIFO where request ``i`` reasons for ``tokens[i]`` tokens (any policy,
    e.g. caps that change while the queue runs).

    On a batching engine a request's service time alone is its work in engine steps at one
    sequence, ``round(service / tau(1))``, the unit of the queue model; ``service`` in the
    outcome is then the time from getting a slot to the last token.
    """
    k = work.type
    service = np.maximum(0.0, problem.t0[k] + problem.c[k] * tokens + np.sqrt(problem.v[k]) * work.noise)
    p = problem.base[k] + problem.gain[k] * -np.expm1(-problem.rate[k] * tokens)
    engine = problem.queue
    if isinstance(engine, BatchingEngine):
        steps = np.rint(service / engine.step_time(1.0)).astype(np.int64)
        run = run_engine(work.arrival, steps, None, slots=engine.slots, step_base_s=engine.step_base_s,
                         step_per_seq_s=engine.step_per_seq_s)  # fmt: skip
        return Outcome(run.wait, run.system - run.wait, run.system, work.uniform < p, tokens)
    wait = lindley(work.arrival, service)
    return Outcome(wait, service, wait + service, work.uniform < p, tokens)


def lindley(arrival: Array, service: Array) -> Array:
    """FIFO waiting times for arrival times (sorted) and service times, by Lindley's recursion."""
    n = arrival.size
    if n == 0:
        return np.zeros(0)
    steps = service[:-1] - np.diff(arrival)
    x = np.concatenate([[0.0], np.cumsum(steps)])
    return x - np.minimum.accumulate(x)
