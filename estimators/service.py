"""Service-time model: robust recursive least squares with forgetting.

service_time ~ b0 + b_out * completion_tokens + b_in * evaluated_prompt_tokens
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from thinkcap.estimators._decay import check_time

#: Default forgetting factor of the regression (1: never forget).
FORGETTING = 0.999

#: Features are divided by this so that the regression is well conditioned (per 1000 tokens).
TOKEN_SCALE = 1000.0


class ServiceRLS:
    """Recursive least squares on (1, completion, prompt) with forgetting and Huber weights.

    Parameters
    ----------
    forgetting
        Per-observation forgetting factor in (0, 1]; 1 is ordinary least squares.
    initial_variance
        Diagonal of the initial inverse information matrix P (large: a weak start).
    huber
        Observations whose residual exceeds ``huber`` residual standard deviations get the
        Huber weight ``huber * sd / |residual|``, so a stall cannot wreck the fit
        (``inf``: plain least squares).
    warmup
        Observations before the robust weighting starts (the residual scale must exist).
    max_trace
        Bound on trace(P) (default: its initial value): stops covariance wind-up when the
        inputs stop varying.

    Notes
    -----
    Forgetting is per observation, not per second: ``now`` is checked (finite, never going
    back) and kept as :attr:`last_update`, and :meth:`get` reads the same coefficients at any
    later time.

    Weighted RLS: with gain ``k = P x / (f / w + x' P x)``, ``theta += k r`` and
    ``P = (P - k x' P) / f``, stored as its upper triangle so that it stays exactly
    symmetric. Memory is O(1): theta (3), P (6 numbers), the residual moments.

    Examples
    --------
    >>> rls = ServiceRLS()
    >>> for n in range(1, 50):
    ...     rls.update(completion_tokens=10 * n, prompt_tokens=n % 7, service_time=0.2 + 0.01 * 10 * n, now=n)
    >>> [round(v, 4) for v in rls.get()]
    [0.2, 0.01, 0.0]
    """

    def __init__(
        self,
        forgetting: float = FORGETTING,
        initial_variance: float = 1e6,
        huber: float = 4.0,
        warmup: int = 20,
        max_trace: float | None = None,
    ) -> None:
        max_trace = 3.0 * initial_variance if max_trace is None else max_trace
        if not (isinstance(forgetting, int | float) and 0 < forgetting <= 1):
            raise ValueError(f"forgetting: must be in (0, 1], got {forgetting!r}")
        for name, value in (("initial_variance", initial_variance), ("huber", huber), ("max_trace", max_trace)):
            if not (isinstance(value, int | float) and value > 0 and (math.isfinite(value) or name == "huber")):
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup: must be an integer >= 0, got {warmup!r}")
        self.forgetting = float(forgetting)
        self.initial_variance = float(initial_variance)
        self.huber = float(huber)
        self.warmup = warmup
        self.max_trace = float(max_trace)
        # theta and the symmetric P as plain floats: a 3x3 update in Python beats numpy's
        # per-call overhead by an order of magnitude.
        self._theta = [0.0, 0.0, 0.0]
        v = self.initial_variance
        self._p = [v, 0.0, 0.0, v, 0.0, v]  # p00 p01 p02 p11 p12 p22
        self._n = 0
        self._weight = 0.0  # decayed sum of weights
        self._sq = 0.0  # decayed weighted sum of a-priori x a-posteriori residuals
        self._last: float | None = None

    def update(self, *, completion_tokens: float, prompt_tokens: float, service_time: float, now: float) -> None:
        """Add one observation (tokens >= 0, service time >= 0 seconds) made at ``now``."""
        now = check_time(now, self._last)
        for name, value in (
            ("completion_tokens", completion_tokens),
            ("prompt_tokens", prompt_tokens),
            ("service_time", service_time),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 or value == math.inf:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        self._last = now
        x1 = completion_tokens / TOKEN_SCALE
        x2 = prompt_tokens / TOKEN_SCALE
        t0, t1, t2 = self._theta
        p00, p01, p02, p11, p12, p22 = self._p
        f = self.forgetting
        r = service_time - (t0 + t1 * x1 + t2 * x2)
        w = 1.0
        if self._n >= self.warmup and self._weight > 0:
            sd = math.sqrt(max(self._sq / self._weight, 0.0))
            if sd > 0 and abs(r) > self.huber * sd:
                w = self.huber * sd / abs(r)
        # px = P x with x = (1, x1, x2)
        q0 = p00 + p01 * x1 + p02 * x2
        q1 = p01 + p11 * x1 + p12 * x2
        q2 = p02 + p12 * x1 + p22 * x2
        den = f / w + q0 + q1 * x1 + q2 * x2
        g0, g1, g2 = q0 / den, q1 / den, q2 / den
        t0, t1, t2 = t0 + g0 * r, t1 + g1 * r, t2 + g2 * r
        inv_f = 1.0 / f
        # P <- (P - g q') / f; written on the upper triangle, so it stays symmetric.
        p = [
            (p00 - g0 * q0) * inv_f,
            (p01 - g0 * q1) * inv_f,
            (p02 - g0 * q2) * inv_f,
            (p11 - g1 * q1) * inv_f,
            (p12 - g1 * q2) * inv_f,
            (p22 - g2 * q2) * inv_f,
        ]
        trace = p[0] + p[3] + p[5]
        if trace > self.max_trace:
            scale = self.max_trace / trace
            p = [v * scale for v in p]
        self._theta = [t0, t1, t2]
        self._p = p
        self._n += 1
        if self._n > 3:  # three coefficients: residuals mean something from the fourth on
            # a-priori times a-posteriori residual: an unbiased estimate of the noise variance
            r_post = service_time - (t0 + t1 * x1 + t2 * x2)
            self._weight = f * self._weight + w
            self._sq = f * self._sq + w * r * r_post

    def get(self, now: float | None = None) -> tuple[float, float, float]:
        """The coefficients at ``now`` (default: the last update): see :attr:`coefficients`."""
        if now is not None:
            check_time(now, self._last)
        return self.coefficients

    @property
    def last_update(self) -> float | None:
        """Time of the last observation (``None`` before any)."""
        return self._last

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """(b0 seconds, b_out seconds/token, b_in seconds/token)."""
        t0, t1, t2 = self._theta
        return t0, t1 / TOKEN_SCALE, t2 / TOKEN_SCALE

    @property
    def residual_variance(self) -> float:
        """Noise variance, seconds^2: decayed mean of a-priori x a-posteriori residuals (0 before data)."""
        return max(0.0, self._sq / self._weight) if self._weight > 0 else 0.0

    @property
    def residual_sd(self) -> float:
        """Square root of :attr:`residual_variance`."""
        return math.sqrt(self.residual_variance)

    @property
    def count(self) -> int:
        """Observations seen."""
        return self._n

    @property
    def covariance(self) -> NDArray[np.float64]:
        """P (scaled features) as a 3x3 array."""
        p00, p01, p02, p11, p12, p22 = self._p
        return np.array([[p00, p01, p02], [p01, p11, p12], [p02, p12, p22]])
