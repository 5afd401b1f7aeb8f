"""Per-type service parameters (t0_k, c_k, v_k) from the pooled regression (DESIGN.md 2)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from thinkcap.estimators.service import FORGETTING, ServiceRLS

#: Default number of observations before a fit replaces the configured service parameters.
MIN_SAMPLES = 30


class ServiceParams(NamedTuple):
    """Service-time parameters of one type and how many samples they rest on (immutable)."""

    overhead_s: float
    per_token_s: float
    variance_s2: float
    samples: int
    fitted: bool


class _Moments:
    """Mean and variance of evaluated prompt tokens (Welford, with forgetting)."""

    __slots__ = ("mean", "n", "var", "weight")

    def __init__(self) -> None:
        self.weight = 0.0
        self.mean = 0.0
        self.var = 0.0
        self.n = 0

    def update(self, value: float, forgetting: float) -> None:
        self.weight = forgetting * self.weight + 1.0
        delta = value - self.mean
        self.mean += delta / self.weight
        self.var = forgetting * self.var + delta * (value - self.mean)
        self.n += 1

    @property
    def variance(self) -> float:
        return self.var / self.weight if self.weight > 0 else 0.0


class ServiceModel:
    """Pooled robust RLS plus per-type prompt statistics, read out per type.

    Parameters
    ----------
    defaults
        Configured ``(overhead_s, per_token_s, variance_s2)`` per type name, used until the
        fit rests on ``min_samples`` observations (and for a type never seen).
    min_samples
        Observations before fitted values replace the defaults.
    per_type_slopes
        Give a type its own regression once it has ``min_samples`` observations (set at
        construction: the per-type regressions are fitted only then).
    forgetting
        Forgetting factor of every regression and prompt statistic.

    Notes
    -----
    With pooled coefficients (b0, b_out, b_in) and the type's evaluated prompt tokens
    (mean m_k, variance s_k^2): ``t0_k = b0 + b_in m_k``, ``c_k = b_out``,
    ``v_k = residual variance + b_in^2 s_k^2``.
    """

    def __init__(
        self,
        defaults: Mapping[str, tuple[float, float, float]] | None = None,
        min_samples: int = MIN_SAMPLES,
        per_type_slopes: bool = False,
        forgetting: float = FORGETTING,
    ) -> None:
        self.defaults = dict(defaults or {"default": (0.1, 0.01, 0.0)})
        if not self.defaults:
            raise ValueError("defaults: at least one type is required")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 3:
            raise ValueError(f"min_samples: must be an integer >= 3, got {min_samples!r}")
        self.min_samples = min_samples
        self.per_type_slopes = bool(per_type_slopes)
        self.forgetting = forgetting
        self._pooled = ServiceRLS(forgetting=forgetting)
        # Per-type fits cost as much as the pooled one on every request: kept only when used.
        self._own = {name: ServiceRLS(forgetting=forgetting) for name in self.defaults} if self.per_type_slopes else {}
        self._prompt = {name: _Moments() for name in self.defaults}

    @property
    def names(self) -> Sequence[str]:
        """Type names in configuration order."""
        return tuple(self.defaults)

    def update(
        self,
        name: str,
        *,
        prompt_tokens: float,
        completion_tokens: float,
        service_time: float,
        cached_tokens: float = 0,
        now: float,
    ) -> None:
        """Record one request finished at ``now``; only evaluated (not cached) prompt tokens count."""
        if name not in self._prompt:
            raise ValueError(f"type: unknown type {name!r} (known: {', '.join(self.defaults)})")
        if isinstance(cached_tokens, bool) or not isinstance(cached_tokens, int | float) or not cached_tokens >= 0:
            raise ValueError(f"cached_tokens: must be a number >= 0, got {cached_tokens!r}")
        if isinstance(prompt_tokens, int | float) and cached_tokens > prompt_tokens:
            raise ValueError(f"cached_tokens: {cached_tokens!r} exceeds prompt_tokens {prompt_tokens!r}")
        evaluated = prompt_tokens - cached_tokens
        kw = {"completion_tokens": completion_tokens, "prompt_tokens": evaluated, "service_time": service_time}
        kw["now"] = now
        self._pooled.update(**kw)  # validates everything before any state changes
        own = self._own.get(name)
        if own is not None:
            own.update(**kw)
        self._prompt[name].update(float(evaluated), self.forgetting)

    def params(self, name: str) -> ServiceParams:
        """The service parameters of type ``name``."""
        if name not in self._prompt:
            raise ValueError(f"type: unknown type {name!r}")
        return self.get()[name]

    def get(self, now: float | None = None) -> dict[str, ServiceParams]:
        """The service parameters of every type at ``now`` (default: the last update).

        The regressions forget per observation (see :class:`ServiceRLS`), so the answer does
        not change between updates; the pooled fit is read once.
        """
        self._pooled.get(now)
        pooled_ready = self._pooled.count >= self.min_samples
        pooled = (*self._pooled.coefficients, self._pooled.residual_variance)
        out = {}
        for name, stats in self._prompt.items():
            t0, c, v = self.defaults[name]
            if not pooled_ready or stats.n == 0:
                out[name] = ServiceParams(t0, c, v, stats.n, False)
                continue
            own = self._own.get(name)
            if own is not None and stats.n >= self.min_samples:
                b0, b_out, b_in, resid = (*own.coefficients, own.residual_variance)
            else:
                b0, b_out, b_in, resid = pooled
            var = resid + b_in * b_in * stats.variance
            overhead = max(0.0, b0 + b_in * stats.mean)
            per_token = max(0.0, b_out)
            if math.isfinite(overhead) and math.isfinite(per_token) and math.isfinite(var):
                out[name] = ServiceParams(overhead, per_token, var, stats.n, True)
            else:
                out[name] = ServiceParams(t0, c, v, stats.n, False)
        return out

    def prompt_tokens(self) -> dict[str, float]:
        """Mean evaluated prompt tokens of every type seen so far (forgetting as the fit)."""
        return {name: m.mean for name, m in self._prompt.items() if m.n > 0}

    @property
    def pooled(self) -> ServiceRLS:
        """The pooled regression (read it, do not update it directly)."""
        return self._pooled
