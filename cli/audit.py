"""``thinkcap audit LOG.jsonl``: replay every decision through the solver and summarise.

Each ``decision`` event carries every input of its solve; the replay rebuilds the problem,
solves it with the same method and warm start, rounds it, and compares status and integer
caps exactly and continuous caps to a relative 1e-6. Corrupt or truncated lines are
reported with their line number and skipped.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from thinkcap.cli.json_lines import BadLine, read_objects
from thinkcap.controller import decide, problem_from_record

CONTINUOUS_RTOL = 1e-6


@dataclass
class AuditReport:
    """What the replay found and the summary of the log."""

    decisions: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    published: list[dict[str, Any]] = field(default_factory=list)
    intervals: list[dict[str, Any]] = field(default_factory=list)
    overload_periods: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "decisions": self.decisions,
            "mismatches": self.mismatches,
            "bad_lines": self.bad_lines,
            "requests": self.requests,
            "caps_over_time": self.published,
            "intervals": self.intervals,
            "overload_periods": self.overload_periods,
        }


def read_events(path: str, report: AuditReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, event)`` for every parsable JSON object line; the rest are reported."""
    for item in read_objects(path):
        if isinstance(item, BadLine):
            report.bad_lines.append({"line": item.number, "error": item.error})
        else:
            yield item


def replay(event: dict[str, Any]) -> str | None:
    """``None`` if the decision replays identically, else what differs."""
    p = problem_from_record(event["inputs"])
    x0 = None if event.get("x0") is None else np.asarray(event["x0"], dtype=float)
    decision = decide(p, method=event["method"], x0=x0)
    result, caps = decision.result, decision.caps(p.names)
    if result.status.name.lower() != event["status"]:
        return f"status {result.status.name.lower()} != logged {event['status']}"
    if caps != event["caps"]:
        return f"integer caps {caps} != logged {event['caps']}"
    for name, x in zip(p.names, result.x, strict=True):
        logged = event["caps_continuous"][name]
        if not math.isclose(float(x), logged, rel_tol=CONTINUOUS_RTOL, abs_tol=1e-9):
            return f"continuous cap of {name} {float(x)!r} != logged {logged!r}"
    return None


def audit(path: str) -> AuditReport:
    """Replay and summarise one log."""
    report = AuditReport()
    decisions: list[dict[str, Any]] = []
    requests: list[tuple[float, float]] = []
    for number, event in read_events(path, report):
        kind = event.get("event")
        if kind == "decision":
            try:
                why = replay(event)
            except (KeyError, TypeError, ValueError) as exc:
                report.bad_lines.append({"line": number, "error": f"decision not replayable: {exc}"})
                continue
            report.decisions += 1
            decisions.append(event)
            if why is not None:
                report.mismatches.append({"line": number, "decision_id": event.get("decision_id"), "why": why})
            if event.get("published"):
                report.published.append(
                    {"time": event["time"], "decision_id": event["decision_id"], "caps": event["caps"]}
                )
        elif kind == "request":
            report.requests += 1
            t, s = event.get("arrival_time"), event.get("system_time_s")
            if event.get("status") == 200 and isinstance(t, int | float) and isinstance(s, int | float):
                requests.append((float(t), float(s)))
    _intervals(report, decisions, requests)
    return report


def _intervals(report: AuditReport, decisions: list[dict[str, Any]], requests: list[tuple[float, float]]) -> None:
    decisions.sort(key=lambda e: e["time"])
    arrivals = np.array([t for t, _ in requests])
    times = np.array([s for _, s in requests])
    order = np.argsort(arrivals)
    arrivals, times = arrivals[order], times[order]
    over: dict[str, Any] | None = None
    for i, d in enumerate(decisions):
        start = d["time"]
        end = decisions[i + 1]["time"] if i + 1 < len(decisions) else math.inf
        lo, hi = np.searchsorted(arrivals, start), np.searchsorted(arrivals, end)
        observed = float(times[lo:hi].mean()) if hi > lo else None
        square = float((times[lo:hi] ** 2).mean()) if hi > lo else None
        report.intervals.append(
            {
                "decision_id": d["decision_id"],
                "start": start,
                "status": d["status"],
                "arrival_rate": d["inputs"]["arrival_rate"],
                "caps": d["caps_in_force"] if "caps_in_force" in d else d["caps"],
                "predicted_mean_system_time": d.get("predicted_mean_system_time"),
                "observed_mean_system_time": observed,
                "observed_mean_square_system_time": square,  # the observed mean's spread
                "requests": int(hi - lo),
            }
        )
        if d["status"] == "overload" and over is None:
            over = {"start": start, "end": None}
        elif d["status"] != "overload" and over is not None:
            over["end"] = start
            report.overload_periods.append(over)
            over = None
    if over is not None:
        report.overload_periods.append(over)


def render(report: AuditReport) -> str:
    """A readable summary."""
    lines = [
        f"decisions replayed  {report.decisions}, mismatches {len(report.mismatches)}",
        f"requests in log     {report.requests}",
        f"unreadable lines    {len(report.bad_lines)}",
    ]
    for m in report.mismatches:
        lines.append(f"  MISMATCH line {m['line']} ({m['decision_id']}): {m['why']}")
    for b in report.bad_lines:
        lines.append(f"  line {b['line']}: {b['error']}")
    if report.intervals:
        t0 = report.intervals[0]["start"]
        lines.append("")
        lines.append(f"{'t (s)':>8} {'status':>9} {'rate/s':>7} {'pred T':>8} {'obs T':>8} {'n':>5}  caps")

        def f(x: float | None) -> str:
            return f"{x:8.3f}" if x is not None else f"{'-':>8}"

        for iv in report.intervals:
            caps = " ".join(f"{k}={v}" for k, v in iv["caps"].items())
            lines.append(
                f"{iv['start'] - t0:8.1f} {iv['status']:>9} {iv['arrival_rate']:7.2f} "
                f"{f(iv['predicted_mean_system_time'])} {f(iv['observed_mean_system_time'])} "
                f"{iv['requests']:5d}  {caps}"
            )
    t0 = report.intervals[0]["start"] if report.intervals else 0.0
    for p in report.overload_periods:
        end = "to the end of the log" if p["end"] is None else f"for {p['end'] - p['start']:.1f} s"
        lines.append(f"overload from t={p['start'] - t0:.1f} s {end}")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """Register ``audit``."""
    sp = sub.add_parser("audit", help="replay the decisions of a proxy log and summarise them")
    sp.add_argument("log", help="JSON-lines log written by thinkcap serve or thinkcap demo")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``thinkcap audit``: exit 1 when a decision does not replay, else 0."""
    try:
        report = audit(args.log)
    except OSError as exc:
        raise ValueError(f"{args.log}: cannot be read: {exc.strerror}") from None
    print(json.dumps(report.as_dict()) if args.json else render(report))
    return 1 if report.mismatches else 0
