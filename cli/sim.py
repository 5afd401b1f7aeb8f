"""``thinkcap mock-backend`` and ``thinkcap loadgen``: the simulated world on the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from dataclasses import replace
from typing import IO, Any

from thinkcap.cli.runtime import run as run_loop
from thinkcap.cli.scenario_file import load_scenario
from thinkcap.sim.backend import serve
from thinkcap.sim.loadgen import LoadSettings, Record, run_load
from thinkcap.sim.scenario import LoadPhase, Scenario
from thinkcap.sim.summary import format_summary, summarise_records


def parse_phase(text: str) -> LoadPhase:
    """``DURATION:RATE`` or ``DURATION:RATE:RATE_END`` (seconds, requests per second)."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        numbers = [float(p) for p in parts]
        return LoadPhase(numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else None)
    except ValueError as exc:
        why = f" ({exc})" if str(exc) else ""
        raise argparse.ArgumentTypeError(f"expected DURATION:RATE[:RATE_END], got {text!r}{why}") from None


def _overrides(scenario: Scenario, args: argparse.Namespace) -> Scenario:
    changes: dict[str, Any] = {}
    for name in ("time_scale", "slots", "seed"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if scenario.engine is not None and "slots" in changes:  # the engine's slots follow
        changes["engine"] = replace(scenario.engine, slots=changes["slots"])
    return replace(scenario, **changes) if changes else scenario


def add_parsers(sub: Any) -> None:
    """Register ``mock-backend`` and ``loadgen``."""
    mb = sub.add_parser("mock-backend", help="run the simulated OpenAI-compatible reasoning server")
    mb.add_argument("--scenario", required=True, help="scenario TOML (see examples/scenario.toml)")
    mb.add_argument("--host", default="127.0.0.1")
    mb.add_argument("--port", type=int, default=8001)
    mb.add_argument("--time-scale", type=float, help="override [server].time_scale")
    mb.add_argument("--slots", type=int, help="override [server].slots")
    mb.add_argument("--seed", type=int, help="override [server].seed")
    mb.set_defaults(run=run_mock_backend)

    lg = sub.add_parser("loadgen", help="send open-loop Poisson load to an OpenAI-compatible server")
    lg.add_argument("--target", required=True, help="base URL of the server, e.g. http://127.0.0.1:8000")
    lg.add_argument("--scenario", required=True, help="scenario TOML: type mix, prompts and [load] schedule")
    lg.add_argument(
        "--phase",
        type=parse_phase,
        action="append",
        metavar="DURATION:RATE[:RATE_END]",
        help="a schedule phase (repeat); replaces the scenario's [[load.phases]]",
    )
    lg.add_argument("--stream", action="store_true", help="send streaming requests")
    lg.add_argument("--seed", type=int, default=0, help="seed of arrivals, types and prompts")
    lg.add_argument("--timeout-s", type=float, default=60.0, help="per-request time limit")
    lg.add_argument("--drain-s", type=float, default=30.0, help="wait this long for open requests after the schedule")
    lg.add_argument("--max-requests", type=int, default=100_000)
    lg.add_argument("--feedback-url", help="POST graded feedback for every judged answer here")
    lg.add_argument("--out", help="write one JSON line per request to this file")
    lg.add_argument("--json", action="store_true", help="print the per-phase summary as JSON")
    lg.set_defaults(run=run_loadgen)


def run_mock_backend(args: argparse.Namespace) -> int:
    """Execute ``thinkcap mock-backend`` until SIGINT or SIGTERM."""
    scenario = _overrides(load_scenario(args.scenario), args)

    async def main() -> None:
        runner = await serve(scenario, args.host, args.port)
        print(
            f"thinkcap mock-backend: {scenario.model} on http://{args.host}:{args.port} "
            f"({scenario.slots} slot(s){', batching' if scenario.engine is not None else ''}, "
            f"time_scale {scenario.time_scale:g}, types {', '.join(scenario.names)})",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    run_loop(main())
    return 0


def run_loadgen(args: argparse.Namespace) -> int:
    """Execute ``thinkcap loadgen``."""
    scenario = load_scenario(args.scenario)
    if args.phase:
        scenario = scenario.with_phases(args.phase)
    if not scenario.phases:
        raise ValueError("no load schedule: give --phase or [[load.phases]] in the scenario")
    settings = LoadSettings(
        target=args.target,
        stream=args.stream,
        seed=args.seed,
        timeout_s=args.timeout_s,
        drain_s=args.drain_s,
        max_requests=args.max_requests,
        feedback_url=args.feedback_url,
    )
    with contextlib.ExitStack() as stack:
        out: IO[str] | None = stack.enter_context(open(args.out, "w")) if args.out else None

        def write(rec: Record) -> None:
            if out is not None:
                out.write(json.dumps(rec.as_dict()) + "\n")

        result = asyncio.run(run_load(scenario, settings, on_record=write))
    weights = {t.name: t.task.weight for t in scenario.types}
    rows = summarise_records(result.records, scenario.phases, weights=weights, latency_penalty=scenario.wall_penalty)
    if args.json:
        print(
            json.dumps(
                {
                    "phases": [r.as_dict() for r in rows],
                    "feedback_sent": result.feedback_sent,
                    "feedback_errors": result.feedback_errors,
                }
            )
        )
    else:
        print(format_summary(rows))
        if args.feedback_url:
            print(f"feedback: {result.feedback_sent} sent, {result.feedback_errors} failed")
    sys.stdout.flush()
    return 0
