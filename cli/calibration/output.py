"""What a calibration run writes: the fits, the serve config and the plot."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thinkcap.cli.calibration.dataset import Item
from thinkcap.cli.calibration.runner import Result
from thinkcap.cli.toml_out import dumps
from thinkcap.estimators.calibration import CurveFit, ServiceFit, fit_curve, fit_service, fit_step, step_levels


@dataclass
class Calibration:
    """What the run measured and fitted."""

    curves: dict[str, CurveFit]
    service: dict[str, ServiceFit]
    prefill: dict[str, float]
    step: tuple[float, float] | None
    step_levels: tuple[float, ...]  # the mean gap at 1, 2, ... in service, as far as measured
    priors: dict[str, float]
    points: dict[str, list[tuple[int, int, int]]]  # per type: (cap, n, correct)
    requests: int
    errors: int


def fit_all(items: list[Item], results: list[Result], levels: Sequence[int], boot: int) -> Calibration:
    by_type: dict[str, dict[int, list[tuple[float, bool]]]] = {}
    ok = [r for r in results if r.error is None]
    for r in ok:
        by_type.setdefault(r.type, {}).setdefault(r.line, []).append((float(r.cap), r.correct))
    curves = {t: fit_curve(list(per.values()), boot=boot) for t, per in by_type.items()}
    alone = [r for r in ok if r.concurrency == min(levels)]
    service, prefill = {}, {}
    for t in by_type:
        rs = [r for r in alone if r.type == t] or [r for r in ok if r.type == t]
        service[t] = fit_service([r.tokens for r in rs], [r.seconds for r in rs])
        firsts = [r.first_token_s for r in rs if r.first_token_s is not None]
        prefill[t] = float(np.mean(firsts)) if firsts else 0.0
    step: tuple[float, float] | None = None
    per_level: tuple[float, ...] = ()
    if len(set(levels)) > 1:
        pairs = [g for r in ok for g in r.gaps]
        js, gaps = [j for j, _ in pairs], [g for _, g in pairs]
        if len({round(j) for j in js}) > 1:
            step = fit_step(js, gaps)
            per_level = step_levels(js, gaps)
    counts: dict[str, int] = {}
    for it in items:
        counts[it.type] = counts.get(it.type, 0) + 1
    total = sum(counts.values())
    points: dict[str, list[tuple[int, int, int]]] = {}
    for t, per in by_type.items():
        tally: dict[int, list[int]] = {}
        for outcomes in per.values():
            for cap, good in outcomes:
                c = tally.setdefault(int(cap), [0, 0])
                c[0] += 1
                c[1] += int(good)
        points[t] = [(cap, n, k) for cap, (n, k) in sorted(tally.items())]
    return Calibration(curves, service, prefill, step, per_level, {t: c / total for t, c in counts.items()}, points,
                       len(results), len(results) - len(ok))  # fmt: skip


def config_text(cal: Calibration, items: list[Item], args: argparse.Namespace, caps: Sequence[int]) -> str:
    """A whole ``thinkcap serve`` config, with what was measured in its comments."""
    slots = max(args.concurrency)
    backend: dict[str, Any] = {"url": args.backend, "dialect": args.dialect}
    if args.dialect == "llama-server":
        backend["thinks"] = args.thinks
    if slots > 1 and cal.step is not None:
        backend["slots"] = slots
        backend["step"] = {"base_s": round(cal.step[0], 6), "per_seq_s": round(cal.step[1], 6)}
        if len(cal.step_levels) > 1:
            backend["step"]["levels_s"] = [round(v, 6) for v in cal.step_levels]
    batching = "step" in backend
    types = []
    names = sorted(cal.curves, key=lambda t: -cal.priors.get(t, 0))
    for t in names:
        c = cal.curves[t]
        gain = max(c.gain, 1e-6)
        entry: dict[str, Any] = {
            "name": t,
            "prior": round(cal.priors[t], 6),
            "min_tokens": min(caps),
            "max_tokens": max(caps),
            "examples": [it.messages[-1]["content"] for it in items if it.type == t][:5],
            "accuracy": {"base": round(min(c.base, 1 - gain), 6), "gain": round(gain, 6), "rate": round(c.rate, 8)},
        }
        s = cal.service[t]
        if batching:
            entry["service"] = {"prefill_s": round(cal.prefill[t], 6)}
        else:
            entry["service"] = {"overhead_s": round(s.overhead_s, 6), "per_token_s": round(s.per_token_s, 8),
                                "variance_s2": round(s.variance_s2, 8)}  # fmt: skip
        types.append(entry)
    doc: dict[str, Any] = {
        "objective": {"latency_penalty": args.latency_penalty},
        "backend": backend,
        "proxy": {"default_type": names[0]},
        "types": types,
    }
    if args.arrival_rate is not None:
        doc["workload"] = {"arrival_rate": args.arrival_rate}
    head = [
        f"# Written by thinkcap calibrate from {Path(args.dataset).name} against {args.backend}",
        f"# ({cal.requests} requests, {cal.errors} failed; caps {', '.join(map(str, caps))}; "
        f"{args.repeats} repeat(s); concurrency {', '.join(map(str, args.concurrency))}).",
    ]
    for t in names:
        c = cal.curves[t]
        iv = "; ".join(f"{k} {lo:.4g} to {hi:.4g}" for k, (lo, hi) in c.intervals.items())
        pts = ", ".join(f"{cap}: {k}/{n}" for cap, n, k in cal.points[t])
        head.append(f"# {t}: correct at each cap {pts}; {int(c.level * 100)} % bootstrap intervals: {iv}")
    if cal.step is not None:
        head.append(f"# step tau(j) = {cal.step[0] * 1e3:.2f} + {cal.step[1] * 1e3:.2f} ms x j from the token gaps")
        if len(cal.step_levels) > 1:
            levels = ", ".join(f"{v * 1e3:.2f}" for v in cal.step_levels)
            upto = len(cal.step_levels)
            head.append(f"# measured per occupancy (levels_s, what the model reads up to {upto}): {levels} ms")
    return "\n".join(head) + "\n\n" + dumps(doc)


def plot(cal: Calibration, path: Path) -> Path | None:
    """Each type's share correct at each cap (with 90 % binomial intervals), its fitted curve
    and the bootstrap's band around it."""
    try:
        import matplotlib  # noqa: PLC0415 - the report extra, imported only to draw

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(cap for pts in cal.points.values() for cap, _, _ in pts)
    xs = np.linspace(0, top * 1.05, 200)
    for t, pts in cal.points.items():
        caps = np.array([c for c, _, _ in pts], dtype=float)
        n = np.array([n for _, n, _ in pts], dtype=float)
        p = np.array([k for _, _, k in pts], dtype=float) / n
        err = 1.645 * np.sqrt(np.maximum(p * (1 - p), 1e-9) / n)
        line = ax.errorbar(caps, p, yerr=err, fmt="o", capsize=3, label=f"{t} (graded)")
        c = cal.curves[t]
        colour = line[0].get_color()
        ax.plot(xs, [c.accuracy(x) for x in xs], color=colour,
                label=f"{t}: {c.base:.2f} + {c.gain:.2f}(1 - e^(-{c.rate:.3g} l))")  # fmt: skip
        lo, hi = c.band(xs)
        ax.fill_between(xs, lo, hi, color=colour, alpha=0.15, lw=0,
                        label=f"{t}: {int(c.level * 100)} % bootstrap band")  # fmt: skip
    ax.set_xlabel("cap (tokens)")
    ax.set_ylabel("share correct")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
