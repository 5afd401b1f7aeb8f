"""``thinkcap solve``: the offline allocation table for a config."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from thinkcap.controller import DEFAULT_METHOD, METHODS, Problem, Rounded, SolveResult, decide
from thinkcap.controller.queue import BatchingEngine
from thinkcap.proxy.logs import finite_all
from thinkcap.proxy.model_file import ModelConfig, load_model


@dataclass(frozen=True)
class Allocation:
    """One solve plus its rounding and timing, ready to print."""

    problem: Problem
    result: SolveResult
    rounded: Rounded
    solve_time_s: float

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (non-finite numbers become ``null``)."""
        p, r, caps = self.problem, self.result, self.rounded.caps.astype(float)
        q = p.metrics(caps)
        acc = p.accuracy(caps)
        svc = p.service_times(caps)
        out: dict[str, Any] = finite_all(
            {
                "status": r.status.name.lower(),
                "message": r.message,
                "method": r.method,
                "arrival_rate": p.arrival_rate,
                "latency_penalty": p.latency_penalty,
                "rho_max": p.rho_max,
                "queue": p.queue.record(),
                "occupancy": q.occupancy,
                "objective": self.rounded.fun,
                "objective_continuous": r.fun,
                "rho": q.rho,
                "mean_wait": q.mean_wait,
                "mean_system_time": q.mean_system_time,
                "mean_accuracy": p.mean_accuracy(caps),
                "iterations": r.nit,
                "function_evaluations": r.nfev,
                "residual": r.residual,
                "multiplier": r.multiplier,
                "contraction": r.contraction,
                "solve_time_s": self.solve_time_s,
                "rounding": {"method": self.rounded.method, "loss": self.rounded.loss, "bound": self.rounded.bound},
                "types": [
                    {
                        "name": name,
                        "prior": float(p.prior[k]),
                        "tokens": int(self.rounded.caps[k]),
                        "tokens_continuous": float(r.x[k]),
                        "accuracy": float(acc[k]),
                        "service_time": float(svc[k]),
                    }
                    for k, name in enumerate(p.names)
                ],
            }
        )
        return out


def allocate(problem: Problem, method: str = DEFAULT_METHOD, rounding: str = "neighbour") -> Allocation:
    """:func:`thinkcap.controller.decide`, timed."""
    start = time.perf_counter()
    decision = decide(problem, method=method, rounding=rounding)
    elapsed = time.perf_counter() - start
    return Allocation(problem, decision.result, decision.rounded, elapsed)


def _fmt(value: float, spec: str) -> str:
    if math.isfinite(value):
        return format(value, spec)
    width = "".join(ch for ch in spec.split(".", maxsplit=1)[0] if ch.isdigit())
    text = "n/a" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return format(text, f">{width or 0}")


def describe_queue(p: Problem) -> str:
    """One line naming the queue model."""
    q = p.queue
    if isinstance(q, BatchingEngine):
        measured = ""
        if q.step_levels_s:
            levels = ", ".join(f"{v * 1e3:g}" for v in q.step_levels_s)
            measured = f", measured {levels} ms at 1-{len(q.step_levels_s)}"
        return (
            f"batching engine, {q.slots} slots, step {q.step_base_s * 1e3:g} ms + {q.step_per_seq_s * 1e3:g} ms"
            f" per sequence{measured} (full batch {q.step_time(q.slots) * 1e3:g} ms)"
        )
    return "M/G/1 (one request at a time)"


def render_table(a: Allocation) -> str:
    """The human-readable allocation table."""
    d = a.as_dict()
    p = a.problem
    caps = a.rounded.caps.astype(float)
    q = p.metrics(caps)
    width = max(4, *(len(n) for n in p.names))
    lines = [
        f"{'type':<{width}}  {'prior':>7}  {'tokens':>7}  {'continuous':>11}  {'accuracy':>8}  {'service_s':>9}",
    ]
    for t in d["types"]:
        lines.append(
            f"{t['name']:<{width}}  {t['prior']:>7.4f}  {t['tokens']:>7d}  {t['tokens_continuous']:>11.3f}"
            f"  {t['accuracy']:>8.4f}  {t['service_time']:>9.4f}"
        )
    r = a.result
    lines += [
        "",
        f"arrival rate      {p.arrival_rate:g} /s   (latency penalty {p.latency_penalty:g}, rho_max {p.rho_max:g})",
        f"queue model       {describe_queue(p)}",
        f"rho               {_fmt(q.rho, '.4f')}"
        + ("   (of the full batch's throughput)" if p.queue.slots > 1 else ""),
        f"in service        {_fmt(q.occupancy, '.3f')}   (mean requests running, E[min(N, slots)])",
        f"mean wait         {_fmt(q.mean_wait, '.4f')} s",
        f"mean system time  {_fmt(q.mean_system_time, '.4f')} s",
        f"mean accuracy     {p.mean_accuracy(caps):.4f}",
        f"objective         {_fmt(a.rounded.fun, '.6f')}   (continuous {_fmt(r.fun, '.6f')})",
        f"rounding loss     {_fmt(a.rounded.loss, '.2e')}   (a-priori bound {_fmt(a.rounded.bound, '.2e')})",
        f"status            {r.status.name.lower()}: {r.message}",
        f"method            {r.method}, {r.nit} iterations, {r.nfev} evaluations,"
        f" residual {_fmt(r.residual, '.1e')} tokens"
        + (f", margin price {r.multiplier:.4g}" if r.multiplier > 0 else ""),
        f"solve time        {a.solve_time_s * 1e3:.3f} ms",
    ]
    return "\n".join(lines)


def parse_sweep(text: str) -> np.ndarray:
    """``START:STOP:N`` to N evenly spaced arrival rates."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        start, stop, n = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP:N (e.g. 0.5:8:16), got {text!r}") from None
    if n < 1 or start < 0 or stop < start or not math.isfinite(stop):
        raise argparse.ArgumentTypeError(f"need 0 <= START <= STOP and N >= 1, got {text!r}")
    return np.linspace(start, stop, n)


def render_sweep(rows: list[Allocation]) -> str:
    """How the caps shrink as the load grows: one row per arrival rate."""
    names = rows[0].problem.names
    cols = [max(6, len(n)) for n in names]
    head = f"{'rate':>8}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, cols, strict=True))
    head += f"  {'rho':>6}  {'busy':>6}  {'E[T]_s':>8}  {'accuracy':>8}  status"
    lines = [head]
    for a in rows:
        caps = a.rounded.caps
        q = a.problem.metrics(caps.astype(float))
        cells = "  ".join(f"{int(c):>{w}d}" for c, w in zip(caps, cols, strict=True))
        lines.append(
            f"{a.problem.arrival_rate:>8.3f}  {cells}  {_fmt(q.rho, '6.3f')}  {_fmt(q.occupancy, '6.2f')}"
            f"  {_fmt(q.mean_system_time, '8.3f')}"
            f"  {a.problem.mean_accuracy(caps.astype(float)):>8.4f}  {a.result.status.name.lower()}"
        )
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """Register ``solve`` on the CLI's subparsers."""
    sp = sub.add_parser("solve", help="print the optimal caps for a config (offline)")
    sp.add_argument("config", help="thinkcap TOML config")
    sp.add_argument("--arrival-rate", type=float, help="override [workload].arrival_rate (requests/s)")
    sp.add_argument("--method", choices=sorted(METHODS), default=DEFAULT_METHOD)
    sp.add_argument("--rounding", choices=("nearest", "neighbour"), default="neighbour")
    sp.add_argument(
        "--sweep-arrival-rate", type=parse_sweep, metavar="START:STOP:N", help="solve at N rates from START to STOP"
    )
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``thinkcap solve``."""
    cfg: ModelConfig = load_model(args.config)
    if args.arrival_rate is not None and not (math.isfinite(args.arrival_rate) and args.arrival_rate >= 0):
        raise ValueError(f"--arrival-rate: must be a finite number >= 0, got {args.arrival_rate}")
    if args.sweep_arrival_rate is not None:
        rows = [allocate(cfg.problem(float(r)), args.method, args.rounding) for r in args.sweep_arrival_rate]
        print(json.dumps({"sweep": [a.as_dict() for a in rows]}) if args.json else render_sweep(rows))
        return 0
    a = allocate(cfg.problem(args.arrival_rate), args.method, args.rounding)
    print(json.dumps(a.as_dict()) if args.json else render_table(a))
    return 0
