"""Type mix: time-decayed counts with Dirichlet smoothing."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from thinkcap.estimators._decay import check_half_life, check_time, decay_factor

#: Default memory of the mix, seconds, and weight of the configured priors in pseudo-counts.
HALF_LIFE_S = 300.0
CONCENTRATION = 5.0

#: The scaled counts are renormalised once their scale factor exceeds this.
RESCALE_ABOVE = 1e100


class TypeMix:
    """Probabilities of the task types from decayed counts, smoothed towards a prior.

    Parameters
    ----------
    names
        The known type names; an unknown name is an error, never a new type.
    half_life_s
        Memory of the counts, seconds (``inf``: plain counts).
    concentration
        Dirichlet pseudo-count spread over the types by ``prior`` (the configured mix).
    prior
        Prior probabilities (default uniform); also the answer before any observation.

    Notes
    -----
    ``pi_k = (n_k + a q_k) / (sum n + a)`` with decayed counts ``n_k``, concentration
    ``a`` and prior ``q``. Every type keeps at least ``a q_k / (sum n + a)``; the
    probabilities always sum to one.

    Examples
    --------
    >>> mix = TypeMix(["math", "chat"], half_life_s=float("inf"), concentration=0.0)
    >>> for t in ["math", "math", "chat", "math"]:
    ...     mix.update(t, now=0.0)
    >>> mix.get().tolist()
    [0.75, 0.25]
    """

    def __init__(
        self,
        names: Sequence[str] = ("default",),
        half_life_s: float = HALF_LIFE_S,
        concentration: float = CONCENTRATION,
        prior: Sequence[float] | None = None,
    ) -> None:
        names = tuple(names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"names: need at least one name and no duplicates, got {list(names)}")
        self.names = names
        self.half_life_s = check_half_life("half_life_s", half_life_s)
        if not (isinstance(concentration, int | float) and math.isfinite(concentration) and concentration >= 0):
            raise ValueError(f"concentration: must be a finite number >= 0, got {concentration!r}")
        self.concentration = float(concentration)
        q = np.full(len(names), 1.0 / len(names)) if prior is None else np.asarray(prior, dtype=float)
        if q.shape != (len(names),) or not np.all(np.isfinite(q)) or np.any(q <= 0):
            raise ValueError(f"prior: must be {len(names)} positive numbers, got {prior!r}")
        self.prior = q / q.sum()
        self._index = {n: k for k, n in enumerate(names)}
        # Counts are stored scaled by 2^((t - t_ref) / half_life): an update adds one scaled
        # weight to one entry (O(1)) and reading divides the scale out.
        self._scaled = [0.0] * len(names)
        self._t_ref: float | None = None
        self._last: float | None = None

    def update(self, name: str, *, now: float) -> None:
        """Record one request of type ``name`` at time ``now``."""
        k = self._index.get(name)
        if k is None:
            raise ValueError(f"type: unknown type {name!r} (known: {', '.join(self.names)})")
        now = check_time(now, self._last)
        self._last = now
        if self._t_ref is None:
            self._t_ref = now
        weight = 1.0 / decay_factor(now - self._t_ref, self.half_life_s)
        if weight > RESCALE_ABOVE:  # fold the scale into the counts before it overflows
            self._scaled = [c / weight for c in self._scaled]
            self._t_ref, weight = now, 1.0
        self._scaled[k] += weight

    def counts(self, now: float | None = None) -> NDArray[np.float64]:
        """Decayed counts per type at ``now`` (default: the last update)."""
        if self._last is None or self._t_ref is None:
            return np.zeros(len(self.names))
        now = self._last if now is None else check_time(now, self._last)
        return np.asarray(self._scaled) * decay_factor(now - self._t_ref, self.half_life_s)

    def get(self, now: float | None = None) -> NDArray[np.float64]:
        """Probabilities at ``now`` (default: the last update), in the order of ``names``.

        The counts decay between updates while the prior's pseudo-counts do not, so after a
        silence the mix moves back towards the prior.
        """
        counts = self.counts(now)
        total = float(counts.sum()) + self.concentration
        if total <= 0.0:
            prior: NDArray[np.float64] = self.prior.copy()
            return prior
        out: NDArray[np.float64] = (counts + self.concentration * self.prior) / total
        return out
