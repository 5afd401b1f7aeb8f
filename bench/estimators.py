"""Estimator benchmark: the cost of one update and of one snapshot.

Run: .venv/bin/python bench/estimators.py

Each figure is the median over 7 repeats of the mean time per call over a batch of calls
on a realistic stream (Poisson arrivals at 5/s, 16 types, tokens in the hundreds).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinkcap.estimators import AccuracyCurve, ArrivalRate, Estimators, ServiceModel, ServiceRLS, TypeMix

TYPES = [f"type{k:02d}" for k in range(16)]
BATCH = 20_000


def per_call(make: Callable[[], Callable[[int], None]], batch: int = BATCH, repeats: int = 7) -> float:
    """Median over repeats of the mean seconds per call (a fresh estimator per repeat)."""
    out = []
    for _ in range(repeats):
        call = make()
        start = time.perf_counter()
        for i in range(batch):
            call(i)
        out.append((time.perf_counter() - start) / batch)
    return statistics.median(out)


def main() -> None:
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.exponential(0.2, BATCH)).tolist()
    names = [TYPES[k] for k in rng.integers(0, 16, BATCH)]
    prompt = rng.integers(20, 1500, BATCH).astype(float).tolist()
    out = rng.integers(5, 2000, BATCH).astype(float).tolist()
    service = [0.2 + 0.013 * o + 0.006 * p for o, p in zip(out, prompt, strict=True)]
    correct = (rng.random(BATCH) < 0.6).tolist()
    defaults = {n: (1 / 16, 0.2, 0.013, 0.0) for n in TYPES}

    def arrival() -> Callable[[int], None]:
        est = ArrivalRate()
        return lambda i: est.update(now=times[i])

    def mix() -> Callable[[int], None]:
        est = TypeMix(TYPES)
        return lambda i: est.update(names[i], now=times[i])

    def rls() -> Callable[[int], None]:
        est = ServiceRLS()
        return lambda i: est.update(
            completion_tokens=out[i], prompt_tokens=prompt[i], service_time=service[i], now=times[i]
        )

    def model() -> Callable[[int], None]:
        est = ServiceModel({n: d[1:] for n, d in defaults.items()})
        return lambda i: est.update(
            names[i], prompt_tokens=prompt[i], completion_tokens=out[i], service_time=service[i], now=times[i]
        )

    def accuracy() -> Callable[[int], None]:
        est = AccuracyCurve(0.1, 0.6, 0.002)
        return lambda i: est.update(out[i], correct[i], now=times[i])

    def snapshot() -> Callable[[int], None]:
        est = Estimators(defaults)
        for i in range(2000):
            est.arrived(names[i], now=times[i])
            est.served(names[i], prompt_tokens=prompt[i], completion_tokens=out[i], service_time=service[i],
                       now=times[i])  # fmt: skip
        return lambda i: est.snapshot(now=times[1999] + i * 1e-3)

    def accuracy_fit() -> Callable[[int], None]:
        est = AccuracyCurve(0.1, 0.6, 0.002)
        for i in range(2000):
            est.update(out[i], correct[i], now=times[i])

        def call(i: int) -> None:
            est.update(out[i], correct[i], now=times[-1] + i)
            est.get()

        return call

    rows = [
        ("ArrivalRate.update", per_call(arrival), "<= 3 µs"),
        ("TypeMix.update (16 types)", per_call(mix), "<= 3 µs"),
        ("ServiceRLS.update", per_call(rls), "<= 20 µs"),
        ("ServiceModel.update (16 types)", per_call(model), "<= 20 µs"),
        ("AccuracyCurve.update", per_call(accuracy), ""),
        ("Estimators.snapshot (16 types)", per_call(snapshot, batch=2000), "<= 100 µs"),
        ("AccuracyCurve.update + refit", per_call(accuracy_fit, batch=20, repeats=3), "(off the request path)"),
    ]
    print("| operation | median time per call | goal |")
    print("|---|---|---|")
    for name, seconds, goal in rows:
        print(f"| {name} | {seconds * 1e6:.2f} µs | {goal} |")


if __name__ == "__main__":
    main()
