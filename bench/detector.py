"""Change-detector benchmark: detection delay and false alarms of ArrivalRate's detector.

Run: .venv/bin/python bench/detector.py

Seeded Poisson streams, the detector's default settings:
- a rise 2/s -> 6/s and a fall 6/s -> 2/s after a 10-minute stationary lead-in
  (400 and 100 runs): share flagged within 5 s (rise) and 10 s (fall);
- stationary 10-minute streams at several rates (60 runs each): false alarms per run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinkcap.estimators import ArrivalRate
from thinkcap.sim.des import Phase, sample_workload

LEAD_IN_S = 600.0
ONE_TYPE = np.ones(1)


def delay(seed: int, before: float, after: float) -> float:
    """Seconds from the step to the first flag after it (inf: none within 20 s)."""
    phases = [Phase(LEAD_IN_S, before), Phase(20.0, after)]
    work = sample_workload(phases, ONE_TYPE, np.random.default_rng(seed))
    est = ArrivalRate()
    flagged = None
    for t in work.arrival.tolist():
        if flagged is None and t > LEAD_IN_S:
            flagged = est.changes
        est.update(now=t)
        if flagged is not None and est.changes > flagged:
            return t - LEAD_IN_S
    return math.inf


def false_alarms(seed: int, rate: float) -> int:
    est = ArrivalRate()
    for t in sample_workload([Phase(600.0, rate)], ONE_TYPE, np.random.default_rng(10_000 + seed)).arrival.tolist():
        est.update(now=t)
    return est.changes


def main() -> None:
    rise = np.array([delay(s, 2.0, 6.0) for s in range(400)])
    fall = np.array([delay(s, 6.0, 2.0) for s in range(100)])
    print("| scenario | runs | result |")
    print("|---|---|---|")
    print(f"| 2/s -> 6/s flagged within 5 s | {rise.size} | {np.mean(rise <= 5):.1%}"
          f" (median {np.median(rise):.2f} s, 95th percentile {np.quantile(rise, 0.95):.2f} s) |")  # fmt: skip
    print(f"| 6/s -> 2/s flagged within 10 s | {fall.size} | {np.mean(fall <= 10):.1%} |")
    for rate in (0.5, 1.0, 2.0, 6.0, 20.0):
        fa = np.mean([false_alarms(s, rate) for s in range(60)])
        print(f"| stationary {rate:g}/s for 10 minutes: false alarms per run | 60 | {fa:.2f} |")


if __name__ == "__main__":
    main()
