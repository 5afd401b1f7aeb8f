"""Accuracy-curve refinement from graded feedback: p(l) = base + gain (1 - exp(-rate l))."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize
from scipy.special import expit

from thinkcap.estimators._decay import check_time

#: Default weight of the configured curve, in graded answers.
PRIOR_STRENGTH = 200.0

#: Feedback is kept as counts in this many token bins (O(1) memory).
BINS = 32
#: A bin counts as a distinct cap level once it holds this many graded answers.
LEVEL_MIN_COUNT = 5
#: Step of the finite differences behind the Laplace approximation (in the unconstrained
#: parameters u, where the curve's parameters are smooth).
HESSIAN_STEP = 1e-4


@dataclass(frozen=True)
class CurveEvidence:
    """How well graded feedback pins a type's curve down.

    ``samples`` graded answers fell in ``levels`` distinct token bins with at least
    :data:`LEVEL_MIN_COUNT` each; ``stderr`` is the largest standard error of the fitted
    accuracy p(l) over the bins that hold feedback (a Laplace approximation of the posterior,
    the configured curve counting as ``prior_strength`` answers), ``nan`` without feedback.
    """

    base: float
    gain: float
    rate: float
    samples: int
    levels: int
    stderr: float


#: Bounds of ln(rate) in the fit: a rate of e^-60 is a flat curve, e^30 a step at zero tokens.
#: Unanimous feedback drives the unconstrained optimum to infinity; the bounds keep every
#: evaluation finite there.
LOG_RATE_BOUNDS = (-60.0, 30.0)


def _sigmoid(z: float) -> float:
    """The logistic function, finite for any finite or infinite ``z`` (no overflow)."""
    return float(expit(z))


def _rate(u: float) -> float:
    """The curve's rate from its unconstrained parameter, clipped to :data:`LOG_RATE_BOUNDS`."""
    lo, hi = LOG_RATE_BOUNDS
    return math.exp(min(max(float(u), lo), hi))


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1.0 - 1e-9)
    return math.log(p / (1.0 - p))


class AccuracyCurve:
    """A saturating accuracy curve refined from (tokens used, correct) feedback.

    Parameters
    ----------
    base, gain, rate
        The configured curve; it is also the prior.
    max_tokens
        Upper end of the token bins.
    prior_strength
        The configured curve counts as this many pseudo-observations spread over the bins,
        so the fit moves from it only as far as the evidence supports.

    Notes
    -----
    Feedback is binned (log-spaced bins up to ``max_tokens``, each keeping its count, its
    correct count and its mean tokens). The estimate maximises the Bernoulli likelihood of
    the bins plus the pseudo-observations, which follow the configured curve at the bin
    centres; with no feedback it returns the configured curve exactly. Parameters are kept
    valid by construction: ``base + gain = sigmoid(u1)``, ``base = sigmoid(u1) sigmoid(u2)``,
    ``rate = exp(u3)``.

    Examples
    --------
    >>> curve = AccuracyCurve(base=0.2, gain=0.6, rate=0.01, max_tokens=1000)
    >>> [round(v, 3) for v in curve.get()]
    [0.2, 0.6, 0.01]
    """

    def __init__(
        self,
        base: float = 0.0,
        gain: float = 0.5,
        rate: float = 0.001,
        *,
        max_tokens: float = 8192.0,
        prior_strength: float = PRIOR_STRENGTH,
    ) -> None:
        if not (base >= 0 and gain > 0 and base + gain <= 1 and rate > 0):
            raise ValueError(
                f"base, gain, rate: need base >= 0, gain > 0, base + gain <= 1, rate > 0; got {base}, {gain}, {rate}"
            )
        if not (math.isfinite(max_tokens) and max_tokens >= 1):
            raise ValueError(f"max_tokens: must be a finite number >= 1, got {max_tokens!r}")
        if not (math.isfinite(prior_strength) and prior_strength > 0):
            raise ValueError(f"prior_strength: must be a finite number > 0, got {prior_strength!r}")
        self.base = float(base)
        self.gain = float(gain)
        self.rate = float(rate)
        self.max_tokens = float(max_tokens)
        self.prior_strength = float(prior_strength)
        self._edges = np.concatenate([[0.0], np.geomspace(1.0, self.max_tokens, BINS)])
        centres = np.sqrt(np.maximum(self._edges[:-1], 0.5) * self._edges[1:])
        self._centres = centres
        self._n = np.zeros(BINS)
        self._k = np.zeros(BINS)
        self._tokens = np.zeros(BINS)
        self._fit: tuple[float, float, float] | None = (self.base, self.gain, self.rate)
        self._evidence: CurveEvidence | None = None
        self._last: float | None = None
        self._version = 0  # feedback updates so far (a fit made on a copy is taken back only at the same version)

    def update(self, tokens: float, correct: bool, *, now: float) -> None:
        """Record one graded answer, given at ``now``, that used ``tokens`` reasoning tokens."""
        now = check_time(now, self._last)
        if isinstance(tokens, bool) or not isinstance(tokens, int | float) or not math.isfinite(tokens) or tokens < 0:
            raise ValueError(f"tokens: must be a finite number >= 0, got {tokens!r}")
        if not isinstance(correct, bool | np.bool_):
            raise ValueError(f"correct: must be a bool, got {correct!r}")
        self._last = now
        b = min(int(np.searchsorted(self._edges, tokens, side="right")) - 1, BINS - 1)
        self._n[b] += 1.0
        self._k[b] += float(bool(correct))
        self._tokens[b] += float(tokens)
        self._fit = None
        self._evidence = None
        self._version += 1

    @property
    def cached(self) -> bool:
        """Whether the fit and its evidence for the feedback so far are computed (reading them is then free)."""
        return self._fit is not None and self._evidence is not None

    def adopt(self, other: AccuracyCurve) -> bool:
        """Take the fit and evidence of ``other``, a copy of this curve fitted elsewhere (a worker
        thread), if no feedback arrived here since the copy was made; returns whether it did."""
        if other._version != self._version or other._fit is None:
            return False
        self._fit, self._evidence = other._fit, other._evidence
        return True

    @property
    def samples(self) -> int:
        """Graded answers seen."""
        return int(self._n.sum())

    def _curve(self, u: NDArray[np.float64], x: NDArray[np.float64]) -> NDArray[np.float64]:
        top, frac, rate = _sigmoid(u[0]), _sigmoid(u[1]), _rate(u[2])
        base = top * frac
        out: NDArray[np.float64] = base + (top - base) * -np.expm1(-rate * x)
        return out

    def _data(self) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """Token levels, trials and successes: the prior's pseudo-observations, then the feedback."""
        prior_n = np.full(BINS, self.prior_strength / BINS)
        p0 = self.base + self.gain * -np.expm1(-self.rate * self._centres)
        seen = self._n > 0
        x = np.concatenate([self._centres, self._tokens[seen] / self._n[seen]])
        n = np.concatenate([prior_n, self._n[seen]])
        k = np.concatenate([prior_n * p0, self._k[seen]])
        return x, n, k

    def _nll(
        self, u: NDArray[np.float64], x: NDArray[np.float64], n: NDArray[np.float64], k: NDArray[np.float64]
    ) -> float:
        p = np.clip(self._curve(u, x), 1e-12, 1 - 1e-12)
        return -float(k @ np.log(p) + (n - k) @ np.log1p(-p))

    def _u(self, curve: tuple[float, float, float]) -> NDArray[np.float64]:
        base, gain, rate = curve
        top = base + gain
        return np.array([_logit(top), _logit(base / top if top > 0 else 0.0), math.log(rate)])

    def get(self, now: float | None = None) -> tuple[float, float, float]:
        """The (base, gain, rate) at ``now`` (default: the last update; feedback does not age)."""
        if now is not None:
            check_time(now, self._last)
        if self._fit is not None:
            return self._fit
        x, n, k = self._data()
        u0 = self._u((self.base, self.gain, self.rate))
        res = minimize(
            self._nll, u0, args=(x, n, k), method="Nelder-Mead",
            options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 4000},
        )  # fmt: skip
        u = res.x if np.isfinite(res.fun) else u0
        top_f, frac_f = _sigmoid(u[0]), _sigmoid(u[1])
        self._fit = (top_f * frac_f, top_f * (1 - frac_f), _rate(u[2]))
        return self._fit

    def evidence(self) -> CurveEvidence:
        """The fit with what stands behind it (see :class:`CurveEvidence`).

        Notes
        -----
        The covariance of the unconstrained parameters u is the inverse Hessian of the
        penalised negative log-likelihood at the fit (central differences); the standard
        error of p(l) is sqrt(g' H^-1 g), g = dp(l)/du, taken at the mean tokens of each bin
        with feedback.
        """
        if self._evidence is None:
            self._evidence = self._measure()
        return self._evidence

    def _measure(self) -> CurveEvidence:
        fit = self.get()
        samples, levels = self.samples, int(np.sum(self._n >= LEVEL_MIN_COUNT))
        seen = self._n > 0
        if not seen.any():
            return CurveEvidence(*fit, samples=samples, levels=levels, stderr=math.nan)
        x, n, k = self._data()
        u = self._u(fit)
        h, eye = HESSIAN_STEP, np.eye(3)
        f0 = self._nll(u, x, n, k)
        hess = np.empty((3, 3))
        for i in range(3):
            for j in range(i, 3):
                di, dj = h * eye[i], h * eye[j]
                if i == j:
                    v = (self._nll(u + di, x, n, k) - 2 * f0 + self._nll(u - di, x, n, k)) / h**2
                else:
                    v = (
                        self._nll(u + di + dj, x, n, k) - self._nll(u + di - dj, x, n, k)
                        - self._nll(u - di + dj, x, n, k) + self._nll(u - di - dj, x, n, k)
                    ) / (4 * h * h)  # fmt: skip
                hess[i, j] = hess[j, i] = v
        try:
            cov = np.linalg.inv(hess)
        except np.linalg.LinAlgError:
            return CurveEvidence(*fit, samples=samples, levels=levels, stderr=math.inf)
        at = self._tokens[seen] / self._n[seen]
        grad = np.column_stack([(self._curve(u + h * eye[i], at) - self._curve(u - h * eye[i], at)) / (2 * h)
                                for i in range(3)])  # fmt: skip
        var = np.einsum("ni,ij,nj->n", grad, cov, grad)
        stderr = float(np.sqrt(np.max(var))) if np.all(var >= 0) else math.inf
        return CurveEvidence(*fit, samples=samples, levels=levels, stderr=stderr)
