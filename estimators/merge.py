"""Estimates of several proxies that each see part of one stream, merged into one.

Replicas behind a load balancer see disjoint shares of the arrivals: the total rate is the
sum of their rates (a sum of independent Poisson streams is Poisson), and a type's share of
the whole is its share on each replica weighted by that replica's rate. Service parameters
measure the same backend from every replica, so they are averaged weighted by the samples
behind them; means with no sample count (answer lengths, used shares, prompt lengths) are
weighted by arrival rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from thinkcap.estimators.snapshot import Snapshot, TypeEstimate
from thinkcap.estimators.step import StepEstimate


def merge_snapshots(snaps: Sequence[Snapshot], time: float) -> Snapshot:
    """One snapshot of the whole stream from each replica's (all with the same types, in order).

    >>> t = (TypeEstimate("a", 0.5, 0.1, 0.01, 0.0, 0, False), TypeEstimate("b", 0.5, 0.1, 0.01, 0.0, 0, False))
    >>> one = Snapshot(0.0, 2.0, 0.2, 20.0, 0, None, t)
    >>> both = merge_snapshots([one, one], 1.0)
    >>> both.arrival_rate, both.arrivals, [x.prior for x in both.types]
    (4.0, 40.0, [0.5, 0.5])
    """
    if not snaps:
        raise ValueError("merge_snapshots: at least one snapshot is required")
    names = [t.name for t in snaps[0].types]
    for s in snaps[1:]:
        if [t.name for t in s.types] != names:
            raise ValueError(f"merge_snapshots: the replicas' types differ: {names} and {[t.name for t in s.types]}")
    rates = [max(s.arrival_rate, 0.0) for s in snaps]
    total = sum(rates)
    weights = rates if total > 0 else [1.0] * len(snaps)
    types = []
    for k, name in enumerate(names):
        per = [s.types[k] for s in snaps]
        prior = sum(w * t.prior for w, t in zip(weights, per, strict=True)) / sum(weights)
        samples = sum(t.samples for t in per)
        fitted = [t for t in per if t.fitted]
        pool = fitted or [t for t in per if t.samples > 0] or per
        w = [max(t.samples, 1) for t in pool]
        types.append(
            TypeEstimate(
                name=name,
                prior=prior,
                overhead_s=_mean([t.overhead_s for t in pool], w),
                per_token_s=_mean([t.per_token_s for t in pool], w),
                variance_s2=_mean([t.variance_s2 for t in pool], w),
                samples=samples,
                fitted=bool(fitted),
            )
        )
    changes = [s.last_change for s in snaps if s.last_change is not None]
    return Snapshot(
        time=time,
        arrival_rate=total,
        arrival_rate_stderr=math.sqrt(sum(s.arrival_rate_stderr**2 for s in snaps)),
        arrivals=sum(s.arrivals for s in snaps),
        changes=sum(s.changes for s in snaps),
        last_change=max(changes) if changes else None,
        types=tuple(types),
    )


def merge_steps(steps: Sequence[StepEstimate | None]) -> StepEstimate | None:
    """The step fits of several replicas of the proxy (of one engine, or of identical ones):
    the fitted ones averaged weighted by their requests, their standard errors shrunk as
    independent fits' are, and the measured levels as far as every one of them has them;
    ``None`` where none is given."""
    given = [s for s in steps if s is not None]
    if not given:
        return None
    pool = [s for s in given if s.fitted] or given
    w = [max(s.requests, 1) for s in pool]
    total = sum(w)
    shared = min(len(s.levels) for s in pool)
    return StepEstimate(
        base_s=_mean([s.base_s for s in pool], w),
        per_seq_s=_mean([s.per_seq_s for s in pool], w),
        prefill_base_s=_mean([s.prefill_base_s for s in pool], w),
        prefill_per_token_s=_mean([s.prefill_per_token_s for s in pool], w),
        base_stderr_s=math.sqrt(sum((wi / total * s.base_stderr_s) ** 2 for wi, s in zip(w, pool, strict=True))),
        per_seq_stderr_s=math.sqrt(sum((wi / total * s.per_seq_stderr_s) ** 2 for wi, s in zip(w, pool, strict=True))),
        requests=sum(s.requests for s in given),
        gaps=sum(s.gaps for s in given),
        fitted=any(s.fitted for s in given),
        levels=tuple(_mean([s.levels[k] for s in pool], w) for k in range(shared)),
        first_token_base_s=_mean([s.first_token_base_s for s in pool], w),
    )


def merge_means(means: Sequence[Mapping[str, float]], weights: Sequence[float]) -> dict[str, float]:
    """Per key, the mean over the replicas that have it, weighted by ``weights`` (equal weights
    where they are all zero).

    >>> merge_means([{"a": 1.0}, {"a": 3.0, "b": 2.0}], [1.0, 3.0])
    {'a': 2.5, 'b': 2.0}
    """
    if len(means) != len(weights):
        raise ValueError("merge_means: one weight per replica")
    keys: list[str] = []
    for m in means:
        keys += [k for k in m if k not in keys]
    out = {}
    for k in keys:
        vals = [(m[k], max(w, 0.0)) for m, w in zip(means, weights, strict=True) if k in m]
        ws = [w for _, w in vals]
        out[k] = _mean([v for v, _ in vals], ws if sum(ws) > 0 else [1.0] * len(vals))
    return out


def merge_curves(
    curves: Sequence[Mapping[str, tuple[float, float, float]]], samples: Sequence[Mapping[str, int]]
) -> dict[str, tuple[float, float, float]]:
    """Accuracy curves fitted from feedback on several replicas: per type, the parameters
    averaged weighted by the graded samples behind each."""
    if len(curves) != len(samples):
        raise ValueError("merge_curves: one sample count per replica")
    out: dict[str, tuple[float, float, float]] = {}
    names: list[str] = []
    for c in curves:
        names += [n for n in c if n not in names]
    for n in names:
        have = [(c[n], max(s.get(n, 0), 1)) for c, s in zip(curves, samples, strict=True) if n in c]
        w = [k for _, k in have]
        out[n] = (
            _mean([p[0] for p, _ in have], w),
            _mean([p[1] for p, _ in have], w),
            _mean([p[2] for p, _ in have], w),
        )
    return out


def _mean(values: Sequence[float], weights: Sequence[float]) -> float:
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)
