"""The control loop, driven by a fake clock: publish, hysteresis, fail-static, overload, pins."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

import thinkcap.controller.decision as decision_module
from tests.proxy.conftest import write_config
from thinkcap.cli import main
from thinkcap.controller import SolveResult, Status, problem_from_record, solve
from thinkcap.controller.problem import TaskType
from thinkcap.estimators import StepEstimate
from thinkcap.proxy.control import ControlLoop, build_problem, decode_overlap
from thinkcap.proxy.serve_file import ControllerSettings, load_settings
from thinkcap.proxy.state import ProxyState, build_state


@pytest.fixture
def state(tmp_path: Path) -> ProxyState:
    return build_state(load_settings(write_config(tmp_path, "http://127.0.0.1:9/v1")))


def feed(state: ProxyState, rate: float, start: float, seconds: float, seed: int = 0) -> float:
    """Poisson arrivals of both types at ``rate`` from ``start``; returns the end time."""
    rng = np.random.default_rng(seed)
    t = start
    while True:
        t += float(rng.exponential(1 / rate))
        if t > start + seconds:
            return start + seconds
        state.arrived("hard" if rng.random() < 0.5 else "easy", t)


def serve(state: ProxyState, n: int, seed: int = 0) -> None:
    """``n`` answers per type served as the configured model says (0.1 s + 1 ms per token):
    enough for a fitted service model, the evidence that makes a predicted overload real."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        for name in ("hard", "easy"):
            tokens = float(rng.integers(10, 400))
            state.estimators.served(
                name, prompt_tokens=20, completion_tokens=tokens, service_time=0.1 + 0.001 * tokens, now=0.0
            )


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_caps_shrink_when_load_grows_and_are_published(state: ProxyState) -> None:
    """A busier server gets smaller caps; each change is one caps_published event."""
    ctl = ControlLoop(state, ControllerSettings())
    with capture_logs() as logs:
        t = feed(state, 1.0, 0.0, 400.0)
        light = ctl.step(t)
        t = feed(state, 8.0, t, 400.0, seed=1)
        heavy = ctl.step(t)
    assert light is not None and heavy is not None
    assert light["arrival_source"] == "estimate" and heavy["inputs"]["arrival_rate"] > 5
    assert all(heavy["caps"][n] < light["caps"][n] for n in ("hard", "easy") if light["caps"][n] > 0)
    assert state.caps.effective() == heavy["caps"] and state.caps.table.decision_id == heavy["decision_id"]
    assert len(events(logs, "caps_published")) == sum(e["published"] for e in events(logs, "decision"))


def test_hysteresis_keeps_caps_that_barely_move(state: ProxyState) -> None:
    """A re-solve that moves no cap beyond the threshold, at about the same predicted latency,
    publishes nothing."""
    ctl = ControlLoop(state, ControllerSettings(hysteresis_tokens=0, hysteresis_relative=0.0))
    t = feed(state, 2.0, 0.0, 200.0)
    first = ctl.step(t)
    assert first is not None and first["published"] is True
    ctl.settings = ControllerSettings()  # the defaults: 8 tokens, 5 %, latency 20 %
    again = ctl.step(feed(state, 2.0, t, 2.0, seed=1))
    assert again is not None and again["caps"] != first["caps"]
    assert again["published"] is False and state.caps.effective() == first["caps"]


def test_the_caps_hold_through_the_noise_of_a_steady_rate_and_follow_a_real_change(state: ProxyState) -> None:
    """Without the rate band every re-solve on a steady Poisson load that moves a cap is
    published (the caps follow the estimate's noise); with it (the default 2 standard errors),
    a move is published only when it pays at both ends of the band: next to none over a
    steady minute, and a doubled rate still moves the caps at once."""
    published = {}
    for z in (0.0, ControllerSettings().hysteresis_rate_z):
        st = build_state(state.settings)
        ctl = ControlLoop(st, ControllerSettings(hysteresis_tokens=0, hysteresis_relative=0.0, hysteresis_rate_z=z))
        t = feed(st, 3.0, 0.0, 200.0)
        assert (first := ctl.step(t)) is not None and first["published"]
        events_ = []
        for k in range(60):
            t = feed(st, 3.0, t, 2.0, seed=k + 1)
            events_.append(ctl.step(t))
        published[z] = sum(bool(e and e["published"]) for e in events_)
        if z > 0:
            held = st.caps.effective()
            t = feed(st, 6.0, t, 30.0, seed=99)
            moved = ctl.step(t)
            assert moved is not None and moved["published"]
            assert all(moved["caps"][n] <= held[n] for n in held) and moved["caps"] != held
    assert published[0.0] >= 10 and published[2.0] <= 2, published


@pytest.mark.parametrize("rate", [2.0, 4.0], ids=["inside the stability margin", "beyond it"])
def test_hysteresis_never_keeps_caps_under_which_a_queue_builds_up(state: ProxyState, rate: float) -> None:
    """However wide the token hysteresis, caps whose predicted mean system time is more than
    ``hysteresis_latency`` above the new caps' are replaced; the replacements are then kept."""
    ctl = ControlLoop(state, ControllerSettings(hysteresis_tokens=10_000))
    before = dict(state.caps.table.caps)
    t = feed(state, rate, 0.0, 200.0)
    event = ctl.step(t)
    assert event is not None
    p = problem_from_record(event["inputs"])
    old = p.metrics(np.array([before[n] for n in p.names], dtype=float))
    assert (old.rho < p.rho_max) == (rate == 2.0)
    assert old.mean_system_time > 1.2 * event["predicted_mean_system_time"]
    assert event["published"] is True and state.caps.effective() == event["caps"] != before
    again = ctl.step(feed(state, rate, t, 2.0, seed=1))
    assert again is not None and again["published"] is False and state.caps.effective() == event["caps"]


def test_configured_rate_is_used_until_enough_arrivals(state: ProxyState) -> None:
    """Before min_arrivals the [workload] rate stands in for the estimate."""
    ctl = ControlLoop(state, ControllerSettings(min_arrivals=1000))
    t = feed(state, 3.0, 0.0, 30.0)
    event = ctl.step(t)
    assert event is not None and event["arrival_source"] == "config" and event["inputs"]["arrival_rate"] == 1.0


def test_solver_failure_keeps_the_last_caps(state: ProxyState, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed solve (or a crash) is logged and the caps in force stay."""
    ctl = ControlLoop(state, ControllerSettings())
    before = state.caps.effective()

    def broken(p: Any, **_: Any) -> SolveResult:
        x = np.full(len(p.types), np.nan)
        return SolveResult(x=x, fun=np.nan, status=Status.FAILED, nit=1, nfev=1, residual=np.nan, method="exact")

    monkeypatch.setattr(decision_module, "solve", broken)
    with capture_logs() as logs:
        assert ctl.step(feed(state, 5.0, 0.0, 100.0)) is None
    assert state.caps.effective() == before and ctl.failures == 1
    (failed,) = events(logs, "decision_failed")
    assert "solver exact failed" in failed["error"] and not events(logs, "decision")


def test_nan_estimates_are_fail_static(state: ProxyState, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-finite estimate (the estimators refuse non-finite input, so numerical trouble
    inside one) never reaches the solver; the caps stay."""
    ctl = ControlLoop(state, ControllerSettings())
    before = state.caps.effective()
    monkeypatch.setattr(state.answer, "get", lambda now=None: {"hard": float("nan")})
    with capture_logs() as logs:
        assert ctl.step(feed(state, 5.0, 0.0, 100.0)) is None
    assert state.caps.effective() == before
    assert "finite" in events(logs, "decision_failed")[0]["error"]


@asynccontextmanager
async def waiting(state: ProxyState, n: int) -> AsyncIterator[None]:
    """``n`` requests waiting in the admission queue (its one slot taken) while inside."""
    await state.admission.enter()
    tasks = [asyncio.create_task(state.admission.enter()) for _ in range(n)]
    await asyncio.sleep(0)
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        state.admission.leave()


@pytest.mark.parametrize("hysteresis_tokens", [8, 10_000])
async def test_overload_sheds_and_recovers(state: ProxyState, hysteresis_tokens: int) -> None:
    """No stable allocation, confirmed by the queue: minimum caps (whatever the hysteresis)
    and partial shedding; when load falls, shedding stops."""
    ctl = ControlLoop(state, ControllerSettings(hysteresis_tokens=hysteresis_tokens))
    serve(state, 40)
    with capture_logs() as logs:
        t = feed(state, 40.0, 0.0, 300.0)  # minimum caps need 0.1 s each: 40/s is 4x the capacity
        async with waiting(state, 8):
            over = ctl.step(t)
        assert over is not None and over["status"] == "overload"
        assert state.shedding and 0.15 < state.admit_fraction < 0.3
        assert state.caps.effective() == {"hard": 0, "easy": 0}
        t = feed(state, 1.0, t, 1200.0, seed=2)
        calm = ctl.step(t)
    assert calm is not None and calm["status"] == "converged" and not state.shedding and state.admit_fraction == 1.0
    assert [(e["on"], e["evidence"]) for e in events(logs, "overload")] == [(True, "queue"), (False, None)]
    assert over["overload_evidence"] == "queue"


async def test_a_backlog_is_served_at_the_caps_it_came_under(state: ProxyState) -> None:
    """When the load falls while more requests wait than the slots hold (the end of a burst),
    the decided caps rise but those in force do not, until the backlog has drained: longer
    answers would stretch every wait behind them (after thinkcap demo's overload, 12 s)."""
    ctl = ControlLoop(state, ControllerSettings())
    t = feed(state, 8.0, 0.0, 300.0)
    busy = ctl.step(t)
    assert busy is not None
    t = feed(state, 0.2, t, 600.0, seed=1)
    async with waiting(state, 3):  # one slot, three waiting
        held = ctl.step(t)
        assert held is not None and held["caps"] != busy["caps"]
        assert all(held["caps"][n] >= busy["caps"][n] for n in held["caps"])
        assert state.caps.effective() == busy["caps"]
        assert held["held_by_backlog"] == 3 and busy["held_by_backlog"] is None
    drained = ctl.step(feed(state, 0.2, t, 5.0, seed=2))
    assert drained is not None and drained["held_by_backlog"] is None and drained["published"]
    assert state.caps.effective() == drained["caps"] != busy["caps"]


def test_an_overload_the_queue_does_not_confirm_sheds_nothing(state: ProxyState) -> None:
    """Without requests waiting in the admission queue, a predicted overload (here with a fitted
    service model) admits everything and is logged once as unconfirmed; the caps still go to
    the minimum."""
    ctl = ControlLoop(state, ControllerSettings())
    serve(state, 40)
    with capture_logs() as logs:
        t = feed(state, 40.0, 0.0, 300.0)
        first = ctl.step(t)
        second = ctl.step(feed(state, 40.0, t, 5.0, seed=1))
    assert first is not None and second is not None
    assert first["status"] == second["status"] == "overload" and first["overload_evidence"] is None
    assert not state.shedding and state.admit_fraction == 1.0 and not first["shedding"]
    assert state.caps.effective() == {"hard": 0, "easy": 0}
    assert len(events(logs, "overload_unconfirmed")) == 1 and not events(logs, "overload")


async def test_a_growing_queue_confirms_an_overload(state: ProxyState) -> None:
    """Requests piling up in the admission queue are evidence enough to shed."""
    ctl = ControlLoop(state, ControllerSettings())
    t = feed(state, 40.0, 0.0, 300.0)
    assert ctl.step(t) is not None and not state.shedding
    await state.admission.enter()  # the one slot is taken; the next ones wait
    waiting = [asyncio.create_task(state.admission.enter()) for _ in range(3)]
    await asyncio.sleep(0)
    try:
        event = ctl.step(feed(state, 40.0, t, 2.0, seed=1))
        assert event is not None and event["overload_evidence"] == "queue" and state.shedding
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def test_shedding_holds_for_its_dwell_time(tmp_path: Path) -> None:
    """Once on, shedding stays on for shed_min_dwell_s even when the load has fallen at once."""
    estimators = "arrival_half_life_s = 1.0\ndetector_window_s = 0.5\ndetector_reference_s = 10.0"
    path = write_config(tmp_path, "http://127.0.0.1:9/v1")
    path.write_text(path.read_text() + "\n[estimators]\n" + estimators + "\n")
    state = build_state(load_settings(path))
    serve(state, 40)
    ctl = ControlLoop(state, ControllerSettings(shed_min_dwell_s=10.0))
    t = feed(state, 40.0, 0.0, 30.0)
    async with waiting(state, 8):
        assert ctl.step(t) is not None and state.shedding
    t = feed(state, 0.5, t, 8.0, seed=1)  # 8 half-lives later the estimate has fallen
    calm = ctl.step(t)
    assert calm is not None and calm["status"] == "converged" and state.shedding  # 8 s < 10 s
    t = feed(state, 0.5, t, 3.0, seed=2)
    assert ctl.step(t) is not None and not state.shedding


def test_feedback_moves_the_caps_toward_the_optimum_of_the_true_curve(state: ProxyState) -> None:
    """Graded answers drawn from a true curve that gains far more from reasoning than the
    configured one pull the caps toward the true optimum; the decision says which curve it used,
    and the problem it logged (which audit replays) holds that curve."""
    ctl = ControlLoop(state, ControllerSettings(hysteresis_tokens=0, hysteresis_relative=0.0))
    serve(state, 40)
    t = feed(state, 2.0, 0.0, 300.0)
    configured = ctl.step(t)
    assert configured is not None and configured["accuracy"]["easy"]["source"] == "configured"
    true_easy = (0.05, 0.9, 0.004)  # configured: base 0.6, gain 0.3, rate 0.05 (saturates by ~60 tokens)
    truth = replace(problem_from_record(configured["inputs"]), types=tuple(
        replace(k, accuracy_base=true_easy[0], accuracy_gain=true_easy[1], accuracy_rate=true_easy[2])
        if k.name == "easy" else k for k in problem_from_record(configured["inputs"]).types))  # fmt: skip
    optimum = dict(zip(truth.names, solve(truth).x, strict=True))["easy"]
    rng = np.random.default_rng(5)
    curve = state.accuracy["easy"]
    for i in range(400):
        tokens = float(rng.choice([20, 100, 250, 500, 900]))
        p = true_easy[0] + true_easy[1] * -np.expm1(-true_easy[2] * tokens)
        curve.update(tokens, bool(rng.random() < p), now=float(i))
    learnt = ctl.step(feed(state, 2.0, t, 5.0, seed=1))
    assert learnt is not None and learnt["accuracy"]["easy"]["source"] == "feedback"
    assert learnt["accuracy"]["easy"]["stderr"] <= state.settings.estimators.accuracy_max_stderr
    used = next(k for k in learnt["inputs"]["types"] if k["name"] == "easy")
    assert used["accuracy_rate"] < 0.02  # configured 0.05: the fitted curve keeps rising much longer
    before, after = configured["caps_continuous"]["easy"], learnt["caps_continuous"]["easy"]
    assert abs(after - optimum) < 0.5 * abs(before - optimum)


def test_thin_feedback_keeps_the_configured_curve(state: ProxyState) -> None:
    """Feedback at one token level, however much, does not pin a three-parameter curve down."""
    ctl = ControlLoop(state, ControllerSettings())
    for k in range(200):
        state.accuracy["easy"].update(30.0, k % 4 != 0, now=float(k))
    event = ctl.step(feed(state, 2.0, 0.0, 100.0))
    assert event is not None and event["accuracy"]["easy"]["source"] == "configured"
    assert event["accuracy"]["easy"]["levels"] == 1
    easy = next(k for k in event["inputs"]["types"] if k["name"] == "easy")
    assert (easy["accuracy_base"], easy["accuracy_gain"], easy["accuracy_rate"]) == (0.6, 0.3, 0.05)


def test_pinned_caps_win_until_unpinned(state: ProxyState) -> None:
    """The controller's table changes underneath a pin without overriding it."""
    ctl = ControlLoop(state, ControllerSettings(hysteresis_tokens=0, hysteresis_relative=0.0))
    state.caps.pin({"hard": 5})
    event = ctl.step(feed(state, 4.0, 0.0, 300.0))
    assert event is not None and event["pinned"] == {"hard": 5} and state.caps.cap("hard") == 5
    state.caps.unpin()
    assert state.caps.cap("hard") == event["caps"]["hard"]


async def test_run_wakes_early_when_the_change_detector_fires(state: ProxyState) -> None:
    """With a long interval, a flagged rate change still triggers a decision at once."""
    ctl = ControlLoop(state, ControllerSettings(interval_s=3600.0))
    task = asyncio.create_task(ctl.run())
    try:
        await asyncio.sleep(0)
        assert ctl.decisions == 0
        t = feed(state, 1.0, 0.0, 600.0)
        feed(state, 20.0, t, 10.0, seed=3)
        assert ctl.changed()
        ctl.wake.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert ctl.decisions == 1 and not ctl.changed()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_the_change_detector_asks_for_at_most_one_decision_per_min_resolve_interval(state: ProxyState) -> None:
    """Wake-ups many times a second give a decision at most every min_resolve_interval_s."""
    ctl = ControlLoop(state, ControllerSettings(interval_s=3600.0, min_resolve_interval_s=0.5))
    task = asyncio.create_task(ctl.run())
    try:
        for _ in range(100):  # one second of wake-ups, 100 a second
            ctl.wake.set()
            await asyncio.sleep(0.01)
        assert 1 <= ctl.decisions <= 3  # at 0 s, and at most at 0.5 s and 1.0 s
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def record(state: ProxyState, path: Path) -> list[dict[str, Any]]:
    """Run a few decisions over a load step and write their events as a JSON-lines log."""
    ctl = ControlLoop(state, ControllerSettings())
    with capture_logs() as logs:
        t = 0.0
        for k, rate in enumerate((1.0, 1.0, 6.0, 6.0, 40.0, 1.0)):
            t = feed(state, rate, t, 120.0 if rate < 40 else 60.0, seed=k)
            ctl.step(t)
    path.write_text("".join(json.dumps(e) + "\n" for e in logs))
    return logs


def test_audit_replays_every_decision_without_mismatch(state: ProxyState, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The proxy's own decision log replays exactly; the summary shows the overload period."""
    log = tmp_path / "thinkcap.jsonl"
    logged = record(state, log)
    assert main(["audit", str(log), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decisions"] == len(events(logged, "decision")) == 6 and report["mismatches"] == []
    assert len(report["overload_periods"]) == 1 and report["overload_periods"][0]["end"] is not None
    assert [iv["status"] for iv in report["intervals"]].count("overload") == 1
    assert main(["audit", str(log)]) == 0 and "mismatches 0" in capsys.readouterr().out


def test_audit_reports_tampering_and_corrupt_lines(state: ProxyState, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A changed cap is a mismatch (exit 1); a truncated line is reported by number, not fatal."""
    log = tmp_path / "thinkcap.jsonl"
    record(state, log)
    lines = log.read_text().splitlines()
    target = next(i for i, ln in enumerate(lines) if json.loads(ln)["event"] == "decision")
    event = json.loads(lines[target])
    event["caps"]["hard"] += 1
    lines[target] = json.dumps(event)
    lines.insert(2, lines[3][: len(lines[3]) // 2])
    log.write_text("\n".join(lines) + "\n")
    assert main(["audit", str(log), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert len(report["mismatches"]) == 1 and "integer caps" in report["mismatches"][0]["why"]
    assert report["bad_lines"][0]["line"] == 3
    assert main(["audit", str(tmp_path / "missing.jsonl")]) == 2


def test_an_arrival_counted_after_a_later_one_is_not_lost(state: ProxyState) -> None:
    """Requests are stamped when they start and counted once their body is read: an earlier
    stamp counted second does not make the estimators refuse it."""
    state.arrived("hard", 5.0)
    state.arrived("easy", 4.9)
    assert state.arrivals == 2 and state.estimators.snapshot(6.0).arrivals > 1.5


def batching_state(tmp_path: Path) -> ProxyState:
    """Both types on an 8-slot engine: per type a 20 ms prefill, per token the step at one sequence."""
    engine = "slots = 8\nstep = { base_s = 0.004, per_seq_s = 0.001 }"
    path = write_config(tmp_path, "http://127.0.0.1:9/v1", backend=engine)
    path.write_text(path.read_text().replace("overhead_s = 0.1, per_token_s = 0.001", "prefill_s = 0.02"))
    return build_state(load_settings(path))


def test_a_batching_engine_is_planned_with_its_queue_model_and_logged_for_audit(tmp_path: Path) -> None:
    """The decision solves the engine's queue model (its record in the event replays it), admits
    slots requests at once, and keeps the configured service times alone on the engine even
    when live answers, slowed by the batch they shared, suggest others."""
    state = batching_state(tmp_path)
    assert state.admission.max_concurrency == 8
    serve(state, 40)  # fitted from service times 0.1 + 1 ms/token: not the engine's alone-time
    ctl = ControlLoop(state, ControllerSettings())
    event = ctl.step(feed(state, 20.0, 0.0, 30.0))
    assert event is not None and event["status"] == "converged"
    assert event["inputs"]["queue"] == {"model": "batching", "slots": 8, "step_base_s": 0.004, "step_per_seq_s": 0.001,
                                        "prefill_s": pytest.approx(0.02),
                                        "overlap": event["inputs"]["queue"]["overlap"]}  # fmt: skip
    assert 0.5 < event["inputs"]["queue"]["overlap"] < 1  # two types of equal work each, at different caps
    used = {t["name"]: t for t in event["inputs"]["types"]}
    assert used["hard"]["per_token_s"] == pytest.approx(0.005 * state.used.get()["hard"])
    assert used["hard"]["overhead_s"] == pytest.approx(0.02 + 0.005 * state.answer_offsets()["hard"])
    replayed = problem_from_record(json.loads(json.dumps(event["inputs"])))
    caps = np.array([event["caps"][n] for n in replayed.names], dtype=float)
    assert replayed.metrics(caps).mean_system_time == pytest.approx(event["predicted_mean_system_time"])
    assert 0 < event["predicted_rho"] < 1


def test_a_first_tokens_own_wait_is_no_service_and_no_pause(tmp_path: Path) -> None:
    """A fitted step with an own wait before the first token (the hops, the step in
    progress): each type's overhead and the pause the batch waits for are the prefill alone
    (read as service, the batch's slowdown stretched the wait)."""
    state = batching_state(tmp_path)
    serve(state, 40)
    est = StepEstimate(0.004, 0.001, 0.01, 0.0001, 0.0, 0.0, 100, 1000, True, (), 0.005)
    snap = state.estimators.snapshot(0.0)
    problem = build_problem(state.settings.model, snap, {}, 5.0, step=est, prompt_tokens={"hard": 100, "easy": 100})
    assert [t.overhead_s for t in problem.types] == pytest.approx([0.02, 0.02])
    assert problem.queue.prefill_s == pytest.approx(0.02)


def test_the_decode_overlap_is_one_over_one_plus_the_decode_work_scv() -> None:
    """At the caps given, the decode work (time alone less the prefill) of two equally likely
    types of 1 s and 3 s: E[D]^2 / E[D^2] = 4 / 5; equal work gives 1; a type's variance and a
    missing cap (read at its largest) count."""

    def task(name: str, per_token: float, variance: float = 0.0) -> TaskType:
        return TaskType(name, 0.5, 0.2, 0.6, 0.01, 0.25, per_token, 0, 100, variance_s2=variance)

    tasks = [task("a", 0.01), task("b", 0.03)]
    pre = [0.25, 0.25]  # the whole overhead: the decode is the tokens' time
    assert decode_overlap(tasks, pre, {"a": 100, "b": 100}) == pytest.approx(0.8)
    assert decode_overlap([task("a", 0.01), task("b", 0.01)], pre, {"a": 100, "b": 100}) == pytest.approx(1.0)
    assert decode_overlap([task("a", 0.01, 1.0)], [0.25], {"a": 100}) == pytest.approx(1 / 2)
    assert decode_overlap(tasks, pre, {"a": 50}) == decode_overlap(tasks, pre, {"a": 50, "b": 100})
