"""A batching engine's step time, fitted online: tau(j) = a + b j, and its prefill o + p P.

An engine that runs ``j`` sequences at once takes ``tau(j)`` seconds per decode step, one
token for each of them. Two kinds of finished request inform the fit:

- a streamed answer gives one sample per gap between token events, ``gap = n (a + b j)`` for
  ``n`` tokens arriving together while ``j`` requests were in service, plus its time to the
  first token, ``o + p P`` for ``P`` evaluated prompt tokens. The first token's wait is
  never read as a step: it is the prefill sample. Gaps during which another request was
  in its prefill are left out by the caller (that step carried the other's prompt);
- a whole (non-streamed) answer of ``T`` tokens gives ``service = o + p P + T (a + b n)``,
  with ``n`` the time-averaged number in service while it ran: a regression in
  ``(1, P, T, T n)``.

Both feed one weighted least-squares fit of ``theta = (o, p, a, b)`` in information form,
with the same per-observation forgetting as :class:`ServiceRLS`, a weak ridge prior at the
configured values, and standard errors from the residuals.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from thinkcap.estimators._decay import check_time
from thinkcap.estimators.service import FORGETTING, TOKEN_SCALE

#: Default finished requests before the fit can replace the configured step.
MIN_SAMPLES = 30
#: Default largest relative standard error of tau(1) and of b (as a share of tau(1)) for the fit to count.
MAX_REL_STDERR = 0.1
#: Largest condition number of the (a, b) information (scaled to unit diagonal) for the fit to
#: count: occupancies 1..4 seen evenly give about 30; every gap at one occupancy, infinity.
MAX_CONDITION = 1e3
#: Information of the ridge prior, per coefficient (scaled features): about one sample's worth of a stray token.
PRIOR_INFORMATION = 1e-4


class GapTally:
    """The sufficient statistics of one streamed answer's token gaps (pure, O(1) per gap).

    Each :meth:`add` is one sample ``gap_s = tokens (a + b in_service)`` of unit weight.

    Examples
    --------
    >>> g = GapTally()
    >>> g.add(0.030, 1, 2)
    >>> g.add(0.050, 1, 4)
    >>> g.samples, round(g.seconds, 3)
    (2, 0.08)
    """

    __slots__ = ("samples", "seconds", "sxx", "sxy", "syy")

    def __init__(self) -> None:
        self.samples = 0
        self.seconds = 0.0
        self.sxx = [0.0, 0.0, 0.0]  # sum of x x' for x = (n, n j): xx00 xx01 xx11
        self.sxy = [0.0, 0.0]
        self.syy = 0.0

    def add(self, gap_s: float, tokens: int, in_service: float) -> None:
        """One gap of ``gap_s`` seconds that brought ``tokens`` tokens with ``in_service`` requests running."""
        n = float(tokens)
        nj = n * in_service
        xx = self.sxx
        xx[0] += n * n
        xx[1] += n * nj
        xx[2] += nj * nj
        self.sxy[0] += n * gap_s
        self.sxy[1] += nj * gap_s
        self.syy += gap_s * gap_s
        self.samples += 1
        self.seconds += gap_s


class StepEstimate(NamedTuple):
    """The fitted step and prefill, with standard errors and the evidence behind them (immutable)."""

    base_s: float  # a: seconds per step, whatever the batch
    per_seq_s: float  # b: seconds per step per sequence in the batch
    prefill_base_s: float  # o: seconds per request before its first token
    prefill_per_token_s: float  # p: seconds per evaluated prompt token
    base_stderr_s: float
    per_seq_stderr_s: float
    requests: int
    gaps: int
    fitted: bool  # enough requests, and a, b and tau(1) pinned down (see StepFit)

    def step_time(self, j: float) -> float:
        """tau(j) = a + b j."""
        return self.base_s + self.per_seq_s * j

    def prefill_s(self, prompt_tokens: float) -> float:
        """Time before the first token for ``prompt_tokens`` evaluated prompt tokens."""
        return max(0.0, self.prefill_base_s + self.prefill_per_token_s * prompt_tokens)


class StepFit:
    """Online weighted least squares of an engine's step time and prefill.

    Parameters
    ----------
    base_s, per_seq_s
        The configured step ``tau(j) = base_s + per_seq_s j``: the ridge prior, and the
        estimate until the fit counts.
    prefill_s
        The configured prefill (seconds per request): the prior of the prefill intercept.
    forgetting
        Per-request forgetting factor in (0, 1] (as :class:`ServiceRLS`).
    min_samples
        Finished requests before the fit may count.
    max_rel_stderr
        The fit counts when the standard errors of ``tau(1)``, of ``b`` and of the intercept
        ``a`` are each at most this share of ``tau(1)``, both coefficients are >= 0, and the
        occupancies seen tell ``a`` from ``b`` (the condition number of their information is
        at most :data:`MAX_CONDITION`).

    Notes
    -----
    Coefficients ``theta = (o, p, a, b)`` with the prompt feature per 1000 tokens. The
    information matrix ``I`` and vector ``v`` are sums of ``w x x'`` and ``w x y``; each
    finished request first multiplies them by ``forgetting``. Weights: 1 per token gap and
    per time to the first token, ``1 / T`` for a whole answer of ``T`` tokens (its variance
    grows with its steps). ``theta = (I + I0)^-1 (v + I0 theta0)`` with the weak prior
    ``I0 = PRIOR_INFORMATION x identity``; ``sigma^2``, the weighted residual sum of squares
    over the (decayed) number of samples less 4, is the noise of one unit-weight sample, and
    ``sigma^2 (I + I0)^-1`` the covariance.

    Examples
    --------
    >>> fit = StepFit(base_s=0.02, per_seq_s=0.01, min_samples=5)
    >>> for i in range(40):
    ...     gaps = GapTally()
    ...     for k in range(60):
    ...         j = 1 + (i + k) % 4
    ...         gaps.add(0.015 + 0.006 * j, 1, j)
    ...     fit.update(prompt_tokens=30, tokens=61, service_s=0.5, mean_in_service=2.5, gaps=gaps,
    ...                first_token_s=0.05 + 0.004 * 30, now=float(i))
    >>> e = fit.get()
    >>> round(e.base_s, 4), round(e.per_seq_s, 4), e.fitted
    (0.015, 0.006, True)
    """

    def __init__(
        self,
        base_s: float = 0.0,
        per_seq_s: float = 0.0,
        prefill_s: float = 0.0,
        *,
        forgetting: float = FORGETTING,
        min_samples: int = MIN_SAMPLES,
        max_rel_stderr: float = MAX_REL_STDERR,
    ) -> None:
        for name, value in (("base_s", base_s), ("per_seq_s", per_seq_s), ("prefill_s", prefill_s)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        if not (isinstance(forgetting, int | float) and not isinstance(forgetting, bool) and 0 < forgetting <= 1):
            raise ValueError(f"forgetting: must be in (0, 1], got {forgetting!r}")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
            raise ValueError(f"min_samples: must be an integer >= 1, got {min_samples!r}")
        if isinstance(max_rel_stderr, bool) or not isinstance(max_rel_stderr, int | float) or not max_rel_stderr > 0:
            raise ValueError(f"max_rel_stderr: must be > 0, got {max_rel_stderr!r}")
        self.base_s = float(base_s)
        self.per_seq_s = float(per_seq_s)
        self.prefill_s = float(prefill_s)
        self.forgetting = float(forgetting)
        self.min_samples = min_samples
        self.max_rel_stderr = float(max_rel_stderr)
        self._prior = np.array([self.prefill_s, 0.0, self.base_s, self.per_seq_s])
        self._info = np.zeros((4, 4))
        self._vec = np.zeros(4)
        self._syy = 0.0  # weighted sum of y^2
        self._samples = 0.0  # decayed number of samples (the residuals' degrees of freedom)
        self._n = 0  # samples (not decayed)
        self._requests = 0
        self._gaps = 0
        self._last: float | None = None
        self._cached: StepEstimate | None = None

    def update(
        self,
        *,
        prompt_tokens: float,
        tokens: float,
        service_s: float,
        mean_in_service: float,
        gaps: GapTally | None = None,
        first_token_s: float | None = None,
        first_token_in_service: float = 1.0,
        now: float,
    ) -> None:
        """One finished request: streamed (``gaps`` and ``first_token_s``) or whole.

        ``prompt_tokens`` are the evaluated (not cached) prompt tokens, ``tokens`` the
        completion tokens, ``service_s`` the time from sending it to its end, and
        ``mean_in_service`` the time-averaged number of requests in service meanwhile
        (itself included, so at least 1). ``first_token_in_service`` is how many were in
        service when its first token came: the prefill sample is read as its time alone
        slowed by that batch, ``first_token_s = (o + p P) tau(j) / tau(1)`` with the step
        fitted so far, as the queue model reads a request's work.
        """
        now = check_time(now, self._last)
        for name, value in (
            ("prompt_tokens", prompt_tokens),
            ("tokens", tokens),
            ("service_s", service_s),
            ("mean_in_service", mean_in_service),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        bad = isinstance(first_token_s, bool) or not isinstance(first_token_s, int | float)
        if first_token_s is not None and (bad or not 0 <= first_token_s < math.inf):
            raise ValueError(f"first_token_s: must be a finite number >= 0, got {first_token_s!r}")
        j = first_token_in_service
        if isinstance(j, bool) or not isinstance(j, int | float) or not 1 <= j < math.inf:
            raise ValueError(f"first_token_in_service: must be a finite number >= 1, got {j!r}")
        slowdown = self._slowdown(j) if first_token_s is not None and j > 1 else 1.0
        f = self.forgetting
        info, vec = self._info, self._vec
        info *= f
        vec *= f
        self._syy *= f
        self._samples *= f
        self._last = now
        self._requests += 1
        self._cached = None
        pt = prompt_tokens / TOKEN_SCALE
        if gaps is not None:
            if gaps.samples:
                xx, xy = gaps.sxx, gaps.sxy
                info[2, 2] += xx[0]
                info[2, 3] += xx[1]
                info[3, 2] += xx[1]
                info[3, 3] += xx[2]
                vec[2] += xy[0]
                vec[3] += xy[1]
                self._syy += gaps.syy
                self._samples += gaps.samples
                self._n += gaps.samples
                self._gaps += gaps.samples
            if first_token_s is not None:
                self._add(np.array([slowdown, slowdown * pt, 0.0, 0.0]), first_token_s, 1.0)
            return
        if tokens <= 0:
            self._add(np.array([1.0, pt, 0.0, 0.0]), service_s, 1.0)
            return
        x = np.array([1.0, pt, tokens, tokens * max(mean_in_service, 1.0)])
        self._add(x, service_s, 1.0 / tokens)

    def _slowdown(self, j: float) -> float:
        """g(j) = tau(j) / tau(1) from the fit so far, between 1 and j (1 while it is unknown)."""
        est = self.get()
        tau1 = est.step_time(1)
        return min(max(est.step_time(j) / tau1, 1.0), j) if tau1 > 0 else 1.0

    def _add(self, x: NDArray[np.float64], y: float, w: float) -> None:
        self._info += w * np.outer(x, x)
        self._vec += w * y * x
        self._syy += w * y * y
        self._samples += 1.0
        self._n += 1

    def _solve(self) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
        """Weighted least squares with the weak ridge prior: theta, (I + I0)^-1 and sigma^2.

        No coefficient is clamped: a step that comes out shrinking with the batch, or taking
        less than no time, is reported as fitted and kept out of use by :meth:`get`'s gate (a
        clamped intercept would read as "no batching gain" and mislead the queue model).
        """
        prior = PRIOR_INFORMATION * np.eye(4)
        info = self._info + prior
        cov = np.asarray(np.linalg.inv(info), dtype=np.float64)
        theta = cov @ (self._vec + prior @ self._prior)
        # Weighted residual sum of squares: y'Wy - 2 theta'v + theta' I theta (data part only).
        rss = self._syy - 2.0 * float(theta @ self._vec) + float(theta @ self._info @ theta)
        dof = self._samples - 4
        sigma2 = max(rss, 0.0) / dof if dof > 0 else math.inf
        return theta, cov, sigma2

    def _condition(self) -> float:
        """Condition number of the data's information on (a, b): large when the occupancies
        seen do not tell the intercept from the slope (every gap at one occupancy, say),
        however small the jitter."""
        block = self._info[2:, 2:]
        if not np.all(np.isfinite(block)) or block[0, 0] <= 0 or block[1, 1] <= 0:
            return math.inf
        scale = np.sqrt(np.diag(block))
        eig = np.linalg.eigvalsh(block / np.outer(scale, scale))
        return float(eig[-1] / eig[0]) if eig[0] > 0 else math.inf

    def get(self, now: float | None = None) -> StepEstimate:
        """The estimate at ``now`` (default: the last update); it forgets per request, so it
        reads the same at any later time. Before the fit counts, the coefficients are still
        the fitted ones (the configured values where the data say nothing), with ``fitted``
        false."""
        if now is not None:
            check_time(now, self._last)
        if self._cached is not None:
            return self._cached
        theta, cov, sigma2 = self._solve()
        o, p, a, b = (float(v) for v in theta)
        p /= TOKEN_SCALE
        if math.isfinite(sigma2):
            se_a = math.sqrt(sigma2 * max(cov[2, 2], 0.0))
            se_b = math.sqrt(sigma2 * max(cov[3, 3], 0.0))
            se_tau1 = math.sqrt(sigma2 * max(cov[2, 2] + 2 * cov[2, 3] + cov[3, 3], 0.0))
        else:
            se_a = se_b = se_tau1 = math.inf
        tau1 = a + b
        limit = self.max_rel_stderr * tau1
        fitted = (
            self._requests >= self.min_samples
            and a >= 0
            and b >= 0
            and tau1 > 0
            and se_tau1 <= limit
            and se_b <= limit
            and se_a <= limit  # the batching gain rests on the intercept
            and self._condition() <= MAX_CONDITION
        )
        est = StepEstimate(a, b, o, p, se_a, se_b, self._requests, self._gaps, fitted)
        self._cached = est
        return est

    @property
    def last_update(self) -> float | None:
        """Time of the last finished request (``None`` before any)."""
        return self._last

    @property
    def count(self) -> int:
        """Finished requests seen."""
        return self._requests
