"""Random allocation problems with a chosen load regime, for tests and benchmarks."""

from __future__ import annotations

import numpy as np

from thinkcap.controller import Problem
from thinkcap.controller.queue import MG1, BatchingEngine, QueueModel

#: Load regimes: where the minimal-reasoning load rho(lo) sits, and how costly latency is.
REGIMES = ("light", "heavy", "margin", "overloaded")


def random_engine(rng: np.random.Generator, max_slots: int = 256, *, pausing: bool = False) -> BatchingEngine:
    """A batching engine with 2 to ``max_slots`` slots (log-uniform) and a step whose per-sequence
    part is 0 to 2 times its base; ``pausing``: with a prefill of 2-10 ms that pauses the batch
    (at most the smallest overhead :func:`random_problem` draws)."""
    slots = round(2.0 ** rng.uniform(1.0, np.log2(max_slots)))
    a, b = float(rng.uniform(0.005, 0.03)), float(rng.uniform(0.0, 2.0) * 0.01)
    return BatchingEngine(slots, a, b, prefill_s=float(rng.uniform(0.002, 0.01)) if pausing else 0.0)


def random_problem(
    seed: int, n: int, regime: str, *, variance: bool = True, rho_max: float = 0.9, queue: QueueModel | None = None
) -> Problem:
    """A random instance; ``regime`` places the load (``margin``: the margin constraint binds)."""
    rng = np.random.default_rng(seed)
    queue = MG1() if queue is None else queue
    prior = rng.dirichlet(np.full(n, 2.0))
    base = rng.uniform(0.0, 0.3, n)
    gain = rng.uniform(0.1, 0.7, n) * (1.0 - base)
    rate = 10.0 ** rng.uniform(-3.0, -1.5, n)
    t0 = rng.uniform(0.01, 0.3, n)
    c = 10.0 ** rng.uniform(-3.0, -2.0, n)
    lo = rng.integers(0, 50, n)
    hi = lo + rng.integers(50, 4000, n)
    v = rng.uniform(0.0, 0.05, n) if variance else np.zeros(n)
    gamma = {"light": 0.05, "heavy": 0.05, "margin": 2e-5, "overloaded": 0.05}[regime]
    p = Problem.from_arrays(
        prior=prior, base=base, gain=gain, rate=rate, t0=t0, c=c, v=v, lo=lo, hi=hi,
        arrival_rate=1.0, latency_penalty=gamma, rho_max=rho_max, queue=queue,
    )  # fmt: skip
    # Loads scale with lambda: at lambda = 1, rho = kappa m1 + rho0 with kappa the load factor.
    m1_lo, m1_hi = (queue.load_factor() * p.moments(x)[0] + queue.load_offset(1.0) for x in (p.lo, p.hi))
    if regime == "overloaded":
        return p.with_arrival_rate(rho_max * rng.uniform(1.05, 3.0) / m1_lo)
    if regime == "margin":
        # rho(hi) well above the margin, rho(lo) below it: the optimum sits on the margin.
        lam = rho_max * rng.uniform(1.5, 4.0) / m1_hi
        return p.with_arrival_rate(min(lam, rho_max * 0.7 / m1_lo))
    frac = rng.uniform(0.02, 0.3) if regime == "light" else rng.uniform(0.5, 0.98)
    return p.with_arrival_rate(frac * rho_max / m1_lo)
