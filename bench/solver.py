"""Solver benchmark: median solve time per method and size, against scipy's SLSQP.

Run: .venv/bin/python bench/solver.py [--quick] [--kernels] [--batching]

Random instances (sim.instances.random_problem) at three loads: light, heavy and
margin-active. Times are medians over instances of the median over repeats of one cold
solve (no warm start). SLSQP (analytic gradient, variables scaled by max_tokens) runs in
the same process on the same instances for N <= 64; the objective gap is
U(method) - U(SLSQP), positive when the method is better. A second table is the rounding
study: relative loss (U(x*) - U(caps)) / |U(x*)| of nearest rounding and of the
neighbour search over many instances. ``--kernels`` instead times the exact method with
each of its per-type kernels (Python floats, numpy) forced, to place
``controller.sweep.SCALAR_MAX_TYPES``. ``--batching`` gives every instance a batching engine
(2 to 256 slots, log-uniform; ``sim.instances.random_engine``) instead of the M/G/1 queue.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import numpy as np
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinkcap.controller import Problem, SolveResult, Status, exact, fixed_point, projected_gradient, round_caps
from thinkcap.sim.instances import random_engine, random_problem

REGIMES = ("light", "heavy", "margin")
#: The iterative methods are slow by nature: fewer instances for them.
SLOW_INSTANCES = {"fixed_point": 10, "projected_gradient": 5}


def slsqp(p: Problem) -> tuple[np.ndarray, float]:
    """scipy SLSQP from lo with the analytic gradient; returns (x, U(x))."""
    scale = np.maximum(p.hi, 1.0)
    a = p.kappa * p.prior * p.c * scale

    def f(u: np.ndarray) -> float:
        val = p.objective(u * scale)
        return -val if np.isfinite(val) else 1e6

    cons = {"type": "ineq", "fun": lambda u: p.rho_max - p.kappa * p.moments(u * scale)[0], "jac": lambda u: -a}
    r = minimize(f, p.lo / scale, jac=lambda u: -p.gradient(u * scale) * scale, method="SLSQP",
                 bounds=list(zip(p.lo / scale, p.hi / scale, strict=True)), constraints=[cons],
                 options={"ftol": 1e-12, "maxiter": 1000})  # fmt: skip
    x = np.clip(r.x * scale, p.lo, p.hi)
    return x, p.objective(x) if p.is_feasible(x, atol=1e-9) else -np.inf


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the last result."""
    times = []
    out: object = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def instance(seed: int, n: int, regime: str, batching: bool) -> Problem:
    """One random instance; with ``batching`` on its own random engine."""
    queue = random_engine(np.random.default_rng(seed)) if batching else None
    return random_problem(seed, n, regime, queue=queue)


def speed_table(
    sizes: list[int], instances: int, repeats: int, only: list[str] | None = None, batching: bool = False
) -> None:
    methods: dict[str, Callable[[Problem], SolveResult]] = {
        "exact": exact,
        "fixed_point": fixed_point,
        "projected_gradient": projected_gradient,
    }
    if only:
        methods = {k: v for k, v in methods.items() if k in only}
    limits = {"exact": 1 << 30, "fixed_point": 1024, "projected_gradient": 64}
    head = "| N | load | method | median time | max time | iterations (median) | limit stops"
    print(head + " | gap vs SLSQP (min) | speed-up vs SLSQP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for regime in REGIMES:
            problems = [instance(1000 * n + k, n, regime, batching) for k in range(instances)]
            ref_t: list[float] = []
            ref_u: list[float] = []
            if n <= 64:
                for p in problems:
                    t, (_, u) = timed(lambda p=p: slsqp(p), max(1, repeats // 4))  # type: ignore[misc]
                    ref_t.append(t)
                    ref_u.append(u)
                med_ref = fmt_time(statistics.median(ref_t))
                print(f"| {n} | {regime} | SLSQP | {med_ref} | {fmt_time(max(ref_t))} | | | | |")
            for name, fn in methods.items():
                if n > limits[name]:
                    continue
                reps = repeats if name == "exact" else 1
                ts, its, gaps, stops = [], [], [], 0
                for k, p in enumerate(problems[: SLOW_INSTANCES.get(name, len(problems))]):
                    t, r = timed(lambda p=p, fn=fn: fn(p), reps)  # type: ignore[misc]
                    assert isinstance(r, SolveResult)
                    ts.append(t)
                    its.append(r.nit)
                    stops += r.status is Status.MAXITER
                    if ref_u:
                        gaps.append(r.fun - ref_u[k])
                med = statistics.median(ts)
                gap = f"{min(gaps):+.1e}" if gaps else ""
                speed = f"{statistics.median(ref_t) / med:.0f}x" if ref_t else ""
                cells = [str(n), regime, name, fmt_time(med), fmt_time(max(ts)), f"{statistics.median(its):.0f}"]
                print("| " + " | ".join([*cells, str(stops), gap, speed]) + " |")
            sys.stdout.flush()


def rounding_table(count: int, batching: bool = False) -> None:
    print()
    print("| load | rounding | instances | median rel. loss | p99 rel. loss | max rel. loss | loss > bound |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for regime in REGIMES:
        losses: dict[str, list[float]] = {"nearest": [], "neighbour": []}
        over = {"nearest": 0, "neighbour": 0}
        for k in range(count):
            p = instance(50_000 + k, int(rng.integers(1, 41)), regime, batching)
            r = exact(p)
            for method, vals in losses.items():
                rd = round_caps(p, r.x, method=method)
                vals.append(max(rd.loss, 0.0) / abs(r.fun))
                over[method] += rd.loss > rd.bound
        for method, vals in losses.items():
            a = np.array(vals)
            print(f"| {regime} | {method} | {a.size} | {np.median(a):.1e} | {np.quantile(a, 0.99):.1e} | {a.max():.1e}"
                  f" | {over[method]} |")  # fmt: skip


def kernel_table(sizes: list[int], instances: int, repeats: int) -> None:
    """Median exact solve time with each per-type kernel forced: where the scalar one stops paying."""
    print("| N | load | scalar kernel | numpy kernel | numpy / scalar |")
    print("|---|---|---|---|---|")
    for n in sizes:
        for regime in REGIMES:
            problems = [random_problem(7000 * n + k, n, regime) for k in range(instances)]
            med = {}
            for kernel in ("scalar", "array"):
                ts = [timed(lambda p=p, kernel=kernel: exact(p, kernel=kernel), repeats)[0] for p in problems]  # type: ignore[misc]
                med[kernel] = statistics.median(ts)
            ratio = med["array"] / med["scalar"]
            print(f"| {n} | {regime} | {fmt_time(med['scalar'])} | {fmt_time(med['array'])} | {ratio:.2f} |")
            sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer instances and sizes (a smoke run)")
    ap.add_argument("--sizes", default="8,64,1024,16384", help="comma-separated N")
    ap.add_argument("--only", help="comma-separated methods (default: all)")
    ap.add_argument("--no-rounding", action="store_true", help="skip the rounding study")
    ap.add_argument("--kernels", action="store_true", help="only compare the exact method's two kernels")
    ap.add_argument("--batching", action="store_true", help="batching engines (2-256 slots) instead of M/G/1")
    ap.add_argument("--instances", type=int, default=20, help="instances per size and load")
    ap.add_argument("--out", type=Path, help="also append the tables to this file (docs/benchmarks/solver.md)")
    args = ap.parse_args()
    if args.out is None:
        run(args)
        return
    with args.out.open("a") as out, contextlib.redirect_stdout(Tee(sys.stdout, out)):
        shown = [a for a in sys.argv[1:] if a not in ("--out", str(args.out))]
        print(f"\n`{' '.join(['.venv/bin/python bench/solver.py', *shown])}`:\n")
        run(args)


class Tee(io.TextIOBase):
    """Writes go to every stream given."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def run(args: argparse.Namespace) -> None:
    if args.kernels:
        kernel_table([1, 4, 8, 16, 24, 32, 48, 64], instances=10, repeats=21)
        return
    only = args.only.split(",") if args.only else None
    if args.quick:
        speed_table([8, 64], instances=3, repeats=3, only=only, batching=args.batching)
        rounding_table(50, args.batching)
        return
    speed_table([int(n) for n in args.sizes.split(",")], args.instances, repeats=21, only=only, batching=args.batching)
    if not args.no_rounding:
        rounding_table(2000, args.batching)


if __name__ == "__main__":
    main()
