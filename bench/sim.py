"""Simulator benchmark: how fast the discrete-event M/G/1 simulator runs.

Run: .venv/bin/python bench/sim.py

Times one million requests end to end (sampling the workload, then simulating one cap
policy on it) and the simulation of a further policy on the same workload; median of 5.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.des import Phase, sample_workload, simulate
from sim.instances import random_problem

REQUESTS = 1_000_000


def main() -> None:
    p = random_problem(1, 8, "heavy")
    caps = p.lo + 0.3 * (p.hi - p.lo)
    lam = 0.8 / p.moments(caps)[0]
    factors = (0.5, 1.0, 1.2, 0.5)
    phases = [Phase(REQUESTS / (lam * sum(factors)), lam * f) for f in factors]
    full, again = [], []
    for seed in range(5):
        start = time.perf_counter()
        work = sample_workload(phases, p.prior, np.random.default_rng(seed))
        simulate(p, caps, work)
        full.append(time.perf_counter() - start)
        start = time.perf_counter()
        simulate(p, caps * 0.5, work)
        again.append(time.perf_counter() - start)
    print("| operation | requests | median time | requests per second |")
    print("|---|---|---|---|")
    n = work.size
    for name, ts in (
        ("sample workload + simulate one policy", full),
        ("simulate another policy, same workload", again),
    ):
        med = statistics.median(ts)
        print(f"| {name} | {n:,} | {med:.3f} s | {n / med / 1e6:.1f} M/s |")


if __name__ == "__main__":
    main()
