"""Per-phase summaries of a load run: throughput, system-time percentiles, accuracy, objective."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from thinkcap.sim.loadgen import Record
from thinkcap.sim.scenario import LoadPhase


@dataclass(frozen=True)
class PhaseSummary:
    """What one phase of the schedule measured.

    ``objective`` is the measured counterpart of DESIGN.md's U: the mean of ``w_k x correct``
    over answered requests minus ``latency_penalty x`` their mean system time (``None`` when
    nothing was answered or correctness is unknown).
    """

    phase: int
    duration_s: float
    offered_rate: float
    sent: int
    answered: int
    shed: int
    errors: int
    throughput: float
    mean_s: float | None
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    accuracy: float | None
    objective: float | None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return asdict(self)


def _pct(x: np.ndarray[Any, Any], q: float) -> float | None:
    return float(np.percentile(x, q)) if x.size else None


def summarise_records(
    records: Sequence[Record],
    phases: Sequence[LoadPhase],
    *,
    weights: dict[str, float] | None = None,
    latency_penalty: float = 0.0,
) -> list[PhaseSummary]:
    """One :class:`PhaseSummary` per phase, from the records of that phase.

    ``latency_penalty`` is per wall-clock second (see :meth:`sim.scenario.Scenario.wall_penalty`).
    """
    weights = weights or {}
    out = []
    for k, ph in enumerate(phases):
        mine = [r for r in records if r.phase == k]
        ok = [r for r in mine if r.answered]
        times = np.array([r.system_time_s for r in ok], dtype=float)
        judged = [r for r in ok if r.correct is not None]
        accuracy = sum(bool(r.correct) for r in judged) / len(judged) if judged else None
        objective = None
        if judged and times.size:
            score = sum(weights.get(r.type, 1.0) * bool(r.correct) for r in judged) / len(judged)
            objective = score - latency_penalty * float(times.mean())
        out.append(
            PhaseSummary(
                phase=k,
                duration_s=ph.duration_s,
                offered_rate=ph.mean_rate,
                sent=len(mine),
                answered=len(ok),
                shed=sum(r.error == "shed" for r in mine),
                errors=sum(r.error not in (None, "shed") for r in mine),
                throughput=len(ok) / ph.duration_s,
                mean_s=float(times.mean()) if times.size else None,
                p50_s=_pct(times, 50),
                p95_s=_pct(times, 95),
                p99_s=_pct(times, 99),
                accuracy=accuracy,
                objective=objective,
            )
        )
    return out


def format_summary(rows: Sequence[PhaseSummary]) -> str:
    """A fixed-width table, one line per phase."""

    def f(x: float | None, spec: str) -> str:
        return "-" if x is None or not math.isfinite(x) else format(x, spec)

    head = (
        f"{'phase':>5} {'rate/s':>7} {'sent':>6} {'ok':>6} {'shed':>5} {'err':>5} {'thru/s':>7} "
        f"{'mean s':>8} {'p50 s':>8} {'p95 s':>8} {'p99 s':>8} {'acc':>6} {'U':>8}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.phase:>5} {r.offered_rate:>7.2f} {r.sent:>6} {r.answered:>6} {r.shed:>5} {r.errors:>5} "
            f"{r.throughput:>7.2f} {f(r.mean_s, '8.3f')} {f(r.p50_s, '8.3f')} {f(r.p95_s, '8.3f')} "
            f"{f(r.p99_s, '8.3f')} {f(r.accuracy, '6.3f')} {f(r.objective, '8.4f')}"
        )
    return "\n".join(lines)
