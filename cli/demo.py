"""``thinkcap demo``: the whole loop on one machine, no model server needed.

Three identical simulated reasoning servers, each behind its own thinkcap proxy, receive the
same open-loop arrival sequence (same times, types and prompts; the servers share a seed, so
the same request draws the same luck). The proxies differ only in their caps:

- ``adaptive``: the control loop re-solves the caps from live estimates;
- ``static``: the best fixed caps for the schedule's average load (true parameters);
- ``maximal``: every type at its maximum.

The simulated server is a continuous-batching engine with 8 slots (``--slots 1``: one request
at a time, the paper's M/G/1 world), and each proxy lets as many requests through as it has
slots. The schedule goes light -> heavy -> overload -> light; a live view follows the adaptive
proxy, and at the end the policies are compared per phase on accuracy, mean and p99 system
time, the measured objective and the mean number of requests in service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import IO, Any

import numpy as np
from aiohttp import web

from thinkcap.cli.report import MissingExtraError, phase_ratios, ratio_text, read_log, write_report
from thinkcap.cli.runtime import run as run_loop
from thinkcap.cli.scenario_file import load_scenario
from thinkcap.cli.serve import listening
from thinkcap.controller import Problem, decide
from thinkcap.proxy.app import DataPlane
from thinkcap.proxy.logs import configure, logger
from thinkcap.proxy.logs import reset as reset_logging
from thinkcap.proxy.model_file import ModelConfig, TypeConfig
from thinkcap.proxy.serve_file import BackendSettings, ControllerSettings, EstimatorSettings, ProxySettings, Settings
from thinkcap.proxy.state import ProxyState, build_state
from thinkcap.sim.backend import serve as serve_sim
from thinkcap.sim.loadgen import LoadSettings, Record, run_load
from thinkcap.sim.scenario import Scenario
from thinkcap.sim.summary import PhaseSummary, summarise_records

POLICIES = ("adaptive", "static", "maximal")
PHASE_NAMES = ("light", "heavy", "overload", "light")
LIVE_EVERY_S = 2.0


def phase_name(k: int) -> str:
    """The demo's name of phase ``k`` (its number past the four named ones)."""
    return PHASE_NAMES[k] if k < len(PHASE_NAMES) else str(k)


def demo_scenario(duration_s: float | None, slots: int | None = None) -> Scenario:
    """The embedded world, its phases scaled to ``duration_s`` seconds in total, its engine
    with ``slots`` slots (default: the file's 8)."""
    scenario = load_scenario(str(files("thinkcap.sim") / "demo_scenario.toml"))
    if slots is not None:
        if slots < 1:
            raise ValueError(f"--slots: must be at least 1, got {slots}")
        engine = None if scenario.engine is None else replace(scenario.engine, slots=slots)
        scenario = replace(scenario, slots=slots, engine=engine)
    if duration_s is None:
        return scenario
    if not (math.isfinite(duration_s) and duration_s >= 4):
        raise ValueError(f"--duration: must be at least 4 seconds, got {duration_s}")
    total = sum(p.duration_s for p in scenario.phases)
    return scenario.with_phases([replace(p, duration_s=p.duration_s * duration_s / total) for p in scenario.phases])


def mean_rate(scenario: Scenario) -> float:
    """The time-averaged arrival rate of the schedule."""
    total = sum(p.duration_s for p in scenario.phases)
    return sum(p.mean_rate * p.duration_s for p in scenario.phases) / total


def policy_caps(truth: Problem, policy: str) -> dict[str, int] | None:
    """The pinned caps of a static policy (``None`` for the adaptive one)."""
    if policy == "maximal":
        return {n: int(h) for n, h in zip(truth.names, truth.hi, strict=True)}
    if policy == "static":
        return decide(truth).caps(truth.names)
    return None


def demo_settings(scenario: Scenario, sim_url: str, policy: str, interval_s: float) -> Settings:
    """The proxy configuration: true curves and weights, wall-clock service times, marker rules.

    A type's configured overhead is its prefill alone: the proxy learns the answer that follows
    the reasoning (the ``vllm`` dialect's cap bounds the reasoning) and adds its time itself;
    the true problem's overhead, which holds both, would count the answer twice until the
    step fit takes over."""
    truth = scenario.problem(scenario.phases[0].mean_rate)
    prefill = [t.overhead_s - t.per_token_s * s.answer_tokens for t, s in zip(truth.types, scenario.types, strict=True)]
    types = tuple(
        TypeConfig(task=replace(t, overhead_s=pre), keywords=(s.marker,), prefill_s=pre)
        for t, s, pre in zip(truth.types, scenario.types, prefill, strict=True)
    )
    model = ModelConfig(
        "<demo>", types, truth.latency_penalty, truth.rho_max, scenario.phases[0].mean_rate, truth.queue
    )
    return Settings(
        model=model,
        backend=BackendSettings(url=sim_url, dialect="vllm", probe=False, read_timeout_s=120.0, slots=scenario.slots),
        proxy=ProxySettings(
            port=0,
            admin_port=0,
            max_concurrency=scenario.slots,
            max_queue=512,
            default_type=scenario.default_type or types[-1].task.name,
        ),
        controller=ControllerSettings(enabled=policy == "adaptive", interval_s=interval_s),
        estimators=EstimatorSettings(arrival_half_life_s=4.0, detector_reference_s=60.0, mix_half_life_s=30.0),
    )


@dataclass
class Stack:
    """One simulated server and the proxy in front of it."""

    policy: str
    state: ProxyState
    plane: DataPlane
    listeners: contextlib.AsyncExitStack  # the proxy's two listeners (see listening)
    sim: web.AppRunner
    url: str
    records: list[Record] = field(default_factory=list)
    busy: dict[int, list[int]] = field(default_factory=dict)  # per phase: requests in service at each tick

    async def close(self) -> None:
        await self.listeners.aclose()
        await self.sim.cleanup()


async def open_stack(scenario: Scenario, policy: str, interval_s: float) -> Stack:
    """Start a simulated server and its proxy on free loopback ports."""
    sim = await serve_sim(scenario, "127.0.0.1", 0)
    host, port = sim.addresses[0][:2]
    settings = demo_settings(scenario, f"http://{host}:{port}/v1", policy, interval_s)
    state = build_state(settings)
    state.log_requests = policy == "adaptive"
    caps = policy_caps(scenario.problem(mean_rate(scenario)), policy)
    if caps is not None:
        state.caps.pin(caps)
    listeners = contextlib.AsyncExitStack()
    proxy, proxy_port, _ = await listeners.enter_async_context(listening(state))
    return Stack(policy, state, proxy, listeners, sim, f"http://127.0.0.1:{proxy_port}/v1")


def _window(records: list[Record], now: float, span: float) -> tuple[float | None, float | None]:
    recent = [r for r in records if r.answered and r.end_s is not None and r.end_s >= now - span]
    if not recent:
        return None, None
    t = float(np.mean([r.system_time_s for r in recent]))
    judged = [r.correct for r in recent if r.correct is not None]
    return t, (float(np.mean(judged)) if judged else None)


class LiveView:
    """A refreshing table on a terminal, one plain line per tick otherwise."""

    def __init__(self, scenario: Scenario, stacks: list[Stack], out: IO[str]) -> None:
        self.scenario, self.stacks, self.out = scenario, stacks, out
        self.tty = out.isatty()
        self.drawn = 0
        self.phase_caps: dict[int, list[dict[str, int]]] = {}

    def phase_at(self, t: float) -> int:
        end = 0.0
        for k, p in enumerate(self.scenario.phases):
            end += p.duration_s
            if t < end:
                return k
        return len(self.scenario.phases) - 1

    def tick(self, t: float) -> None:
        adaptive = self.stacks[0].state
        k = self.phase_at(t)
        for s in self.stacks:
            s.busy.setdefault(k, []).append(s.state.admission.in_flight)
        caps = adaptive.caps.effective()
        self.phase_caps.setdefault(k, []).append(caps)
        snap = adaptive.estimators.snapshot(adaptive.clock())
        rho = (adaptive.last_decision or {}).get("predicted_rho")
        name = phase_name(k)
        head = (
            f"t={t:5.1f}s  phase {k} {name:<8} offered {self.scenario.phases[k].mean_rate:5.1f}/s  "
            f"estimated {snap.arrival_rate:5.1f}/s  rho {'-' if rho is None else f'{rho:.2f}'}  "
            f"in service {adaptive.admission.in_flight}/{adaptive.admission.max_concurrency}"
            f"{'  SHEDDING' if adaptive.shedding else ''}"
        )
        lines = [head, "  caps " + "  ".join(f"{n}={c}" for n, c in caps.items())]
        for s in self.stacks:
            sys_t, acc = _window(s.records, t, 5.0)
            lines.append(
                f"  {s.policy:<9} last 5 s: system time {'-' if sys_t is None else f'{sys_t:6.3f} s'}  "
                f"accuracy {'-' if acc is None else f'{acc:.2f}'}  answered {sum(r.answered for r in s.records)}"
            )
        if self.tty:
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.out.write("\n".join(lines) + "\n")
            self.drawn = len(lines)
        else:
            self.out.write(" | ".join(line.strip() for line in lines) + "\n")
        self.out.flush()


def report(scenario: Scenario, stacks: list[Stack], view: LiveView, elapsed: float) -> dict[str, Any]:
    """Per phase and per policy: accuracy, mean/p99 system time, objective, counts and caps."""
    weights = {t.name: t.task.weight for t in scenario.types}
    out: dict[str, Any] = {"duration_s": elapsed, "slots": scenario.slots, "phases": [], "totals": {}}
    per: dict[str, list[PhaseSummary]] = {}
    for s in stacks:
        per[s.policy] = summarise_records(
            s.records, scenario.phases, weights=weights, latency_penalty=scenario.wall_penalty
        )
        whole = replace(scenario.phases[0], duration_s=sum(p.duration_s for p in scenario.phases))
        flat = [replace(r, phase=0) for r in s.records]
        (total,) = summarise_records(flat, [whole], weights=weights, latency_penalty=scenario.wall_penalty)
        out["totals"][s.policy] = _row(total, s, None)
        ticks = [n for busy in s.busy.values() for n in busy]
        out["totals"][s.policy]["mean_in_service"] = float(np.mean(ticks)) if ticks else None
    for k, p in enumerate(scenario.phases):
        entry: dict[str, Any] = {
            "phase": k,
            "name": phase_name(k),
            "duration_s": p.duration_s,
            "offered_rate": p.mean_rate,
            "policies": {},
        }
        for s in stacks:
            caps = view.phase_caps.get(k) if s.policy == "adaptive" else [dict(s.state.caps.pins)]
            entry["policies"][s.policy] = _row(per[s.policy][k], s, caps)
            busy = s.busy.get(k)
            entry["policies"][s.policy]["mean_in_service"] = float(np.mean(busy)) if busy else None
        out["phases"].append(entry)
    return out


def _row(row: PhaseSummary, stack: Stack, caps: list[dict[str, int]] | None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "accuracy": row.accuracy,
        "mean_system_time_s": row.mean_s,
        "p99_system_time_s": row.p99_s,
        "objective": row.objective,
        "sent": row.sent,
        "answered": row.answered,
        "shed": row.shed,
        "errored": row.errors,
    }
    if caps:
        d["caps"] = caps[-1]
        d["caps_mean"] = {n: float(np.mean([c[n] for c in caps])) for n in caps[-1]}
    return d


def render(rep: dict[str, Any]) -> str:
    """The end-of-run comparison."""

    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    lines = [
        f"{'phase':<14} {'policy':<9} {'accuracy':>8} {'mean T s':>9} {'p99 T s':>9} {'objective':>9} "
        f"{'sent':>5} {'ok':>5} {'shed':>5} {'err':>5} {'busy':>5}"
    ]
    rows = [(f"{p['phase']} {p['name']} {p['offered_rate']:g}/s", p["policies"]) for p in rep["phases"]]
    rows.append(("whole run", rep["totals"]))
    for name, policies in rows:
        label = name
        for policy, r in policies.items():
            lines.append(
                f"{label:<14} {policy:<9} {f(r['accuracy'], '8.3f')} {f(r['mean_system_time_s'], '9.3f')} "
                f"{f(r['p99_system_time_s'], '9.3f')} {f(r['objective'], '9.4f')} {r['sent']:>5} "
                f"{r['answered']:>5} {r['shed']:>5} {r['errored']:>5} {f(r.get('mean_in_service'), '5.2f')}"
            )
            label = ""
    return "\n".join(lines)


async def mark_phases(scenario: Scenario, state: ProxyState) -> None:
    """A ``phase`` event in the log at each phase's start (on the proxy's clock, as its
    decisions): ``thinkcap report`` compares prediction and observation per phase."""
    for k, p in enumerate(scenario.phases):
        logger().info("phase", phase=k, name=phase_name(k), offered_rate=p.mean_rate, duration_s=p.duration_s,
                      time=state.clock())  # fmt: skip
        await asyncio.sleep(p.duration_s)


async def run_demo(
    scenario: Scenario, *, seed: int, log_dir: Path, out: IO[str], interval_s: float = 1.0
) -> dict[str, Any]:
    """Run the three stacks under one schedule and return the report."""
    stacks = [await open_stack(scenario, p, interval_s) for p in POLICIES]
    total = sum(p.duration_s for p in scenario.phases)
    drain = max(5.0, total / 8)
    files_ = {s.policy: (log_dir / f"requests-{s.policy}.jsonl").open("w") for s in stacks}
    view = LiveView(scenario, stacks, out)
    phases = asyncio.create_task(mark_phases(scenario, stacks[0].state))
    try:

        def recorder(stack: Stack) -> Any:
            def record(rec: Record) -> None:
                stack.records.append(rec)
                files_[stack.policy].write(json.dumps(rec.as_dict()) + "\n")

            return record

        started = time.monotonic()
        loads = [
            asyncio.create_task(
                run_load(
                    scenario,
                    LoadSettings(target=s.url, seed=seed, drain_s=drain, timeout_s=total + drain),
                    on_record=recorder(s),
                )
            )
            for s in stacks
        ]
        while not all(t.done() for t in loads):
            await asyncio.wait(loads, timeout=LIVE_EVERY_S)
            view.tick(time.monotonic() - started)
        for t in loads:
            t.result()
        return report(scenario, stacks, view, time.monotonic() - started)
    finally:
        phases.cancel()
        for fh in files_.values():
            fh.close()
        for s in stacks:
            await s.close()


def add_parser(sub: Any) -> None:
    """Register ``demo``."""
    sp = sub.add_parser("demo", help="simulated server + thinkcap + load: adaptive vs static caps, live")
    sp.add_argument("--duration", type=float, help="seconds for the whole schedule (default 80)")
    sp.add_argument("--report", help="write the JSON report here (default LOG_DIR/report.json)")
    sp.add_argument("--log-dir", default="thinkcap-demo", help="directory for the JSON-lines logs")
    sp.add_argument("--seed", type=int, default=0, help="seed of the arrival sequence")
    sp.add_argument("--slots", type=int, help="the engine's slots (default 8; 1: one request at a time, M/G/1)")
    sp.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``thinkcap demo``."""
    scenario = demo_scenario(args.duration, args.slots)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    report_path = Path(args.report) if args.report else log_dir / "report.json"
    log_path = log_dir / "thinkcap.jsonl"
    total = sum(p.duration_s for p in scenario.phases)
    print(
        f"thinkcap demo: {total:.0f} s, {scenario.slots} slot(s), phases "
        + ", ".join(f"{phase_name(k)} {p.mean_rate:g}/s" for k, p in enumerate(scenario.phases))
        + "; policies adaptive, static, maximal",
        flush=True,
    )
    with log_path.open("w") as log:
        configure(json_lines=True, stream=log)
        try:
            rep = run_loop(run_demo(scenario, seed=args.seed, log_dir=log_dir, out=sys.stdout))
        finally:
            reset_logging()
    ratios = phase_ratios(read_log(str(log_path)))
    rep["prediction_by_phase"] = ratios
    report_path.write_text(json.dumps(rep, indent=2))
    print()
    print(render(rep))
    print()
    print("predicted / observed mean system time, adaptive, from 10 s (at most half the phase) into each phase "
          "(± its standard error): "
          + ", ".join(f"{r['name']} {'-' if r['ratio'] is None else ratio_text(r)} "
                      f"({r['requests']} requests)" for r in ratios))  # fmt: skip
    print(f"report: {report_path}")
    try:
        page = write_report(log_path, log_path.with_suffix(".html"))
        print(f"page:   {page} (plots of what the adaptive proxy did: open it in a browser)")
    except MissingExtraError as exc:
        print(f"page:   not written ({exc})")
    print(f"logs:   {log_path} (decisions and requests of the adaptive proxy; check with `thinkcap audit {log_path}`)")
    print(f"        {log_dir}/requests-<policy>.jsonl (the load generator's record of every request)")
    return 0
