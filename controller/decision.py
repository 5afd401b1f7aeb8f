"""One decision of the control loop, pure: solve, round to a cap table, whether to publish it,
how much to admit in overload, and the problem as the record a ``decision`` event logs (which
``thinkcap audit`` replays).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from thinkcap.controller.methods import DEFAULT_METHOD, solve
from thinkcap.controller.problem import Array, Problem, TaskType
from thinkcap.controller.queue import queue_from_record
from thinkcap.controller.result import SolveResult, Status
from thinkcap.controller.rounding import Rounded, round_caps

#: Fields of a task type written into each decision record (enough to rebuild the problem).
TYPE_FIELDS = (
    "name",
    "prior",
    "weight",
    "accuracy_base",
    "accuracy_gain",
    "accuracy_rate",
    "overhead_s",
    "per_token_s",
    "variance_s2",
    "min_tokens",
    "max_tokens",
)


@dataclass(frozen=True)
class Decision:
    """A solve and the integer caps taken from it.

    ``usable`` is false when the solver failed or returned a non-finite allocation; the caps
    are then the minimum ones, as they are in overload.
    """

    result: SolveResult
    rounded: Rounded
    usable: bool

    def caps(self, names: tuple[str, ...]) -> dict[str, int]:
        """The integer caps by type name."""
        return {name: int(c) for name, c in zip(names, self.rounded.caps, strict=True)}


def decide(
    p: Problem, *, method: str = DEFAULT_METHOD, x0: Array | None = None, rounding: str = "neighbour"
) -> Decision:
    """Solve ``p`` (warm-started at ``x0``) and round to integer caps inside F.

    In overload (no stable allocation) the caps are the minimum ones.

    Examples
    --------
    >>> from thinkcap.controller import TaskType
    >>> t = TaskType("chat", prior=1.0, accuracy_base=0.2, accuracy_gain=0.7, accuracy_rate=0.01,
    ...              overhead_s=0.1, per_token_s=0.002, min_tokens=0, max_tokens=512)
    >>> d = decide(Problem((t,), arrival_rate=2.0, latency_penalty=0.1))
    >>> d.usable, d.result.status.name, d.caps(("chat",))["chat"] > 0
    (True, 'CONVERGED', True)
    """
    result = solve(p, method=method, x0=x0)
    usable = result.status != Status.FAILED and bool(np.all(np.isfinite(result.x)))
    x = p.lo.astype(float) if result.status == Status.OVERLOAD or not usable else result.x
    return Decision(result, round_caps(p, x, method=rounding), usable)


def should_publish(
    p: Problem,
    new: Mapping[str, int],
    old: Mapping[str, int],
    *,
    overload: bool,
    hysteresis_tokens: int,
    hysteresis_relative: float,
    hysteresis_latency: float,
    rate_band: tuple[float, float] | None = None,
) -> bool:
    """Whether to replace the caps in force ``old`` by ``new``.

    Yes when some cap moves by more than ``max(hysteresis_tokens, hysteresis_relative x old)``
    and, given the arrival rate's confidence band ``rate_band`` (low, high), the new caps'
    objective is at least the old ones' at both ends of it: a move the rate's noise alone
    asks for (the old caps were chosen for a rate still inside the band) is held, or the caps
    follow the noise and the load pays for the swings. Also yes in overload when the minimum
    caps differ from those in force; and when the caps in force give a predicted mean system
    time more than ``hysteresis_latency`` (a fraction) above the new caps'. The hysteresis
    spares churn; it must not hold caps under which the model says a queue builds up, as
    small caps under a rising load do when they move by fewer tokens than the threshold.
    """
    moved = any(abs(new[n] - old[n]) > max(hysteresis_tokens, hysteresis_relative * old[n]) for n in new)
    if moved and (rate_band is None or overload or _pays_across(p, new, old, rate_band)):
        return True
    if overload:
        return any(new[n] != old[n] for n in new)
    t_new = p.metrics(np.array([new[n] for n in p.names], dtype=float)).mean_system_time
    t_old = p.metrics(np.array([old[n] for n in p.names], dtype=float)).mean_system_time
    return bool(t_old > (1 + hysteresis_latency) * t_new)


def _pays_across(p: Problem, new: Mapping[str, int], old: Mapping[str, int], band: tuple[float, float]) -> bool:
    """Whether the caps ``new`` score at least ``old`` at both arrival rates of ``band``."""
    x_new = np.array([new[n] for n in p.names], dtype=float)
    x_old = np.array([old[n] for n in p.names], dtype=float)
    for rate in band:
        q = p.with_arrival_rate(max(float(rate), 0.0))
        if not q.objective(x_new) >= q.objective(x_old):  # -inf ties: neither is stable there
            return False
    return True


def load_at_min_caps(p: Problem) -> float:
    """The server's load with every cap at its minimum: above ``rho_max`` is overload."""
    return float(p.kappa * (p.prior @ (p.t0 + p.c * p.lo))) + p.rho0


def admit_fraction(p: Problem, shed_release: float, *, rate: float | None = None) -> float:
    """The share of arrivals to admit in overload: what brings the load at the minimum caps
    down to ``shed_release x rho_max`` (at arrival rate ``rate``; default: the problem's)."""
    load = load_at_min_caps(p)
    if rate is not None and p.arrival_rate > 0:
        load *= rate / p.arrival_rate
    return min(1.0, shed_release * p.rho_max / load) if load > 0 else 1.0


def problem_record(p: Problem) -> dict[str, Any]:
    """Every input of ``p``, as JSON (floats round-trip exactly)."""
    return {
        "arrival_rate": p.arrival_rate,
        "latency_penalty": p.latency_penalty,
        "rho_max": p.rho_max,
        "queue": p.queue.record(),
        "types": [{k: getattr(t, k) for k in TYPE_FIELDS} for t in p.types],
    }


def problem_from_record(record: Mapping[str, Any]) -> Problem:
    """The problem :func:`problem_record` wrote (a record without a queue, from before batching
    engines, is M/G/1)."""
    types = tuple(TaskType(**{k: t[k] for k in TYPE_FIELDS}) for t in record["types"])
    queue = queue_from_record(record.get("queue"))
    return Problem(types, record["arrival_rate"], record["latency_penalty"], record["rho_max"], queue)
