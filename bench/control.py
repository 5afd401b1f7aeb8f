"""Control benchmark: the online controller against oracle, static, maximal and uniform caps.

Run: .venv/bin/python bench/control.py [--phase-s S] [--seeds N] [--slots C] [--rates R,R,..] [--e2e]

*Simulated (DES)*: the world of ``thinkcap demo`` (``sim/demo_scenario.toml``, wall-clock
units) under a schedule with load steps (default 1 -> 6 -> 12 -> 3 requests/s), ``--phase-s``
seconds each, on a server with ``--slots`` slots (default 1: one request at a time; above
one, the demo's continuous-batching engine simulated step by step, ``sim/engine.py``).
Every policy serves the same sampled arrival sequence (common random numbers: the same
types, service noise and correctness draws):

- *online*: thinkcap's control loop (``thinkcap.proxy.control.ControlLoop``, interval 1 s, the demo's
  estimator settings) fed, in event order, with each arrival and each completion of a FIFO
  single server; a request gets the caps in force when it starts service. Its configured
  service model is deliberately wrong (overhead x 1.5, per-token x 0.7) until it has
  learned the truth from completions;
- *oracle*: the optimum of the true problem of each phase (it knows the rate and the step);
- *static*: the optimum for the schedule's average rate;
- *maximal*: every type at its maximum;
- *uniform*: the paper's uniform cap, one cap for every type, best for the average rate;
- *serialised* (batching engines only): the proxy with ``max_concurrency = 1`` in front of
  the same engine, planning for the one-request-at-a-time queue it then sees (the oracle of
  that world, per phase).

In front of a batching engine the online controller's configured service model is the true
one (the live fit does not replace it there yet; see the README, "Batching engines").

Reported per phase: the measured objective U (mean of weight x correct minus the latency
penalty x mean system time, in simulated seconds, as the demo reports it) over the steady
part of the phase (after its first 10 s) and, for the online controller, its ratio to the
oracle's, the time after each step until its caps first come within 10 % (or 8 tokens) of
their steady level for the phase (their median over its second half), and how much they
wander in that second half, and its mean queue wait in the first and second half of each
phase (a queue that grows without bound would show a much longer second half). Median over
seeds.

*End to end* (``--e2e``): ``thinkcap demo``'s three policies on the simulated HTTP server.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import statistics
import sys
import tempfile
from dataclasses import replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from thinkcap.cli.demo import demo_settings, render, run_demo  # noqa: E402
from thinkcap.cli.scenario_file import load_scenario  # noqa: E402
from thinkcap.controller import Problem, Status, round_caps, solve  # noqa: E402
from thinkcap.proxy.control import ControlLoop  # noqa: E402
from thinkcap.proxy.logs import configure  # noqa: E402
from thinkcap.proxy.state import ProxyState, build_state  # noqa: E402
from thinkcap.sim.des import Phase, Workload, sample_workload, serve  # noqa: E402
from thinkcap.sim.engine import run_engine  # noqa: E402
from thinkcap.sim.scenario import Scenario  # noqa: E402

RATES = (1.0, 6.0, 12.0, 3.0)
SETTLE_S = 10.0
INTERVAL_S = 1.0


def optimum(p: Problem) -> np.ndarray[Any, Any]:
    r = solve(p)
    return p.lo.astype(float) if r.status == Status.OVERLOAD else round_caps(p, r.x).caps.astype(float)


def uniform(p: Problem) -> np.ndarray[Any, Any]:
    """The paper's uniform policy: the best single cap for every type (clipped to each type's bounds)."""
    levels = np.arange(0, int(p.hi.max()) + 1)
    values = [p.objective(np.clip(np.full(len(p.types), float(v)), p.lo, p.hi)) for v in levels]
    best = levels[int(np.nanargmax(np.where(np.isfinite(values), values, -np.inf)))]
    return np.clip(np.full(len(p.types), float(best)), p.lo, p.hi).astype(float)


def finished(state: ProxyState, name: str, *, reasoning: float, answer: int, service_s: float, now: float) -> None:
    """What the proxy's accounting learns from an answer (``request/accounting.py``): the
    service time with every completion token, and the answer after the reasoning (the
    ``vllm`` dialect's cap bounds the reasoning alone, so the answer's time is added to the
    configured prefill)."""
    state.estimators.served(name, prompt_tokens=0, completion_tokens=reasoning + answer, service_time=service_s,
                            now=now)  # fmt: skip
    state.answer.update(name, answer, now=now)


def online(
    scenario: Scenario, work: Workload, truth: list[Problem], half_life_s: float | None = None
) -> tuple[np.ndarray[Any, Any], list[tuple[float, np.ndarray[Any, Any]]]]:
    """Caps per request under thinkcap's control loop, and the caps over time."""
    settings = demo_settings(scenario, "http://127.0.0.1:9/v1", "adaptive", INTERVAL_S)
    if half_life_s is not None:
        settings = replace(settings, estimators=replace(settings.estimators, arrival_half_life_s=half_life_s))
    wrong = tuple(replace(t, task=replace(t.task, overhead_s=1.5 * t.task.overhead_s,
                                           per_token_s=0.7 * t.task.per_token_s))
                  for t in settings.model.types)  # fmt: skip
    settings = replace(settings, model=replace(settings.model, types=wrong))
    state = build_state(settings, clock=lambda: 0.0)
    ctl = ControlLoop(state, settings.controller)
    names = list(truth[0].names)
    answers = [t.answer_tokens for t in scenario.types]
    p0 = truth[0]
    n = work.size
    caps = np.zeros(n)
    history: list[tuple[float, np.ndarray[Any, Any]]] = []
    fed, tick, finish = 0, INTERVAL_S, 0.0
    pending: tuple[float, int, float, float] | None = None  # (finish time, type, tokens, service)

    def advance(until: float) -> None:
        nonlocal fed, tick, pending
        while True:
            t_arr = work.arrival[fed] if fed < n else math.inf
            t_done = pending[0] if pending is not None else math.inf
            t_next = min(t_arr, t_done, tick)
            if t_next > until:
                return
            if t_next == t_done and pending is not None:
                _, k, tokens, service = pending
                finished(state, names[k], reasoning=tokens, answer=answers[k], service_s=service, now=t_next)
                pending = None
            elif t_next == t_arr:
                state.arrived(names[int(work.type[fed])], float(t_arr))
                fed += 1
            else:
                ctl.step(tick)
                history.append((tick, np.array([state.caps.cap(m) for m in names], dtype=float)))
                tick += INTERVAL_S

    for i in range(n):
        start = max(float(work.arrival[i]), finish)
        advance(start)
        k = int(work.type[i])
        cap = float(state.caps.cap(names[k]))
        caps[i] = cap
        service = max(0.0, p0.t0[k] + p0.c[k] * cap + math.sqrt(p0.v[k]) * work.noise[i])
        finish = start + service
        advance(finish)  # completions of earlier requests and ticks before this one ends
        pending = (finish, k, cap, service)
    return caps, history


def online_engine(
    scenario: Scenario, work: Workload, truth: list[Problem]
) -> tuple[np.ndarray[Any, Any], list[tuple[float, np.ndarray[Any, Any]]]]:
    """:func:`online` on the batching engine: a request gets the caps in force when it gets a
    slot; completions feed the estimators as the engine makes them."""
    settings = demo_settings(scenario, "http://127.0.0.1:9/v1", "adaptive", INTERVAL_S)
    state = build_state(settings, clock=lambda: 0.0)
    ctl = ControlLoop(state, settings.controller)
    names = list(truth[0].names)
    answers = [t.answer_tokens for t in scenario.types]
    p0 = truth[0]
    engine = scenario.problem(1.0).queue
    assert engine.slots == scenario.slots
    tau1 = p0.c[0]  # every type's per-token time is the step at one sequence
    n = work.size
    caps, started = np.zeros(n), np.zeros(n)
    history: list[tuple[float, np.ndarray[Any, Any]]] = []
    cursor = {"fed": 0, "tick": INTERVAL_S}

    def advance(until: float) -> None:
        while True:
            fed, tick = cursor["fed"], cursor["tick"]
            t_arr = work.arrival[fed] if fed < n else math.inf
            if min(t_arr, tick) > until:
                return
            if t_arr <= tick:
                state.arrived(names[int(work.type[fed])], float(t_arr))
                cursor["fed"] = fed + 1
            else:
                ctl.step(tick)
                history.append((tick, np.array([state.caps.cap(m) for m in names], dtype=float)))
                cursor["tick"] = tick + INTERVAL_S

    def on_start(i: int, t: float) -> int:
        advance(t)
        k = int(work.type[i])
        caps[i] = cap = float(state.caps.cap(names[k]))
        started[i] = t
        alone = max(0.0, p0.t0[k] + p0.c[k] * cap + math.sqrt(p0.v[k]) * work.noise[i])
        return round(alone / tau1)

    def on_done(i: int, t: float) -> None:
        advance(t)
        k = int(work.type[i])
        finished(state, names[k], reasoning=caps[i], answer=answers[k], service_s=t - started[i], now=t)

    run_engine(work.arrival, np.zeros(n, np.int64), None, slots=engine.slots, step_base_s=engine.step_base_s,
               step_per_seq_s=engine.step_per_seq_s, on_start=on_start, on_done=on_done)  # fmt: skip
    advance(float(work.arrival[-1]) if n else 0.0)
    return caps, history


def serialised(scenario: Scenario, rate: float) -> Problem:
    """The world a proxy with max_concurrency = 1 sees in front of the engine: one request at a time."""
    one = replace(scenario, slots=1, engine=replace(scenario.engine, slots=1) if scenario.engine else None)
    return one.problem(rate)


def measured(
    truth: Problem, work: Workload, caps: np.ndarray[Any, Any], mask: np.ndarray[Any, Any], penalty: float
) -> float:
    out = serve(truth, caps, work)
    w = truth.weight[work.type]
    return float(np.mean(w[mask] * out.correct[mask]) - penalty * np.mean(out.system[mask]))


def run_des(
    phase_s: float, seeds: int, half_life_s: float | None = None, slots: int = 1, rates: tuple[float, ...] = RATES
) -> None:
    scenario = load_scenario(str(files("thinkcap.sim") / "demo_scenario.toml"))
    engine = scenario.engine
    scenario = replace(scenario, slots=slots, engine=None if engine is None else replace(engine, slots=slots))
    batching = slots > 1
    if not batching:  # the paper's world: one server at the configured per-token times
        scenario = replace(scenario, engine=None)
    phases = [Phase(phase_s, r) for r in rates]
    truth = [scenario.problem(r) for r in rates]
    avg = scenario.problem(float(np.mean(rates)))
    penalty = scenario.wall_penalty  # U per simulated second of system time, as the demo reports it
    policies = ["online", "oracle", "static", "maximal", "uniform"] + (["serialised"] if batching else [])
    rows: dict[str, list[list[float]]] = {p: [] for p in policies}
    totals: dict[str, list[float]] = {p: [] for p in policies}
    settle: list[list[float]] = []
    spread: list[list[float]] = []
    waits: list[list[tuple[float, float]]] = []
    ratio: list[list[float]] = []
    for seed in range(seeds):
        work = sample_workload(phases, truth[0].prior, np.random.default_rng(seed))
        steady = work.arrival - work.phase * phase_s >= SETTLE_S
        if batching:
            online_caps, history = online_engine(scenario, work, truth)
        else:
            online_caps, history = online(scenario, work, truth, half_life_s)
        table = {
            "online": online_caps,
            "oracle": np.stack([optimum(p) for p in truth])[work.phase, work.type],
            "static": optimum(avg)[work.type],
            "maximal": avg.hi.astype(float)[work.type],
            "uniform": uniform(avg)[work.type],
        }
        worlds = dict.fromkeys(table, truth[0])
        if batching:
            serial = [serialised(scenario, r) for r in rates]
            table["serialised"] = np.stack([optimum(p) for p in serial])[work.phase, work.type]
            worlds["serialised"] = serial[0]
        per_seed: dict[str, list[float]] = {}
        for name, caps in table.items():
            world = worlds[name]
            per_seed[name] = [measured(world, work, caps, steady & (work.phase == k), penalty)
                              for k in range(len(rates))]  # fmt: skip
            rows[name].append(per_seed[name])
            totals[name].append(measured(world, work, caps, np.ones(work.size, bool), penalty))
        ratio.append([per_seed["online"][k] / per_seed["oracle"][k] for k in range(len(rates))])
        out = serve(truth[0], online_caps, work)
        late = [(work.phase == k) & (work.arrival - k * phase_s >= phase_s / 2) for k in range(len(rates))]
        early = [(work.phase == k) & (work.arrival - k * phase_s < phase_s / 2) for k in range(len(rates))]
        waits.append([(float(out.wait[e].mean()), float(out.wait[m].mean())) for e, m in zip(early, late, strict=True)])
        settled, wobble = _settling(history, phase_s, len(rates))
        settle.append(settled)
        spread.append(wobble)
    world = f"a batching engine with {slots} slots" if batching else "one request at a time"
    print(f"Steady-phase objective U (after the first {SETTLE_S:g} s of each phase), median of {seeds} seeds, {world}:")
    print()
    print("| policy | " + " | ".join(f"{r:g}/s" for r in rates) + " | whole schedule |")
    print("|---|" + "---|" * (len(rates) + 1))
    for name in policies:
        med = np.median(np.array(rows[name]), axis=0)
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in med) + f" | {statistics.median(totals[name]):.4f} |")
    r = np.median(np.array(ratio), axis=0)
    s = np.median(np.array(settle), axis=0)
    w = np.median(np.array(spread), axis=0)
    print("| online / oracle | " + " | ".join(f"{v:.3f}" for v in r) + " | |")
    print("| online: caps settled after the step (s) | - | " + " | ".join(f"{v:.0f}" for v in s[1:]) + " | |")
    print("| online: steady cap spread (std / mean) | " + " | ".join(f"{v:.2f}" for v in w) + " | |")
    q = np.median(np.array(waits), axis=0)
    print(
        "| online: mean queue wait, first / second half of phase (s) | "
        + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in q)
        + " | |"
    )


def _settling(
    history: list[tuple[float, np.ndarray[Any, Any]]], phase_s: float, phases: int
) -> tuple[list[float], list[float]]:
    """Per phase: seconds from its start until the caps first come within 10 % (or 8 tokens) of
    their steady level (their median over the second half of the phase), and the caps'
    relative spread (standard deviation / mean, averaged over types) in that second half."""
    settle, spread = [], []
    for k in range(phases):
        start, end = k * phase_s, (k + 1) * phase_s
        inside = [(t, c) for t, c in history if start <= t < end]
        late = np.array([c for t, c in inside if t >= start + phase_s / 2])
        level = np.median(late, axis=0)
        band = np.maximum(8.0, 0.1 * level)
        first = next((t for t, c in inside if np.all(np.abs(c - level) <= band)), math.inf)
        settle.append(first - start)
        spread.append(float(np.mean(late.std(axis=0) / np.maximum(late.mean(axis=0), 1.0))))
    return settle, spread


def run_e2e(seconds: float | None) -> None:
    scenario = load_scenario(str(files("thinkcap.sim") / "demo_scenario.toml"))
    if seconds is not None:
        total = sum(p.duration_s for p in scenario.phases)
        scenario = scenario.with_phases(
            [replace(p, duration_s=p.duration_s * seconds / total) for p in scenario.phases]
        )
    with tempfile.TemporaryDirectory() as tmp:
        configure(json_lines=True, stream=io.StringIO())
        rep = asyncio.run(run_demo(scenario, seed=0, log_dir=Path(tmp), out=io.StringIO()))
    print(render(rep))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase-s", type=float, default=300.0, help="seconds per phase of the DES schedule")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--arrival-half-life", type=float, help="override the demo's arrival-rate half-life, s")
    ap.add_argument("--e2e", action="store_true", help="also run the end-to-end comparison (about 90 s)")
    ap.add_argument("--slots", type=int, default=1, help="the server's slots (above 1: the demo's batching engine)")
    ap.add_argument("--rates", help="comma-separated arrival rate per phase, 1/s (default 1,6,12,3)")
    args = ap.parse_args()
    rates = tuple(float(r) for r in args.rates.split(",")) if args.rates else RATES
    configure(json_lines=True, stream=io.StringIO())
    run_des(args.phase_s, args.seeds, args.arrival_half_life, args.slots, rates)
    if args.e2e:
        print()
        run_e2e(None)


if __name__ == "__main__":
    main()
