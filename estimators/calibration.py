"""Fits from a calibration run: accuracy curves from graded outcomes at fixed caps, and
service times from measured requests.

The accuracy curve p(l) = base + gain (1 - exp(-rate l)) is fitted by maximum likelihood on
binomial counts (k correct of n at cap l), in the parameters that keep it valid by
construction (``base + gain = sigmoid(u1)``, ``base = sigmoid(u1) sigmoid(u2)``,
``rate = exp(u3)``), from several starting rates; intervals come from a bootstrap over the
items (each resample draws items with replacement and keeps all of an item's outcomes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize
from scipy.special import expit

#: Starting rates of the likelihood search, as multiples of 1 / (the median cap).
START_RATES = (0.3, 1.0, 3.0, 10.0)
#: Outcome probabilities are clipped to [EPS, 1 - EPS] in the likelihood.
EPS = 1e-9


@dataclass(frozen=True)
class CurveFit:
    """A fitted accuracy curve with bootstrap percentile intervals (``lo``/``hi`` per parameter)."""

    base: float
    gain: float
    rate: float
    log_likelihood: float
    samples: int
    intervals: dict[str, tuple[float, float]]
    level: float
    draws: tuple[tuple[float, float, float], ...] = ()  # the bootstrap's (base, gain, rate)

    def accuracy(self, tokens: float) -> float:
        """p(tokens)."""
        return self.base + self.gain * -math.expm1(-self.rate * tokens)

    def band(self, tokens: Sequence[float] | NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """The central ``level`` range of the bootstrap curves at each of ``tokens`` (the curve
        itself at both ends without draws)."""
        x = np.asarray(tokens, dtype=float)
        if not self.draws:
            p = self.base + self.gain * -np.expm1(-self.rate * x)
            return p, p
        d = np.asarray(self.draws)
        curves = d[:, :1] + d[:, 1:2] * -np.expm1(-d[:, 2:3] * x[None, :])
        q = ((1 - self.level) / 2 * 100, (1 + self.level) / 2 * 100)
        lo, hi = np.percentile(curves, q, axis=0)
        return np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)


def _params(u: NDArray[np.float64]) -> tuple[float, float, float]:
    top, frac = float(expit(u[0])), float(expit(u[1]))
    return top * frac, top - top * frac, math.exp(min(max(float(u[2]), -60.0), 30.0))


def _nll(u: NDArray[np.float64], caps: NDArray[np.float64], n: NDArray[np.float64], k: NDArray[np.float64]) -> float:
    base, gain, rate = _params(u)
    p = np.clip(base + gain * -np.expm1(-rate * caps), EPS, 1 - EPS)
    return float(-(k * np.log(p) + (n - k) * np.log1p(-p)).sum())


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def mle(caps: Sequence[float], n: Sequence[float], k: Sequence[float]) -> tuple[float, float, float, float]:
    """``(base, gain, rate, log-likelihood)`` maximising the binomial likelihood of ``k``
    correct of ``n`` at each cap.

    >>> caps = [8, 16, 32, 64, 128]
    >>> p = [0.1 + 0.8 * (1 - math.exp(-0.05 * c)) for c in caps]
    >>> b, g, r, _ = mle(caps, [1000] * 5, [1000 * x for x in p])
    >>> round(b, 2), round(g, 2), round(r, 3)
    (0.1, 0.8, 0.05)
    """
    x = np.asarray(caps, dtype=float)
    nn = np.asarray(n, dtype=float)
    kk = np.asarray(k, dtype=float)
    if x.size == 0 or x.size != nn.size or x.size != kk.size:
        raise ValueError("mle: caps, n and k need one entry per cap, at least one")
    if np.any(nn <= 0) or np.any(kk < 0) or np.any(kk > nn) or np.any(x < 0):
        raise ValueError("mle: need n > 0, 0 <= k <= n and caps >= 0")
    order = np.argsort(x)
    rates = kk[order] / nn[order]
    top = float(max(rates.max(), 1e-3))
    low = float(min(rates.min(), top))
    scale = 1.0 / max(float(np.median(x[x > 0])) if np.any(x > 0) else 1.0, 1e-9)
    best: tuple[float, NDArray[np.float64]] | None = None
    for mult in START_RATES:
        u0 = np.array([_logit(top), _logit(low / top if top > 0 else 0.5), math.log(mult * scale)])
        res = minimize(_nll, u0, args=(x, nn, kk), method="Nelder-Mead",
                       options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000})  # fmt: skip
        if best is None or res.fun < best[0]:
            best = (float(res.fun), np.asarray(res.x, dtype=float))
    assert best is not None
    base, gain, rate = _params(best[1])
    return base, gain, rate, -best[0]


def fit_curve(
    outcomes: Sequence[Sequence[tuple[float, bool]]],
    *,
    boot: int = 200,
    level: float = 0.9,
    seed: int = 0,
) -> CurveFit:
    """The curve of one type from ``outcomes``: per item, its ``(cap, correct)`` results.

    The interval of each parameter is the bootstrap's central ``level`` percentile range.
    """
    items = [list(o) for o in outcomes if o]
    if not items:
        raise ValueError("fit_curve: no graded outcome")

    def counts(chosen: Sequence[list[tuple[float, bool]]]) -> tuple[list[float], list[float], list[float]]:
        tally: dict[float, list[float]] = {}
        for item in chosen:
            for cap, ok in item:
                t = tally.setdefault(float(cap), [0.0, 0.0])
                t[0] += 1
                t[1] += float(ok)
        caps = sorted(tally)
        return caps, [tally[c][0] for c in caps], [tally[c][1] for c in caps]

    base, gain, rate, ll = mle(*counts(items))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(boot):
        pick = rng.integers(0, len(items), len(items))
        draws.append(mle(*counts([items[i] for i in pick]))[:3])
    intervals = {}
    if draws:
        arr = np.asarray(draws)
        q = ((1 - level) / 2 * 100, (1 + level) / 2 * 100)
        for j, name in enumerate(("base", "gain", "rate")):
            lo, hi = np.percentile(arr[:, j], q)
            intervals[name] = (float(lo), float(hi))
    samples = sum(len(i) for i in items)
    return CurveFit(base, gain, rate, ll, samples, intervals, level, tuple((b, g, r) for b, g, r in draws))


@dataclass(frozen=True)
class ServiceFit:
    """Service time = overhead_s + per_token_s x tokens, by least squares, with its residual variance."""

    overhead_s: float
    per_token_s: float
    variance_s2: float
    samples: int


def fit_service(tokens: Sequence[float], seconds: Sequence[float]) -> ServiceFit:
    """Least squares of ``seconds`` on ``tokens`` (intercept and slope held >= 0).

    >>> f = fit_service([10, 20, 30, 40], [0.2, 0.3, 0.4, 0.5])
    >>> round(f.overhead_s, 3), round(f.per_token_s, 3)
    (0.1, 0.01)
    """
    x = np.asarray(tokens, dtype=float)
    y = np.asarray(seconds, dtype=float)
    if x.size == 0 or x.size != y.size:
        raise ValueError("fit_service: one time per token count, at least one")
    if x.size == 1 or np.ptp(x) == 0:
        slope = float(y.mean() / x.mean()) if x.mean() > 0 else 0.0
        intercept = 0.0
    else:
        slope, intercept = (float(v) for v in np.polyfit(x, y, 1))
        if intercept < 0:
            intercept, slope = 0.0, float((x @ y) / (x @ x))
        if slope < 0:
            intercept, slope = float(y.mean()), 0.0
    resid = y - (intercept + slope * x)
    var = float(resid.var(ddof=min(2, x.size - 1))) if x.size > 1 else 0.0
    return ServiceFit(intercept, max(slope, 0.0), var, int(x.size))


def fit_step(in_service: Sequence[float], gap_s: Sequence[float]) -> tuple[float, float]:
    """The engine's step tau(j) = a + b j: least squares of token gaps on the number in
    service (a, b >= 0).

    >>> fit_step([1, 2, 3, 4], [0.017, 0.023, 0.029, 0.035])
    (0.011, 0.006)
    """
    j = np.asarray(in_service, dtype=float)
    y = np.asarray(gap_s, dtype=float)
    if j.size < 2 or j.size != y.size or np.ptp(j) == 0:
        raise ValueError("fit_step: gaps at two or more numbers in service are needed")
    b, a = (float(v) for v in np.polyfit(j, y, 1))
    if a < 0:
        a, b = 0.0, float((j @ y) / (j @ j))
    if b < 0:
        a, b = float(y.mean()), 0.0
    return round(a, 12), round(b, 12)


#: Token gaps an occupancy needs for its mean step to be written as a level.
LEVEL_MIN_GAPS = 20


def step_levels(
    in_service: Sequence[float], gap_s: Sequence[float], *, min_gaps: int = LEVEL_MIN_GAPS
) -> tuple[float, ...]:
    """The mean token gap at 1, 2, ... requests in service, up to the first occupancy with
    fewer than ``min_gaps`` gaps: the step per occupancy, where a line does not fit it.

    >>> step_levels([1] * 20 + [2] * 20 + [4] * 20, [0.006] * 20 + [0.017] * 20 + [0.028] * 20)
    (0.006, 0.017)
    """
    j = np.rint(np.asarray(in_service, dtype=float)).astype(int)
    y = np.asarray(gap_s, dtype=float)
    if j.size != y.size:
        raise ValueError("step_levels: one gap per number in service")
    out: list[float] = []
    for level in range(1, int(j.max(initial=0)) + 1):
        at = y[j == level]
        if at.size < min_gaps:
            break
        out.append(round(float(at.mean()), 12))
    return tuple(out)
