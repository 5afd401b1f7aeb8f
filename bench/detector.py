"""Change-detector benchmark: detection delay and false alarms of ArrivalRate's detector.

Run: .venv/bin/python bench/detector.py

Seeded Poisson streams, the detector's default settings, the fall test
(``ArrivalRate.check``) run once a second as the control loop's snapshots run it:
- a rise 2/s -> 6/s and a fall 6/s -> 2/s after a 10-minute stationary lead-in
  (400 and 100 runs): share flagged within 5 s (rise) and 10 s (fall);
- ``thinkcap demo``'s end of overload, 36/s -> 1.5/s after a ramp 1.5 -> 9 -> 36/s (20 s each,
  the demo's estimator settings; 100 runs): share flagged within 2 s;
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


def flags(est: ArrivalRate, arrivals: list[float], end: float) -> list[float]:
    """Feed ``arrivals`` to ``est``, with the fall test at every whole second up to ``end``;
    the times of the changes flagged."""
    out: list[float] = []
    tick = 1.0
    for t in [*arrivals, end]:
        while tick <= t:
            if est.check(tick):
                out.append(tick)
            tick += 1.0
        if t < end:
            before = est.changes
            est.update(now=t)
            if est.changes > before:
                out.append(t)
    return out


def delay(seed: int, phases: list[Phase], est: ArrivalRate | None = None) -> float:
    """Seconds from the last phase's start to the first flag after it (inf: none in that phase)."""
    work = sample_workload(phases, ONE_TYPE, np.random.default_rng(seed))
    step = sum(p.duration_s for p in phases[:-1])
    after = [t for t in flags(est or ArrivalRate(), work.arrival.tolist(), step + phases[-1].duration_s) if t > step]
    return after[0] - step if after else math.inf


def false_alarms(seed: int, rate: float) -> int:
    work = sample_workload([Phase(600.0, rate)], ONE_TYPE, np.random.default_rng(10_000 + seed))
    return len(flags(ArrivalRate(), work.arrival.tolist(), 600.0))


def main() -> None:
    rise = np.array([delay(s, [Phase(LEAD_IN_S, 2.0), Phase(20.0, 6.0)]) for s in range(400)])
    fall = np.array([delay(s, [Phase(LEAD_IN_S, 6.0), Phase(20.0, 2.0)]) for s in range(100)])
    demo = [Phase(20.0, 1.5), Phase(20.0, 9.0), Phase(20.0, 36.0), Phase(20.0, 1.5)]
    demo_settings = {"half_life_s": 4.0, "reference_half_life_s": 60.0}  # thinkcap demo's [estimators]
    end = np.array([delay(s, demo, ArrivalRate(**demo_settings)) for s in range(100)])
    print("| scenario | runs | result |")
    print("|---|---|---|")
    print(f"| 2/s -> 6/s flagged within 5 s | {rise.size} | {np.mean(rise <= 5):.1%}"
          f" (median {np.median(rise):.2f} s, 95th percentile {np.quantile(rise, 0.95):.2f} s) |")  # fmt: skip
    print(f"| 6/s -> 2/s flagged within 10 s | {fall.size} | {np.mean(fall <= 10):.1%} |")
    print(f"| demo: 36/s -> 1.5/s after a ramp flagged within 2 s | {end.size} | {np.mean(end <= 2):.1%}"
          f" (median {np.median(end):.2f} s) |")  # fmt: skip
    for rate in (0.5, 1.0, 2.0, 6.0, 20.0):
        fa = np.mean([false_alarms(s, rate) for s in range(60)])
        print(f"| stationary {rate:g}/s for 10 minutes: false alarms per run | 60 | {fa:.2f} |")


if __name__ == "__main__":
    main()
