"""Service-time model: robust recursive least squares with forgetting.

service_time ~ b0 + b_out * completion_tokens + b_in * evaluated_prompt_tokens
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

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
    Weighted RLS in the information form's inverse: with gain ``k = P x / (f / w + x' P x)``,
    ``theta += k r`` and ``P = (P - k x' P) / f``, symmetrised after every step so that it
    cannot drift to indefinite. Memory is O(1): theta (3), P (3x3), the residual moments.

    Examples
    --------
    >>> rls = ServiceRLS()
    >>> for n in range(1, 50):
    ...     rls.update(completion_tokens=10 * n, prompt_tokens=n % 7, service_time=0.2 + 0.01 * 10 * n)
    >>> [round(v, 4) for v in rls.coefficients]
    [0.2, 0.01, 0.0]
    """

    def __init__(
        self,
        forgetting: float = 0.999,
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
        self._theta = np.zeros(3)
        self._p = np.eye(3) * self.initial_variance
        self._n = 0
        self._weight = 0.0  # decayed sum of weights
        self._sq = 0.0  # decayed weighted sum of squared a-priori residuals

    def update(self, *, completion_tokens: float, prompt_tokens: float, service_time: float) -> None:
        """Add one observation (tokens >= 0, service time >= 0 seconds)."""
        for name, value in (
            ("completion_tokens", completion_tokens),
            ("prompt_tokens", prompt_tokens),
            ("service_time", service_time),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        x = np.array([1.0, completion_tokens / TOKEN_SCALE, prompt_tokens / TOKEN_SCALE])
        p, f = self._p, self.forgetting
        r = service_time - float(x @ self._theta)
        w = 1.0
        sd = self.residual_sd
        if self._n >= self.warmup and sd > 0 and abs(r) > self.huber * sd:
            w = self.huber * sd / abs(r)
        px = p @ x
        gain = px / (f / w + float(x @ px))
        self._theta = self._theta + gain * r
        p = (p - np.outer(gain, px)) / f
        p = 0.5 * (p + p.T)
        tr = float(np.trace(p))
        if tr > self.max_trace:
            p *= self.max_trace / tr
        self._p = p
        self._n += 1
        if self._n > 3:  # three coefficients: residuals mean something from the fourth on
            # a-priori times a-posteriori residual: an unbiased estimate of the noise variance
            r_post = service_time - float(x @ self._theta)
            self._weight = f * self._weight + w
            self._sq = f * self._sq + w * r * r_post

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """(b0 seconds, b_out seconds/token, b_in seconds/token)."""
        t = self._theta
        return float(t[0]), float(t[1]) / TOKEN_SCALE, float(t[2]) / TOKEN_SCALE

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
        """A copy of P (scaled features)."""
        return self._p.copy()
