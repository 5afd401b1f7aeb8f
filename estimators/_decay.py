"""Exponential forgetting shared by the time-decayed estimators."""

from __future__ import annotations

import math


def decay_factor(elapsed_s: float, half_life_s: float) -> float:
    """Weight left after ``elapsed_s`` seconds: 2 ** (-elapsed / half_life); 1 for an infinite half-life."""
    if math.isinf(half_life_s) or elapsed_s <= 0.0:
        return 1.0
    return math.exp(-math.log(2.0) * elapsed_s / half_life_s)


def check_half_life(name: str, value: float) -> float:
    """A half-life must be a positive number of seconds (inf: never forget)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value <= 0:
        raise ValueError(f"{name}: must be > 0 seconds (inf to never forget), got {value!r}")
    return float(value)


def check_time(now: float, last: float | None) -> float:
    """``now`` must be finite and not go backwards (any real number type but bool)."""
    if type(now) is not float and (isinstance(now, bool) or not isinstance(now, int | float)):
        raise ValueError(f"now: must be a finite time in seconds, got {now!r}")
    if not -math.inf < now < math.inf:
        raise ValueError(f"now: must be a finite time in seconds, got {now!r}")
    if last is not None and now < last:
        raise ValueError(f"now: time went backwards ({now!r} < {last!r})")
    return float(now)
