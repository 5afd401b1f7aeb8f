"""``thinkcap fit``: replay a log of requests through the estimators."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from thinkcap.cli.json_lines import BadLine, read_objects
from thinkcap.cli.toml_out import dumps
from thinkcap.estimators import Estimators, Snapshot
from thinkcap.proxy.logs import finite
from thinkcap.proxy.model_file import load_model
from thinkcap.proxy.toml_reader import ConfigError, read_toml

#: At most this many malformed lines are listed one by one (all are counted).
MAX_LISTED_ERRORS = 20


@dataclass(frozen=True)
class Observation:
    """One request from a log: arrival time (s), type, tokens and service time (s)."""

    time: float
    type: str
    prompt_tokens: float
    completion_tokens: float
    cached_tokens: float
    service_time: float


@dataclass
class Replay:
    """What a log held: the usable observations and the malformed lines."""

    lines: int = 0
    observations: list[Observation] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)


def _number(row: dict[str, Any], *keys: str, default: float | None = None) -> float:
    for key in keys:
        if key in row:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{key}: must be a finite number >= 0, got {value!r}")
            return float(value)
    if default is not None:
        return default
    raise ValueError(f"missing field {' or '.join(keys)}")


def _time(row: dict[str, Any]) -> float:
    for key in ("time", "arrival_time"):
        if key in row:
            return _number(row, key)
    if "timestamp" in row and isinstance(row["timestamp"], str):
        try:
            return datetime.fromisoformat(row["timestamp"].replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise ValueError(f"timestamp: not ISO 8601: {row['timestamp']!r}") from None
    raise ValueError("missing field time (or arrival_time, timestamp)")


def parse_row(row: dict[str, Any]) -> Observation | None:
    """One log line's object: a proxy ``request`` event or a trace line; ``None`` for other events."""
    if "event" in row and row["event"] != "request":
        return None
    name = row.get("type")
    if not isinstance(name, str) or not name:
        raise ValueError("missing field type")
    prompt = _number(row, "prompt_tokens")
    cached = _number(row, "cached_tokens", default=0.0)
    if cached > prompt:
        raise ValueError(f"cached_tokens: {cached:g} exceeds prompt_tokens {prompt:g}")
    return Observation(
        time=_time(row),
        type=name,
        prompt_tokens=prompt,
        completion_tokens=_number(row, "completion_tokens"),
        cached_tokens=cached,
        service_time=_number(row, "service_time_s", "service_time"),
    )


def read_log(path: str | Path, known: set[str] | None) -> Replay:
    """Parse every line; malformed ones (and unknown types, when ``known`` is given) are recorded."""
    out = Replay()
    try:
        for item in read_objects(path):
            if isinstance(item, BadLine):
                out.lines = item.number
                out.errors.append((item.number, item.error))
                continue
            number, row = item
            out.lines = number
            try:
                obs = parse_row(row)
            except ValueError as exc:
                out.errors.append((number, str(exc).splitlines()[0]))
                continue
            if obs is None:
                continue
            if known is not None and obs.type not in known:
                out.errors.append((number, f"unknown type {obs.type!r}"))
                continue
            out.observations.append(obs)
    except OSError as exc:
        raise ConfigError(path, "(log)", f"cannot be read: {exc.strerror}") from None
    out.observations.sort(key=lambda o: o.time)
    return out


def fit(replay: Replay, defaults: dict[str, tuple[float, float, float, float]]) -> Snapshot:
    """Feed the observations, in arrival order, to a fresh set of estimators."""
    est = Estimators(defaults)
    for o in replay.observations:
        est.arrived(o.type, now=o.time)
        est.served(o.type, prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens,
                   service_time=o.service_time, cached_tokens=o.cached_tokens, now=o.time)  # fmt: skip
    return est.snapshot()


def as_dict(snap: Snapshot, replay: Replay) -> dict[str, Any]:
    """The JSON report."""
    obs = replay.observations
    span = obs[-1].time - obs[0].time if len(obs) > 1 else 0.0
    return {
        "arrival_rate": snap.arrival_rate,
        "arrival_rate_stderr": finite(snap.arrival_rate_stderr),
        "mean_arrival_rate": (len(obs) - 1) / span if span > 0 else None,
        "load_changes": snap.changes,
        "priors": {t.name: t.prior for t in snap.types},
        "service": {
            t.name: {
                "overhead_s": t.overhead_s,
                "per_token_s": t.per_token_s,
                "variance_s2": t.variance_s2,
                "samples": t.samples,
                "fitted": t.fitted,
            }
            for t in snap.types
        },
        "lines": replay.lines,
        "observations": len(obs),
        "malformed": len(replay.errors),
        "errors": [{"line": n, "error": e} for n, e in replay.errors[:MAX_LISTED_ERRORS]],
    }


def render(report: dict[str, Any]) -> str:
    """The human-readable table."""
    width = max(4, *(len(n) for n in report["priors"]))
    lines = [
        f"observations      {report['observations']} of {report['lines']} lines ({report['malformed']} malformed)",
        f"arrival rate      {report['arrival_rate']:.4f} /s (recent; mean over the log "
        + (f"{report['mean_arrival_rate']:.4f} /s)" if report["mean_arrival_rate"] is not None else "n/a)"),
        f"load changes      {report['load_changes']}",
        "",
        f"{'type':<{width}}  {'prior':>7}  {'overhead_s':>10}  {'per_token_s':>11}"
        f"  {'variance_s2':>11}  {'samples':>7}",
    ]
    for name, p in report["priors"].items():
        s = report["service"][name]
        note = "" if s["fitted"] else "  (configured: too few samples)"
        lines.append(f"{name:<{width}}  {p:>7.4f}  {s['overhead_s']:>10.4f}  {s['per_token_s']:>11.6f}"
                     f"  {s['variance_s2']:>11.5f}  {s['samples']:>7d}{note}")  # fmt: skip
    for err in report["errors"]:
        lines.append(f"line {err['line']}: {err['error']}")
    if report["malformed"] > len(report["errors"]):
        lines.append(f"... and {report['malformed'] - len(report['errors'])} more malformed lines")
    return "\n".join(lines)


def fitted_config(config_path: str, snap: Snapshot, report: dict[str, Any], *, service: bool = True) -> str:
    """The config file with the fitted priors, service parameters (unless ``service`` is false:
    in front of a batching engine a logged service time is not a time alone on the engine) and
    arrival rate."""
    data = read_toml(config_path)
    by_name = snap.by_name()
    for entry in data.get("types", []):
        est = by_name[entry["name"]]
        entry["prior"] = est.prior
        if est.fitted and service:
            table = dict(entry.get("service", {}))
            table.update(overhead_s=est.overhead_s, per_token_s=est.per_token_s, variance_s2=est.variance_s2)
            entry["service"] = table
    rate = report["mean_arrival_rate"] if report["mean_arrival_rate"] is not None else snap.arrival_rate
    data.setdefault("workload", {})["arrival_rate"] = rate
    return dumps(data)


def add_parser(sub: Any) -> None:
    """Register ``fit`` on the CLI's subparsers."""
    sp = sub.add_parser("fit", help="fit arrival rate, type mix and service model from a request log")
    sp.add_argument("log", help="JSON lines: the proxy's request events or trace lines")
    sp.add_argument("--config", help="thinkcap config: its types, priors and service values as the starting point")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.add_argument("--write-config", metavar="OUT", help="write the config with the fitted values (needs --config)")
    sp.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``thinkcap fit``."""
    if args.write_config and not args.config:
        raise ValueError("--write-config needs --config (the file to start from)")
    if args.config:
        cfg = load_model(args.config)
        defaults = {
            t.task.name: (t.task.prior, t.task.overhead_s, t.task.per_token_s, t.task.variance_s2) for t in cfg.types
        }
        replay = read_log(args.log, set(defaults))
    else:
        replay = read_log(args.log, None)
        names = list(dict.fromkeys(o.type for o in replay.observations)) or ["default"]
        defaults = {n: (1.0 / len(names), 0.0, 0.0, 0.0) for n in names}
    snap = fit(replay, defaults)
    report = as_dict(snap, replay)
    if args.write_config:
        batching = cfg.queue.slots > 1
        Path(args.write_config).write_text(fitted_config(args.config, snap, report, service=not batching))
        if batching:
            print("note: [backend] slots > 1: the service tables are kept as configured", file=sys.stderr)
    print(json.dumps(report) if args.json else render(report))
    return 0
