"""Per-type answer statistics: the answer length after the reasoning, and the share of a cap used."""

from __future__ import annotations

import math
from collections.abc import Sequence

from thinkcap.estimators._decay import check_time

#: Default weight of each new answer in the per-type means (about the last 20 answers count).
WEIGHT = 0.05
#: Floor of the tracked share of a cap that answers use: a type whose answers stop far below
#: their cap still keeps a service time the solver can trade against.
MIN_USED_SHARE = 0.05


class _TypeMean:
    """Exponentially weighted mean of one number per finished request, per type."""

    def __init__(self, names: Sequence[str], weight: float, initial: float) -> None:
        names = tuple(names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"names: need at least one name and no duplicates, got {list(names)}")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= 1:
            raise ValueError(f"weight: must be in (0, 1], got {weight!r}")
        self.names = names
        self.weight = float(weight)
        self.initial = float(initial)
        self._mean = dict.fromkeys(names, self.initial)
        self._count = dict.fromkeys(names, 0)
        self._last: float | None = None

    def _add(self, name: str, value: float, now: float) -> None:
        if name not in self._count:
            raise ValueError(f"type: unknown type {name!r} (known: {', '.join(self.names)})")
        now = check_time(now, self._last)
        self._last = now
        old = self._mean[name]
        # The first answer replaces the initial value; each later one moves the mean by
        # ``weight`` of the gap.
        self._mean[name] = value if self._count[name] == 0 else old + self.weight * (value - old)
        self._count[name] += 1

    def get(self, now: float | None = None) -> dict[str, float]:
        """The mean of every type seen so far at ``now`` (default: the last update).

        The mean forgets per answer, not per second, so it does not change between updates.
        A type with no answer yet has the initial value.
        """
        if now is not None:
            check_time(now, self._last)
        return dict(self._mean)

    def count(self, name: str) -> int:
        """Answers seen for type ``name``."""
        return self._count[name]


class AnswerLength(_TypeMean):
    """Mean answer tokens after the reasoning, per type.

    Parameters
    ----------
    names
        The known type names; an unknown name is an error.
    weight
        Weight of each new answer in the mean (1: the last answer only).
    initial
        The mean of a type before its first answer (which then replaces it).

    Notes
    -----
    ``m <- m + weight (tokens - m)``, starting from the first answer. Where a cap bounds the
    reasoning alone, these tokens come on top of it and the controller adds them to the
    type's overhead.

    Examples
    --------
    >>> est = AnswerLength(["math"], weight=0.5)
    >>> for i, tokens in enumerate([100, 50, 50]):
    ...     est.update("math", tokens, now=float(i))
    >>> est.get()
    {'math': 62.5}
    """

    def __init__(self, names: Sequence[str] = ("default",), weight: float = WEIGHT, initial: float = 0.0) -> None:
        if isinstance(initial, bool) or not isinstance(initial, int | float) or not 0 <= initial < math.inf:
            raise ValueError(f"initial: must be a finite number >= 0, got {initial!r}")
        super().__init__(names, weight, initial)

    def update(self, name: str, tokens: float, *, now: float) -> None:
        """Record one answer of type ``name`` with ``tokens`` tokens after its reasoning."""
        if isinstance(tokens, bool) or not isinstance(tokens, int | float) or not math.isfinite(tokens) or tokens < 0:
            raise ValueError(f"tokens: must be a finite number >= 0, got {tokens!r}")
        self._add(name, float(tokens), now)


class UsedShare(_TypeMean):
    """Mean share of its token limit a type's answers use, between ``floor`` and 1.

    Parameters
    ----------
    names
        The known type names; an unknown name is an error.
    weight
        Weight of each new answer in the mean (1: the last answer only).
    floor
        Smallest share recorded for one answer.
    initial
        The share of a type before its first answer (which then replaces it): 1, the whole
        cap, until answers show otherwise.

    Notes
    -----
    Each answer contributes ``min(1, max(floor, used / limit))`` (1 where the limit is 0) to
    ``m <- m + weight (share - m)``. The controller scales a type's per-token time by it:
    a cap of ``l`` costs about ``share * l`` tokens.

    Examples
    --------
    >>> est = UsedShare(["math"], weight=1.0)
    >>> est.update("math", used=30, limit=120, now=0.0)
    >>> est.get()
    {'math': 0.25}
    """

    def __init__(
        self,
        names: Sequence[str] = ("default",),
        weight: float = WEIGHT,
        floor: float = MIN_USED_SHARE,
        initial: float = 1.0,
    ) -> None:
        for key, value in (("floor", floor), ("initial", initial)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ValueError(f"{key}: must be in [0, 1], got {value!r}")
        super().__init__(names, weight, initial)
        self.floor = float(floor)

    def update(self, name: str, *, used: float, limit: float, now: float) -> None:
        """Record one answer of type ``name`` that used ``used`` of its ``limit`` tokens."""
        for key, value in (("used", used), ("limit", limit)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{key}: must be a finite number >= 0, got {value!r}")
        share = min(1.0, max(self.floor, used / limit)) if limit > 0 else 1.0
        self._add(name, share, now)
