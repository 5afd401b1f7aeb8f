"""Everything the controller needs from the estimators, in one call."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from thinkcap.estimators import mix, service, service_model
from thinkcap.estimators.arrival import ArrivalRate
from thinkcap.estimators.mix import TypeMix
from thinkcap.estimators.service_model import ServiceModel


class TypeEstimate(NamedTuple):
    """One type's estimated prior and service parameters, with the samples behind them (immutable)."""

    name: str
    prior: float
    overhead_s: float
    per_token_s: float
    variance_s2: float
    samples: int
    fitted: bool


@dataclass(frozen=True)
class Snapshot:
    """The estimators' state at one instant."""

    time: float
    arrival_rate: float
    arrival_rate_stderr: float
    arrivals: float
    changes: int
    last_change: float | None
    types: tuple[TypeEstimate, ...]
    recent_rate: float = math.nan  # the fast window's rate (nan: not known, as in a merged snapshot)
    recent_rate_stderr: float = math.nan

    def by_name(self) -> dict[str, TypeEstimate]:
        """The type estimates keyed by name."""
        return {t.name: t for t in self.types}


class Estimators:
    """The arrival-rate, type-mix and service estimators of one proxy, fed together.

    Parameters
    ----------
    defaults
        Per type name: configured ``(prior, overhead_s, per_token_s, variance_s2)``.
    arrival, mix_half_life_s, mix_concentration, min_samples, per_type_slopes, forgetting
        Hyperparameters passed to :class:`ArrivalRate`, :class:`TypeMix` and
        :class:`ServiceModel`.
    """

    def __init__(
        self,
        defaults: Mapping[str, tuple[float, float, float, float]],
        *,
        arrival: ArrivalRate | None = None,
        mix_half_life_s: float = mix.HALF_LIFE_S,
        mix_concentration: float = mix.CONCENTRATION,
        min_samples: int = service_model.MIN_SAMPLES,
        per_type_slopes: bool = False,
        forgetting: float = service.FORGETTING,
    ) -> None:
        if not defaults:
            raise ValueError("defaults: at least one type is required")
        names: Sequence[str] = tuple(defaults)
        self.names = names
        self.arrival = arrival if arrival is not None else ArrivalRate()
        self.mix: TypeMix = TypeMix(names, half_life_s=mix_half_life_s, concentration=mix_concentration,
                           prior=[defaults[n][0] for n in names])  # fmt: skip
        self.service = ServiceModel({n: defaults[n][1:] for n in names}, min_samples=min_samples,
                                    per_type_slopes=per_type_slopes, forgetting=forgetting)  # fmt: skip
        self._last = 0.0
        self._last_served = -math.inf

    def arrived(self, name: str, *, now: float) -> None:
        """A request of type ``name`` arrived (checked before any state changes)."""
        if name not in self.mix.names:
            raise ValueError(f"type: unknown type {name!r} (known: {', '.join(self.names)})")
        self.arrival.update(now=now)
        self.mix.update(name, now=now)
        self._last = max(self._last, now)

    def served(
        self,
        name: str,
        *,
        prompt_tokens: float,
        completion_tokens: float,
        service_time: float,
        cached_tokens: float = 0,
        now: float,
    ) -> None:
        """A request of type ``name`` finished at ``now``: feed the service model.

        Requests finish in any order and their stamps are taken independently, so the service
        model sees the latest stamp so far (as :meth:`arrived` does).
        """
        now = max(now, self._last_served)
        self.service.update(name, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            service_time=service_time, cached_tokens=cached_tokens, now=now)  # fmt: skip
        self._last_served = now

    def snapshot(self, now: float | None = None) -> Snapshot:
        """Rate (decayed to ``now``, after the detector's fall test at ``now``: a silence is
        evidence too), priors and per-type service parameters."""
        now = self._last if now is None else now
        self.arrival.check(now)
        rate = self.arrival.get(now)
        recent = self.arrival.recent(now)
        priors = self.mix.get(now)
        service = self.service.get()
        types = []
        for name, prior in zip(self.names, priors.tolist(), strict=True):
            s = service[name]
            types.append(TypeEstimate(name, prior, s.overhead_s, s.per_token_s, s.variance_s2, s.samples, s.fitted))
        return Snapshot(
            now, rate.rate, rate.stderr, rate.events, self.arrival.changes, self.arrival.last_change, tuple(types),
            recent.rate, recent.stderr,
        )  # fmt: skip
