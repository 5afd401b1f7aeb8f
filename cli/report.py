"""``thinkcap report LOG.jsonl [--out report.html]``: a log turned into one page of plots.

The page is one self-contained HTML file (the plots are inline SVG; nothing is fetched when
it is viewed): a summary table, then the arrival-rate estimate and the load over time, each
type's cap over time, predicted against observed mean system time per decision interval
(with their ratio), shedding periods (shaded on every time plot), the fitted service model,
and accuracy by type where graded feedback exists. The plots need matplotlib (the ``report``
extra: ``pip install 'thinkcap[report]'``). Each plotted series is an SVG group whose id
starts with ``series-``, so a test can find it.
"""

from __future__ import annotations

import argparse
import html
import io
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkcap.cli.audit import AuditReport, audit, read_events

#: Buckets of reasoning tokens in the accuracy plot.
ACCURACY_BINS = 8


class MissingExtraError(RuntimeError):
    """matplotlib is not installed."""


@dataclass
class LogData:
    """What the report reads from a log."""

    path: str
    audit: AuditReport
    decisions: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    feedback: list[dict[str, Any]] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)  # ``phase`` events (thinkcap demo's schedule)

    @property
    def t0(self) -> float:
        times = [d["time"] for d in self.decisions] + [r["arrival_time"] for r in self.requests]
        return min(times) if times else 0.0

    @property
    def types(self) -> list[str]:
        names: list[str] = []
        for d in self.decisions:
            names += [n for n in d.get("caps_in_force", d["caps"]) if n not in names]
        return names


def read_log(path: str) -> LogData:
    """Decisions, requests and graded feedback of one log (unreadable lines are counted, as by audit)."""
    data = LogData(path, audit(path))
    scratch = AuditReport()
    for _, e in read_events(path, scratch):
        kind = e.get("event")
        if kind == "decision" and isinstance(e.get("time"), int | float) and isinstance(e.get("caps"), dict):
            data.decisions.append(e)
        elif kind == "request" and isinstance(e.get("arrival_time"), int | float):
            data.requests.append(e)
        elif kind == "feedback" and isinstance(e.get("type"), str):
            data.feedback.append(e)
        elif kind == "phase" and isinstance(e.get("time"), int | float):
            data.phases.append(e)
    data.decisions.sort(key=lambda e: e["time"])
    data.requests.sort(key=lambda e: e["arrival_time"])
    data.phases.sort(key=lambda e: e["time"])
    return data


#: Seconds into a phase before its prediction is compared (the caps settle first), at most
#: half the phase.
SETTLE_S = 10.0


def phase_ratios(data: LogData, settle_s: float = SETTLE_S) -> list[dict[str, Any]]:
    """Per ``phase`` event (a load schedule's phase, as ``thinkcap demo`` logs them): the
    predicted and observed mean system time over the decision intervals that start at least
    ``settle_s`` (at most half the phase) into it, weighted by the requests arriving in each,
    and their ratio (``None`` where no interval has both: an overload predicts nothing), with
    the observed mean's standard error and the ratio's (``observed_stderr``, ``ratio_stderr``:
    a 10-s window at 1.5 requests/s holds 11-23 answers, and its ratio's standard error was
    0.09-0.25 in six 80-s demos). A
    phase ends where the next starts, after its ``duration_s`` if the event has one, or at
    the log's end."""
    out = []
    end_of_log = max([d["time"] for d in data.decisions] + [r["arrival_time"] for r in data.requests], default=0.0)
    compared = _compared(data.audit)
    for k, ph in enumerate(data.phases):
        start = float(ph["time"])
        end = float(data.phases[k + 1]["time"]) if k + 1 < len(data.phases) else max(end_of_log, start)
        if isinstance(ph.get("duration_s"), int | float):  # the schedule's, not the drain after it
            end = min(end, start + float(ph["duration_s"]))
        from_ = start + min(settle_s, (end - start) / 2)
        window = [iv for iv in compared if from_ <= iv["start"] < end]
        p, o, n = _by_requests(window)
        se = _observed_stderr(window)
        ratio = p / o if p is not None and o else None
        out.append(
            {
                "name": str(ph.get("name", k)),
                "offered_rate": ph.get("offered_rate"),
                "from_s": from_ - start,
                "predicted": p,
                "observed": o,
                "observed_stderr": se,
                "ratio": ratio,
                "ratio_stderr": ratio * se / o if ratio is not None and se is not None and o else None,
                "requests": n,
            }
        )
    return out


def shedding_periods(data: LogData) -> list[tuple[float, float]]:
    """(start, end) of every stretch of decisions with shedding on, in seconds from the start."""
    out, start = [], None
    t0 = data.t0
    end_of_log = max([d["time"] for d in data.decisions] + [r["arrival_time"] for r in data.requests], default=t0)
    for d in data.decisions:
        on = bool(d.get("shedding"))
        if on and start is None:
            start = d["time"]
        elif not on and start is not None:
            out.append((start - t0, d["time"] - t0))
            start = None
    if start is not None:
        out.append((start - t0, end_of_log - t0))
    return out


def _compared(rep: AuditReport) -> list[dict[str, Any]]:
    """The decision intervals with both a predicted and an observed mean system time."""
    keys = ("predicted_mean_system_time", "observed_mean_system_time")
    return [iv for iv in rep.intervals if all(iv[k] is not None for k in keys)]


def _by_requests(intervals: list[dict[str, Any]]) -> tuple[float | None, float | None, int]:
    """Predicted and observed mean system time over ``intervals`` (compared ones), weighted by
    the requests arriving in each, and those requests (``None``, ``None``, 0 without any)."""
    n = sum(iv["requests"] for iv in intervals)
    if not n:
        return None, None, 0
    p = sum(iv["predicted_mean_system_time"] * iv["requests"] for iv in intervals) / n
    o = sum(iv["observed_mean_system_time"] * iv["requests"] for iv in intervals) / n
    return p, o, n


def _observed_stderr(intervals: list[dict[str, Any]]) -> float | None:
    """The standard error of the observed mean system time over ``intervals`` (compared ones),
    the answers read as independent draws: the noise of a short window's ratio (``None`` with
    fewer than two answers, or a log without the intervals' mean squares)."""
    n = sum(iv["requests"] for iv in intervals)
    if n < 2 or any(iv.get("observed_mean_square_system_time") is None for iv in intervals):
        return None
    mean = sum(iv["observed_mean_system_time"] * iv["requests"] for iv in intervals) / n
    square = sum(iv["observed_mean_square_system_time"] * iv["requests"] for iv in intervals) / n
    return math.sqrt(max(square - mean * mean, 0.0) * n / (n - 1) / n)


def ratio_text(ph: dict[str, Any]) -> str:
    """``1.23 ± 0.25``: a phase's ratio and its standard error (the ratio alone without one)."""
    se = ph.get("ratio_stderr")
    return f"{ph['ratio']:.2f}" + ("" if se is None else f" ± {se:.2f}")


def summary(data: LogData) -> list[tuple[str, str]]:
    """The rows of the table at the top."""
    rep = data.audit
    statuses: dict[int, int] = {}
    for r in data.requests:
        s = r.get("status")
        if isinstance(s, int):
            statuses[s] = statuses.get(s, 0) + 1
    ok = statuses.get(200, 0)
    shed = sum(1 for r in data.requests if r.get("error_kind") == "shed" or r.get("shed"))
    span = 0.0
    if data.requests or data.decisions:
        last = max([d["time"] for d in data.decisions] + [r["arrival_time"] for r in data.requests])
        span = last - data.t0
    rows = [
        ("log", html.escape(Path(data.path).name)),
        ("span", f"{span:.1f} s"),
        (
            "requests",
            f"{len(data.requests)}: {ok} answered (200), {len(data.requests) - ok} not"
            + (f" ({shed} shed)" if shed else ""),
        ),
        ("status codes", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())) or "none"),
        ("decisions", f"{rep.decisions} replayed, {len(rep.mismatches)} mismatches; {len(rep.published)} published"),
        ("unreadable lines", str(len(rep.bad_lines))),
    ]
    if data.decisions:
        rates = [d["inputs"]["arrival_rate"] for d in data.decisions]
        rows.append(("arrival rate planned for", f"{min(rates):.3g} to {max(rates):.3g} /s"))
    p, o, _ = _by_requests(_compared(rep))
    if p is not None and o is not None:
        rows.append(("mean system time", f"predicted {p:.3g} s, observed {o:.3g} s, ratio {p / o:.2f} (by requests, "
                                          "every interval)"))  # fmt: skip
    for k, ph in enumerate(phase_ratios(data)):
        rate = "" if ph["offered_rate"] is None else f" ({ph['offered_rate']:g}/s)"
        if ph["ratio"] is None:
            text = f"nothing to compare from {ph['from_s']:.0f} s in (no prediction: overload, or no answers)"
        else:
            text = (f"predicted {ph['predicted']:.3g} s, observed {ph['observed']:.3g} s, ratio {ratio_text(ph)} "
                    f"({ph['requests']} requests from {ph['from_s']:.0f} s in)")  # fmt: skip
        rows.append((f"phase {k} {html.escape(ph['name'])}{rate}", text))
    periods = shedding_periods(data)
    shed_s = sum(b - a for a, b in periods)
    rows.append(("shedding", f"{shed_s:.1f} s in {len(periods)} period(s)" if periods else "never"))
    if data.decisions:
        last = data.decisions[-1]
        caps = last.get("caps_in_force", last["caps"])
        rows.append(("caps at the end", ", ".join(f"{k} {v}" for k, v in caps.items())))
    if data.feedback:
        rows.append(("graded feedback", f"{len(data.feedback)} answers"))
    return rows


# -- plots ---------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:  # an optional extra: imported only when a page is drawn
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise MissingExtraError("thinkcap report draws with matplotlib: pip install 'thinkcap[report]'") from None
    plt.rcParams.update({"svg.fonttype": "none", "figure.dpi": 96, "font.size": 9})
    return plt


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _shade(ax: Any, periods: list[tuple[float, float]]) -> None:
    for k, (a, b) in enumerate(periods):
        ax.axvspan(a, b, color="tab:red", alpha=0.12, lw=0, label="shedding" if k == 0 else None)


def plot_arrival(plt: Any, data: LogData, periods: list[tuple[float, float]]) -> str | None:
    if not data.decisions:
        return None
    t0 = data.t0
    t = [d["time"] - t0 for d in data.decisions]
    fig, ax = plt.subplots(figsize=(8, 3))
    rates = [d["inputs"]["arrival_rate"] for d in data.decisions]
    (line,) = ax.step(t, rates, where="post", label="arrival rate planned for")
    line.set_gid("series-arrival-rate")
    arrivals = [r["arrival_time"] - t0 for r in data.requests]
    if len(arrivals) > 1 and len(t) > 1:
        observed, mids = [], []
        for a, b in itertools.pairwise(t):
            if b > a:
                observed.append(sum(a <= x < b for x in arrivals) / (b - a))
                mids.append((a + b) / 2)
        (obs,) = ax.plot(mids, observed, ".", color="tab:gray", label="arrivals seen per interval")
        obs.set_gid("series-arrival-observed")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests/s")
    rho = [(x, float(d["predicted_rho"])) for x, d in zip(t, data.decisions, strict=True)
           if isinstance(d.get("predicted_rho"), int | float)]  # fmt: skip
    if rho:
        ax2 = ax.twinx()
        (load,) = ax2.step([x for x, _ in rho], [r for _, r in rho], where="post", color="tab:orange", label="load ρ")
        load.set_gid("series-load")
        ax2.set_ylabel("load ρ at the caps")
        ax2.set_ylim(0, max(1.0, max(r for _, r in rho) * 1.1))
        ax2.legend(loc="upper right")
    _shade(ax, periods)
    ax.legend(loc="upper left")
    return _svg(fig)


def plot_caps(plt: Any, data: LogData, periods: list[tuple[float, float]]) -> str | None:
    if not data.decisions:
        return None
    t0 = data.t0
    t = [d["time"] - t0 for d in data.decisions]
    fig, ax = plt.subplots(figsize=(8, 3))
    for name in data.types:
        ys = [d.get("caps_in_force", d["caps"]).get(name, math.nan) for d in data.decisions]
        (line,) = ax.step(t, ys, where="post", label=name)
        line.set_gid(f"series-cap-{name}")
    _shade(ax, periods)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("cap (reasoning tokens)")
    ax.legend(loc="best", ncol=min(4, len(data.types) + 1))
    return _svg(fig)


def plot_latency(plt: Any, data: LogData, periods: list[tuple[float, float]]) -> str | None:
    rows = _compared(data.audit)
    if not rows:
        return None
    t0 = data.t0
    t = [iv["start"] - t0 for iv in rows]
    pred = [iv["predicted_mean_system_time"] for iv in rows]
    obs = [iv["observed_mean_system_time"] for iv in rows]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 4.2), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    (p,) = ax.step(t, pred, where="post", label="predicted")
    p.set_gid("series-predicted")
    (o,) = ax.plot(t, obs, "o", ms=3, label="observed (requests arriving in the interval)")
    o.set_gid("series-observed")
    ax.set_ylabel("mean system time (s)")
    ax.legend(loc="best")
    ratio = [a / b if b > 0 else math.nan for a, b in zip(pred, obs, strict=True)]
    (r,) = ax2.plot(t, ratio, "o-", ms=3, color="tab:purple")
    r.set_gid("series-ratio")
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set_ylabel("predicted / observed")
    ax2.set_xlabel("time (s)")
    _shade(ax, periods)
    _shade(ax2, periods)
    return _svg(fig)


def plot_service(plt: Any, data: LogData) -> str | None:
    """The fitted step over time where there is one, and each type's modelled time at its cap."""
    if not data.decisions:
        return None
    t0 = data.t0
    steps = [(d["time"] - t0, d["step"]) for d in data.decisions if isinstance(d.get("step"), dict)]
    last = data.decisions[-1]
    types = last["inputs"]["types"]
    caps = last.get("caps_in_force", last["caps"])
    fig, axes = plt.subplots(1, 2 if steps else 1, figsize=(8, 3), squeeze=False)
    ax = axes[0][0]
    names = [t["name"] for t in types]
    base = [t["overhead_s"] for t in types]
    decode = [t["per_token_s"] * caps.get(t["name"], 0) for t in types]
    for gid, bars in (
        ("overhead", ax.bar(names, base, label="overhead (prefill, answer)")),
        ("decode", ax.bar(names, decode, bottom=base, label="reasoning at the cap")),
    ):
        for name, bar in zip(names, bars, strict=True):
            bar.set_gid(f"series-service-{gid}-{name}")
    ax.set_ylabel("service time alone (s)")
    ax.set_title("last decision's service model", fontsize=9)
    ax.legend(loc="best")
    if steps:
        ax2 = axes[0][1]
        ts = [x for x, _ in steps]
        (a,) = ax2.plot(ts, [s.get("base_s", math.nan) * 1e3 for _, s in steps], label="a (ms per step)")
        a.set_gid("series-step-base")
        (b,) = ax2.plot(ts, [s.get("per_seq_s", math.nan) * 1e3 for _, s in steps], label="b (ms per sequence)")
        b.set_gid("series-step-per-seq")
        ax2.set_xlabel("time (s)")
        ax2.set_title("the engine's step τ(j) = a + b·j", fontsize=9)
        ax2.legend(loc="best")
    return _svg(fig)


def plot_accuracy(plt: Any, data: LogData) -> str | None:
    if not data.feedback:
        return None
    fig, ax = plt.subplots(figsize=(8, 3))
    names = sorted({f["type"] for f in data.feedback})
    for name in names:
        graded = [f for f in data.feedback if f["type"] == name and isinstance(f.get("reasoning_tokens"), int | float)]
        pts = sorted((float(f["reasoning_tokens"]), 1.0 if f["correct"] else 0.0) for f in graded)
        if not pts:
            continue
        k = max(1, math.ceil(len(pts) / ACCURACY_BINS))
        xs = [sum(x for x, _ in pts[i : i + k]) / len(pts[i : i + k]) for i in range(0, len(pts), k)]
        ys = [sum(y for _, y in pts[i : i + k]) / len(pts[i : i + k]) for i in range(0, len(pts), k)]
        (line,) = ax.plot(xs, ys, "o-", ms=4, label=f"{name} ({len(pts)} graded)")
        line.set_gid(f"series-accuracy-{name}")
    ax.set_xlabel("reasoning tokens")
    ax.set_ylabel("share correct")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="best")
    return _svg(fig)


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 62em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border-bottom: 1px solid #ddd; padding: 0.25em 1em 0.25em 0; text-align: left; vertical-align: top; }
figure { margin: 1.5em 0; }
figure svg { max-width: 100%; height: auto; }
.note { color: #666; }
"""


def render_html(data: LogData) -> str:
    """The whole page."""
    plt = _pyplot()
    periods = shedding_periods(data)
    sections: list[tuple[str, str, Callable[[], str | None]]] = [
        ("arrival", "Arrival rate and load", lambda: plot_arrival(plt, data, periods)),
        ("caps", "Caps by type", lambda: plot_caps(plt, data, periods)),
        ("latency", "Predicted against observed mean system time", lambda: plot_latency(plt, data, periods)),
        ("service", "Service model", lambda: plot_service(plt, data)),
        ("accuracy", "Accuracy by type (graded feedback)", lambda: plot_accuracy(plt, data)),
    ]
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>thinkcap report: {html.escape(Path(data.path).name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>thinkcap report</h1>",
        '<table id="summary">',
        *(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in summary(data)),
        "</table>",
    ]
    if periods:
        rows = "".join(f"<tr><td>{a:.1f} s</td><td>{b:.1f} s</td><td>{b - a:.1f} s</td></tr>" for a, b in periods)
        parts.append('<h2>Shedding</h2><table id="shedding"><tr><th>from</th><th>to</th><th>for</th></tr>'
                     f"{rows}</table>")  # fmt: skip
    try:
        for key, title, draw in sections:
            svg = draw()
            if svg is None:
                why = "no graded feedback in this log" if key == "accuracy" else "nothing to plot in this log"
                parts.append(f'<h2>{title}</h2><p class="note" id="missing-{key}">{why}</p>')
            else:
                parts.append(f'<h2>{title}</h2><figure class="plot" id="plot-{key}">{svg}</figure>')
    finally:
        plt.close("all")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(log: str | Path, out: str | Path) -> Path:
    """Read ``log``, write the page to ``out``; returns ``out``."""
    data = read_log(str(log))
    page = render_html(data)
    path = Path(out)
    path.write_text(page, encoding="utf-8")
    return path


def add_parser(sub: Any) -> None:
    """Register ``report``."""
    sp = sub.add_parser("report", help="turn a thinkcap log into one self-contained HTML page of plots")
    sp.add_argument("log", help="JSON-lines log written by thinkcap serve or thinkcap demo")
    sp.add_argument("--out", help="the HTML file to write (default: next to the log, .html)")
    sp.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``thinkcap report``."""
    out = Path(args.out) if args.out else Path(args.log).with_suffix(".html")
    try:
        path = write_report(args.log, out)
    except OSError as exc:
        raise ValueError(f"{exc.filename or args.log}: cannot be read or written: {exc.strerror}") from None
    except MissingExtraError as exc:
        raise ValueError(str(exc)) from None
    print(f"report: {path}")
    return 0
