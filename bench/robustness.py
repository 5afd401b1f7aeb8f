"""Robustness of the control loop: decision time by pool size, the event loop's worst stall
while the loop decides, and the admit fraction after a spike.

Run: .venv/bin/python bench/robustness.py [--decisions N]

- *Decision time*: ``ControlLoop.step`` (estimates -> problem -> solve -> caps -> event) on a
  proxy configured with R replicas of c slots each (the pooled queue model), fed Poisson
  arrivals at 60 % of the capacity at the minimum caps; median and maximum over N decisions
  (perf_counter). Goal: <= 20 ms at 8 x 256 slots.
- *Event-loop stall*: the control loop's task (``ControlLoop.run``, interval 0.05 s, accuracy
  curves refitted in a worker thread after each batch of graded feedback) on the event loop
  beside a ticker that sleeps 1 ms and records how late it wakes; the worst lateness over the
  run, at 8 x 256 slots. Goal: <= 50 ms.
- *Spike then settle*: one slot, 0.1 s per request at the minimum caps (capacity 10/s); a
  spike at 100/s for 20 s with requests waiting in the admission queue, then 9/s (90 % of the
  capacity); a decision every 2 s on a fake clock. Reported: seconds after the spike until the
  admit fraction is >= 0.95, and until shedding ends. Goal: admit fraction >= 0.95 within 10 s.

``--e2e`` runs the demo's world (``sim/demo_scenario.toml``: an 8-slot simulated engine, step
5 + 7 ms x j at 20x speed) through the demo's in-process stacks, adaptive and static side by
side on the same open-loop streamed arrivals:

- *steady*: Poisson at 65 % of the capacity at the minimum caps for ``--steady-s`` (600 s);
- *bursty*: a two-state process: 37 % of the capacity at the static caps for 120-240 s, then
  a burst at 3x that capacity for 5-30 s, over ``--bursty-s`` (600 s), about 60 % on average;
- *spike*: 10x the capacity at the minimum caps for 20 s, then 90 % of it for 60 s.

Reported per run: requests shed (503) or refused with the admission queue full (429), and
those outside bursts (after a burst's end plus 10 s), the slowest
return of the admit fraction to >= 0.95 after a burst or spike ends (from the adaptive
proxy's decisions), the live step fit's tau(1) and tau(8) (as the queue model reads them: the
measured levels, the line above them) against the engine's (nominal, and
as it measured its own steps on the wall clock: a busy event loop makes them late), predicted
over observed mean system time (decisions and answers after the first 30 s, outside bursts
and the minute after each: a burst is no steady state), and the
measured objective of adaptive and static (caps optimal for the run's mean rate), with
their difference request by request and its standard error (the same arrivals and
correctness draws reach both). Goals:
0 shed in the steady run; in the bursty run shedding only in bursts and the admit fraction
back within 10 s; the step fit within 10 %; the prediction within 15 %; adaptive >= static.
``--only spike`` makes one run; ``--time-scale 0.2`` runs the engine at 5x speed instead of
20x (the demo's).

``--only demo`` (with ``--e2e``) runs ``thinkcap demo``'s schedule at ``--demo-s`` seconds in
all (default 320: 80-s phases, so that a light phase holds about a hundred answers once
settled), 8 slots then 1, and prints the report's predicted over observed mean system time
per phase (intervals from 10 s into each phase). Goal: within 15 % in every phase that
predicts (an overload predicts no time). Beside it, the queue model fed the truth over the
same requests (the engine's step and prefills, the phase's own arrival rate and the answers'
lengths) against their observed mean: what is left of the miss once the estimates are
right.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.proxy.conftest import write_config
from tests.proxy.test_control import feed
from thinkcap.cli.demo import Stack, demo_scenario, open_stack, run_demo
from thinkcap.cli.report import phase_ratios, ratio_text, read_log
from thinkcap.controller import decide, load_at_min_caps
from thinkcap.proxy.control import ControlLoop
from thinkcap.proxy.logs import configure
from thinkcap.proxy.logs import reset as reset_logging
from thinkcap.proxy.serve_file import ControllerSettings, load_settings
from thinkcap.proxy.state import ProxyState, build_state
from thinkcap.sim.backend import STATE_KEY
from thinkcap.sim.loadgen import SHED_STATUSES, LoadSettings, Record, run_load
from thinkcap.sim.scenario import LoadPhase, Scenario
from thinkcap.sim.summary import summarise_records

#: Decisions and answers in the first seconds of a run (estimates still settling) are not compared.
SETTLE_S = 30.0
#: Nor are those within this many seconds after a burst ends (its backlog is still draining).
CALM_AFTER_S = 60.0

STEP = "step = { base_s = 0.007, per_seq_s = 0.008 }"


def pool_state(tmp: Path, replicas: int, slots: int) -> ProxyState:
    urls = ", ".join(f'"http://127.0.0.1:{9000 + i}/v1"' for i in range(replicas))
    path = write_config(tmp, "http://127.0.0.1:9000/v1", backend=f"slots = {slots}\n{STEP}")
    text = path.read_text().replace("overhead_s = 0.1, per_token_s = 0.001", "prefill_s = 0.05")
    if replicas > 1:
        text = text.replace('url = "http://127.0.0.1:9000/v1"', f"url = [{urls}]")
    path.write_text(text)
    return build_state(load_settings(path))


def capacity(state: ProxyState) -> float:
    q = state.settings.model.queue
    return 1.0 / (0.05 * q.load_factor())


def decision_times(replicas: int, slots: int, n: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        state = pool_state(Path(tmp), replicas, slots)
        ctl = ControlLoop(state, ControllerSettings())
        rate = 0.6 * capacity(state)
        t = feed(state, rate, 0.0, 5.0)
        times = []
        for k in range(n):
            t = feed(state, rate, t, 0.2, seed=k + 1)
            started = time.perf_counter()
            assert ctl.step(t) is not None
            times.append(time.perf_counter() - started)
        return statistics.median(times), max(times)


async def worst_stall(seconds: float) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        state = pool_state(Path(tmp), 8, 256)
        ctl = ControlLoop(state, ControllerSettings(interval_s=0.05, min_resolve_interval_s=0.0))
        loop = asyncio.get_running_loop()
        rng = np.random.default_rng(2)
        worst = 0.0
        task = asyncio.create_task(ctl.run())
        end = loop.time() + seconds
        k = 0
        while loop.time() < end:
            now = state.clock()
            state.arrived("hard" if rng.random() < 0.5 else "easy", now)
            if k % 50 == 0:  # a batch of graded answers: the curves need a refit
                for _ in range(20):
                    state.accuracy["hard"].update(float(rng.integers(1, 4000)), bool(rng.random() < 0.7), now=now)
            k += 1
            due = loop.time() + 0.001
            await asyncio.sleep(0.001)
            worst = max(worst, loop.time() - due)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return worst, ctl.decisions


async def spike_then_settle() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        state = build_state(load_settings(write_config(Path(tmp), "http://127.0.0.1:9/v1")))
        ctl = ControlLoop(state, ControllerSettings())
        t = feed(state, 4.0, 0.0, 120.0)
        ctl.step(t)
        await state.admission.enter()
        waiting = [asyncio.create_task(state.admission.enter()) for _ in range(8)]
        await asyncio.sleep(0)
        for k in range(10):
            t = feed(state, 100.0, t, 2.0, seed=10 + k)
            ctl.step(t)
        for w in waiting:
            w.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        state.admission.leave()
        assert state.shedding
        settle = t
        back = ended = float("nan")
        k = 100
        while t < settle + 600:
            k += 1
            t = feed(state, 9.0, t, 2.0, seed=k)
            ctl.step(t)
            if math.isnan(back) and state.admit_fraction >= 0.95:
                back = t - settle
            if not state.shedding:
                ended = t - settle
                break
        return back, ended


def capacities(scenario: Scenario) -> tuple[float, float]:
    """Requests/s the engine carries at the minimum caps, and at the static caps for 60 % of
    the capacity those caps give (found by fixed-point iteration)."""
    per_unit = load_at_min_caps(scenario.problem(1.0))
    at_min = 1.0 / per_unit
    rate = 0.6 * at_min
    for _ in range(30):
        p = scenario.problem(rate)
        caps = decide(p).rounded.caps
        cap_static = rate / p.metrics(np.asarray(caps, dtype=float)).rho
        rate = 0.6 * cap_static
    return at_min, cap_static


def bursty_phases(
    base: float, burst: float, seconds: float, rng: np.random.Generator
) -> tuple[list[LoadPhase], list[tuple[float, float]]]:
    phases, bursts, t = [], [], 0.0
    while t < seconds:
        calm = min(float(rng.uniform(120, 240)), seconds - t)
        phases.append(LoadPhase(calm, base))
        t += calm
        if t >= seconds:
            break
        length = min(float(rng.uniform(5, 30)), seconds - t)
        phases.append(LoadPhase(length, burst))
        bursts.append((t, t + length))
        t += length
    return phases, bursts


async def served_run(scenario: Scenario, bursts: list[tuple[float, float]], seed: int) -> dict[str, object]:
    """Adaptive and static stacks on the same streamed arrivals; what the adaptive proxy decided."""
    total = sum(p.duration_s for p in scenario.phases)
    stacks: list[Stack] = [await open_stack(scenario, policy, 1.0) for policy in ("adaptive", "static")]
    decisions: list[dict[str, object]] = []
    adaptive = stacks[0]
    assert adaptive.state.controller is not None
    try:
        started = time.monotonic()
        offset = started - adaptive.state.clock()
        adaptive.state.controller.on_decision.append(
            lambda e: decisions.append({**e, "at": float(e["time"]) + offset - started})  # type: ignore[arg-type]
        )
        loads = [
            run_load(
                scenario,
                LoadSettings(target=s.url, seed=seed, stream=True, drain_s=30.0, timeout_s=total + 60),
                on_record=s.records.append,
            )
            for s in stacks
        ]
        await asyncio.gather(*loads)
        engine = adaptive.sim.app[STATE_KEY].engine
        wall = {} if engine is None else {j: (w / n, n) for j, (w, n) in engine.wall.items() if n}
        live = None if adaptive.state.step is None else adaptive.state.step.get()
    finally:
        for s in stacks:
            await s.close()
    truth = scenario.problem(1.0).queue
    weights = {t.name: t.task.weight for t in scenario.types}
    whole = [LoadPhase(total, 1.0)]

    def objective(records: list[Record]) -> float | None:
        flat = [replace(r, phase=0) for r in records]
        (row,) = summarise_records(flat, whole, weights=weights, latency_penalty=scenario.wall_penalty)
        return row.objective

    records = adaptive.records
    shed = [r for r in records if r.status in SHED_STATUSES]  # 503 shed, 429 the admission queue full
    outside = [r for r in shed if not any(a <= r.send_s <= b + 10.0 for a, b in bursts)]
    backs = []
    for _, end in bursts:
        after = [float(d["at"]) for d in decisions if float(d["at"]) >= end and float(d["admit_fraction"]) >= 0.95]  # type: ignore[arg-type]
        backs.append(after[0] - end if after else math.inf)

    def calm(t: float) -> bool:
        """Settled, and not in a burst or the minute after it (no steady state to predict there)."""
        return t >= SETTLE_S and not any(a <= t <= b + CALM_AFTER_S for a, b in bursts)

    predicted = [
        float(d["predicted_mean_system_time"])  # type: ignore[arg-type]
        for d in decisions
        if calm(float(d["at"])) and d["predicted_mean_system_time"] is not None  # type: ignore[arg-type]
    ]
    observed = [r.system_time_s for r in records if r.answered and calm(r.send_s) and r.system_time_s is not None]
    nominal = (truth.step_time(1), truth.step_time(truth.slots))  # type: ignore[attr-defined]
    measured = None
    if len(wall) >= 2:  # the engine's wall-clock step per occupancy, a line weighted by its steps
        js = np.array(sorted(wall), dtype=float)
        means = np.array([wall[int(j)][0] for j in js])
        by_steps = np.sqrt([wall[int(j)][1] for j in js])
        b, a = np.polyfit(js, means, 1, w=by_steps)
        measured = (float(a + b), float(a + b * truth.slots), {int(j): round(wall[int(j)][0], 6) for j in js})  # type: ignore[attr-defined]
    fit = None
    if live is not None:  # tau(j) as the queue model reads it: the measured levels, the line above them
        slots = truth.slots  # type: ignore[attr-defined]
        levels = [round(v, 6) for v in live.levels]
        fit = (live.step_time(1), live.step_time(slots), "fitted" if live.fitted else "configured", levels)
    return {
        "sent": len(records),
        "shed": len(shed),
        "shed_outside_bursts": len(outside),
        "slowest_return_s": max(backs) if backs else None,
        "step_engine": nominal,
        "step_engine_measured": measured,
        "step_fit": fit,
        "predicted_over_observed": (statistics.mean(predicted) / statistics.mean(observed))
        if predicted and observed
        else None,
        "objective_adaptive": objective(stacks[0].records),
        "objective_static": objective(stacks[1].records),
        "objective_difference": paired_difference(stacks[0].records, stacks[1].records, weights, scenario.wall_penalty),
        "errors": sum(1 for r in records if not r.answered and r.status not in SHED_STATUSES),
    }


def paired_difference(
    adaptive: list[Record], static: list[Record], weights: dict[str, float], penalty: float
) -> tuple[float, float] | None:
    """Adaptive's objective less static's, request by request (both stacks get the same
    arrivals and the same correctness draws), and its standard error by batch means (20
    batches in sending order: a queue's times are correlated)."""
    other = {r.id: r for r in static}

    def score(r: Record) -> float:
        return weights.get(r.type, 1.0) * bool(r.correct) - penalty * float(r.system_time_s or 0.0)

    pairs = [(r, other[r.id]) for r in sorted(adaptive, key=lambda r: r.send_s) if r.id in other]
    diff = np.array([score(a) - score(b) for a, b in pairs if a.answered and b.answered
                     and a.correct is not None and b.correct is not None])  # fmt: skip
    if diff.size < 40:
        return None
    means = np.array([c.mean() for c in np.array_split(diff, 20)])
    return float(diff.mean()), float(means.std(ddof=1) / math.sqrt(means.size))


def e2e(steady_s: float, bursty_s: float, seed: int, only: set[str], time_scale: float | None) -> None:
    base = demo_scenario(None)
    if time_scale is not None:  # a slower engine: its steps are longer than the event loop's own delays
        base = replace(base, time_scale=time_scale)
    at_min, at_static = capacities(base)
    rng = np.random.default_rng(seed)
    phases, bursts = bursty_phases(0.37 * at_static, 3.0 * at_static, bursty_s, rng)
    runs = {
        "steady": (base.with_phases([LoadPhase(steady_s, 0.65 * at_min)]), []),
        "bursty": (base.with_phases(phases), bursts),
        "spike": (base.with_phases([LoadPhase(20.0, 10 * at_min), LoadPhase(60.0, 0.9 * at_min)]), [(0.0, 20.0)]),
    }
    print(f"capacity at the minimum caps {at_min:.1f}/s, at the static caps {at_static:.1f}/s")
    for name, (scenario, spans) in runs.items():
        if name not in only:
            continue
        mean = sum(p.mean_rate * p.duration_s for p in scenario.phases) / sum(p.duration_s for p in scenario.phases)
        out = asyncio.run(served_run(scenario, spans, seed))
        print(f"\n{name}: {sum(p.duration_s for p in scenario.phases):.0f} s, mean rate {mean:.1f}/s, "
              f"{len(spans)} burst(s) {[(round(a), round(b)) for a, b in spans]}")  # fmt: skip
        for key, value in out.items():
            print(f"  {key}: {value}")


def demo_prediction(duration_s: float, seed: int) -> None:
    """``thinkcap demo``'s schedule over ``duration_s``, 8 slots then 1: the predicted over
    observed mean system time per phase, as its report computes it."""
    for slots in (8, 1):
        scenario = demo_scenario(duration_s, slots)
        with tempfile.TemporaryDirectory() as tmp:
            log_path = Path(tmp) / "thinkcap.jsonl"
            with log_path.open("w") as log, open(os.devnull, "w") as quiet:
                configure(json_lines=True, stream=log)
                try:
                    asyncio.run(run_demo(scenario, seed=seed, log_dir=Path(tmp), out=quiet))
                finally:
                    reset_logging()
            data = read_log(str(log_path))
            rows = phase_ratios(data)
        print(f"\ndemo, {slots} slot(s), {duration_s:g} s: predicted / observed mean system time per phase")
        for k, r in enumerate(rows):
            ratio = "-" if r["ratio"] is None else ratio_text(r)
            pred = "-" if r["predicted"] is None else f"{r['predicted']:.3f} s"
            obs = "-" if r["observed"] is None else f"{r['observed']:.3f} s"
            truth = "-" if r["ratio"] is None else model_on_truth(scenario, data.requests, data.phases, k, r["from_s"])
            print(f"  {r['name']:<9} {r['offered_rate']:>5g}/s  predicted {pred:>8}  observed {obs:>8}  "
                  f"ratio {ratio:>12}  ({r['requests']} requests from {r['from_s']:.0f} s in)  "
                  f"model on the truth / observed {truth}")  # fmt: skip


def model_on_truth(scenario: Scenario, requests: list[dict[str, Any]], phases: list[dict[str, Any]], k: int,
                   from_s: float) -> str:  # fmt: skip
    """The queue model fed the truth of phase ``k``'s answered requests from ``from_s`` in: the
    engine's step and each type's prefill, the rate at which they arrived and their answers'
    lengths; over their observed mean system time (``-``: the model has the phase unstable)."""
    start = float(phases[k]["time"])
    end = min(float(phases[k + 1]["time"]) if k + 1 < len(phases) else math.inf, start + float(phases[k]["duration_s"]))
    done = [r for r in requests if start + from_s <= r["arrival_time"] < end and r["status"] == 200]
    if not done:
        return "-"
    s = scenario.time_scale
    kinds = scenario.by_name()
    work = np.array([s * (kinds[r["type"]].task.overhead_s + kinds[r["type"]].task.per_token_s * r["completion_tokens"])
                     for r in done])  # fmt: skip
    truth = scenario.problem(len(done) / (end - start - from_s))
    m1, m2 = float(work.mean()), float((work**2).mean())
    if truth.kappa * m1 + truth.rho0 >= 1.0:
        return "-"
    observed = statistics.fmean(r["system_time_s"] for r in done)
    return f"{truth.queue_terms(m1).system_time(m2) / observed:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decisions", type=int, default=50)
    ap.add_argument("--stall-s", type=float, default=10.0)
    ap.add_argument("--e2e", action="store_true", help="the steady, bursty and spike runs through the demo's stacks")
    ap.add_argument("--steady-s", type=float, default=600.0)
    ap.add_argument("--bursty-s", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--log", type=Path, default=Path(os.devnull), help="the proxies' JSON-lines log (--e2e)")
    ap.add_argument("--only", default="steady,bursty,spike", help="the --e2e runs to make (comma-separated)")
    ap.add_argument("--time-scale", type=float, help="--e2e: the engine's time scale (the demo's: 0.05, 20x speed)")
    ap.add_argument("--demo-s", type=float, default=320.0, help="--e2e --only demo: the schedule's length")
    args = ap.parse_args()
    if args.e2e and "demo" in args.only.split(","):
        demo_prediction(args.demo_s, args.seed)
        if args.only == "demo":
            return
    if args.e2e:
        with args.log.open("w") as log:
            configure(json_lines=True, stream=log)
            e2e(args.steady_s, args.bursty_s, args.seed, set(args.only.split(",")), args.time_scale)
        return
    print("decision time (ControlLoop.step), Poisson at 60 % of the capacity")
    print(f"{'pool':>10} {'median ms':>10} {'max ms':>8}")
    for replicas, slots in ((1, 4), (4, 256), (8, 128), (8, 256)):
        med, top = decision_times(replicas, slots, args.decisions)
        print(f"{replicas:>4} x {slots:<4} {1e3 * med:>10.2f} {1e3 * top:>8.2f}")
    worst, decisions = asyncio.run(worst_stall(args.stall_s))
    print(f"\nevent loop, 8 x 256 slots, decisions every 50 ms for {args.stall_s:g} s ({decisions} decisions, "
          f"curves refitted in a worker thread): worst stall {1e3 * worst:.1f} ms")  # fmt: skip
    back, ended = asyncio.run(spike_then_settle())
    print(f"\nspike (100/s, 20 s) then 9/s on a 10/s server: admit fraction >= 0.95 after {back:.0f} s, "
          f"shedding ended after {ended:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
