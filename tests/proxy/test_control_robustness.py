"""The control loop under the conditions that made it misfire: shedding that must end, noise
that must not shed, fits that fail, pins, and pools of many slots (fake clock throughout)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.proxy.conftest import write_config
from tests.proxy.test_control import events, feed, serve, waiting
from thinkcap.controller import problem_from_record
from thinkcap.estimators import GapTally
from thinkcap.proxy.control import ControlLoop, Inputs
from thinkcap.proxy.serve_file import ControllerSettings, load_settings
from thinkcap.proxy.state import ProxyState, build_state


@pytest.fixture
def state(tmp_path: Path) -> ProxyState:
    """Two types, one slot, 0.1 s + 1 ms per token: 10 requests/s at the minimum caps (0 tokens)."""
    return build_state(load_settings(write_config(tmp_path, "http://127.0.0.1:9/v1")))


def decide_every(
    ctl: ControlLoop, state: ProxyState, rate: float, start: float, seconds: float, *, seed: int
) -> list[tuple[float, float]]:
    """Poisson arrivals at ``rate`` with a decision every interval; (time, admit fraction) after each."""
    out = []
    t = start
    k = 0
    while t < start + seconds - 1e-9:
        t = feed(state, rate, t, ctl.settings.interval_s, seed=seed + k)
        k += 1
        assert ctl.step(t) is not None
        out.append((t, state.admit_fraction))
    return out


async def test_shedding_after_a_spike_follows_the_load_back_and_ends(state: ProxyState) -> None:
    """A spike at 10x the capacity sheds; at 90 % of the capacity afterwards (a load the server
    carries) the admit fraction is back to >= 0.95 within 10 s and shedding ends: it is not
    left at the spike's fraction for good."""
    serve(state, 40)
    ctl = ControlLoop(state, ControllerSettings())
    t = feed(state, 4.0, 0.0, 120.0)
    assert ctl.step(t) is not None and not state.shedding
    async with waiting(state, 8):
        spike = decide_every(ctl, state, 100.0, t, 20.0, seed=10)
    assert state.shedding and spike[-1][1] < 0.15
    t = spike[-1][0]
    after = decide_every(ctl, state, 9.0, t, 600.0, seed=100)
    back = next(time for time, admit in after if admit >= 0.95)
    assert back - t <= 10.0
    assert all(admit >= 0.95 for time, admit in after if time >= back)
    assert not state.shedding and state.admit_fraction == 1.0


async def test_an_overload_that_does_not_survive_the_rates_noise_sheds_nothing(state: ProxyState) -> None:
    """An estimate restarted from a short segment (a rate above the capacity, but with a
    standard error that puts its lower bound below it) does not shed, even with a fitted
    service model and requests waiting."""
    serve(state, 40)
    ctl = ControlLoop(state, ControllerSettings())
    t = feed(state, 6.5, 0.0, 300.0)
    local = ctl.local_inputs(t)
    noisy = replace(local.snap, arrival_rate=12.0, arrival_rate_stderr=2.0, recent_rate=12.0, recent_rate_stderr=2.0)
    # 12 - 2 x 2 = 8/s < 9.5/s
    ctl.source = lambda now: replace(local, snap=noisy)
    with capture_logs() as logs:
        async with waiting(state, 3):
            first = ctl.step(t)
            second = ctl.step(t + 2.0)
    assert first is not None and second is not None and first["status"] == "overload"
    assert not state.shedding and state.admit_fraction == 1.0
    assert not events(logs, "overload") and len(events(logs, "overload_unconfirmed")) == 1
    sure = replace(noisy, arrival_rate_stderr=0.5, recent_rate_stderr=0.5)  # 11/s: beyond the noise
    ctl.source = lambda now: replace(local, snap=sure)
    async with waiting(state, 3):
        event = ctl.step(t + 4.0)
    assert event is not None and event["overload_evidence"] == "queue" and state.shedding


def test_a_predicted_overload_without_a_queue_sheds_nothing(tmp_path: Path) -> None:
    """In front of a large engine whose admission queue stays empty, a step fit that reads
    the engine far slower than it is (the proxy's own delays) predicts an overload, and
    nothing is shed: the queue does not confirm it."""
    engine = "slots = 256\nstep = { base_s = 0.001, per_seq_s = 0.00001 }"
    path = write_config(tmp_path, "http://127.0.0.1:9/v1", backend=engine)
    text = path.read_text().replace("overhead_s = 0.1, per_token_s = 0.001", "prefill_s = 0.001")
    path.write_text(text.replace("min_tokens = 0", "min_tokens = 32"))
    state = build_state(load_settings(path))
    assert state.step is not None
    for i in range(60):  # gaps of a saturated proxy: 50 ms a token whatever the batch
        gaps = GapTally()
        for k in range(50):
            gaps.add(0.05 + 0.0002 * ((i + k) % 7), 1, 1 + (i + k) % 64)
        state.step.update(prompt_tokens=20, tokens=51, service_s=2.6, mean_in_service=32.0, gaps=gaps,
                          first_token_s=0.05, now=float(i))  # fmt: skip
    assert state.step.get().fitted
    ctl = ControlLoop(state, ControllerSettings())
    event = ctl.step(feed(state, 200.0, 60.0, 30.0))
    assert event is not None and event["status"] == "overload"
    assert not state.shedding and state.admit_fraction == 1.0 and event["overload_evidence"] is None


async def test_behind_a_gateway_the_engines_own_queue_confirms_an_overload(state: ProxyState) -> None:
    """Behind a gateway (extproc) thinkcap queues nothing: the requests in service beyond the
    backend's slots are the engine's queue, and they confirm an overload as the admission
    queue does for serve; without them nothing is shed. (The admission queue alone never
    confirmed it there, so extproc never shed.)"""
    serve(state, 40)
    ctl = ControlLoop(state, ControllerSettings())
    t = feed(state, 4.0, 0.0, 120.0)
    assert ctl.step(t) is not None and not state.shedding
    occupancy = state.pool.replicas[0].occupancy
    alone = decide_every(ctl, state, 100.0, t, 20.0, seed=10)  # an overload predicted, no queue anywhere
    assert not state.shedding and all(admit == 1.0 for _, admit in alone)
    for _ in range(9):  # nine requests at an engine of one slot: eight wait there
        occupancy.start(alone[-1][0], streamed=False)
    with capture_logs() as logs:
        decide_every(ctl, state, 100.0, alone[-1][0], 20.0, seed=30)
    assert state.shedding
    assert any(e["event"] == "overload" and e.get("on") and e["evidence"] == "queue" for e in logs)


async def test_a_failing_decision_lets_shedding_decay(state: ProxyState) -> None:
    """Decisions that fail keep the caps, and shedding decays to off instead of freezing."""
    serve(state, 40)
    ctl = ControlLoop(state, ControllerSettings())
    async with waiting(state, 8):
        assert ctl.step(feed(state, 100.0, 0.0, 20.0)) is not None
    assert state.shedding and state.admit_fraction < 0.15
    caps = state.caps.effective()

    def broken(now: float) -> Inputs:
        raise RuntimeError("estimates unavailable")

    ctl.source = broken
    fractions = []
    for k in range(8):
        assert ctl.step(30.0 + 2 * k) is None
        fractions.append(state.admit_fraction)
    assert fractions == sorted(fractions) and not state.shedding and state.admit_fraction == 1.0
    assert state.caps.effective() == caps


@pytest.mark.parametrize(
    ("rate", "correct", "low", "span"),
    [(0.05, True, 10, 100), (0.005, False, 1, 4000)],
    ids=["all correct", "all wrong"],
)
def test_unanimous_feedback_never_freezes_the_controller(tmp_path: Path, rate: float, correct: bool, low: int,
                                                         span: int) -> None:  # fmt: skip
    """With the configured base 0 and 120 graded answers that are all correct (or all wrong),
    every decision still succeeds and the curve stays valid (the fit overflowed before)."""
    path = write_config(tmp_path, "http://127.0.0.1:9/v1")
    curve = f"base = 0.0, gain = 0.5, rate = {rate}"
    path.write_text(path.read_text().replace("base = 0.2, gain = 0.7, rate = 0.005", curve))
    state = build_state(load_settings(path))
    for i in range(120):
        state.accuracy["hard"].update(float(low + (37 * i) % span), correct, now=float(i))
    ctl = ControlLoop(state, ControllerSettings())
    first = ctl.step(feed(state, 2.0, 0.0, 100.0))
    second = ctl.step(feed(state, 2.0, 100.0, 10.0, seed=1))
    assert first is not None and second is not None and ctl.failures == 0
    record = first["accuracy"]["hard"]
    assert record["samples"] == 120 and "error" not in record
    base, gain = record["fitted"]["base"], record["fitted"]["gain"]
    assert base >= 0 and gain > 0 and base + gain <= 1


def test_a_failing_curve_fit_falls_back_to_its_configured_curve(
    state: ProxyState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One type's fit raising leaves that type on its configured curve; the decision goes on."""
    ctl = ControlLoop(state, ControllerSettings())
    for i in range(60):
        state.accuracy["hard"].update(float(10 + i), i % 2 == 0, now=float(i))
        state.accuracy["easy"].update(float(10 + i), i % 2 == 0, now=float(i))

    def overflow() -> Any:
        raise OverflowError("math range error")

    monkeypatch.setattr(state.accuracy["hard"], "evidence", overflow)
    event = ctl.step(feed(state, 2.0, 0.0, 100.0))
    assert event is not None
    assert event["accuracy"]["hard"]["source"] == "configured" and "OverflowError" in event["accuracy"]["hard"]["error"]
    assert "error" not in event["accuracy"]["easy"]
    hard = next(k for k in event["inputs"]["types"] if k["name"] == "hard")
    assert (hard["accuracy_base"], hard["accuracy_gain"], hard["accuracy_rate"]) == (0.2, 0.7, 0.005)


async def test_curves_are_refitted_off_the_event_loop_and_kept_only_if_current(state: ProxyState) -> None:
    """refresh_curves fits in a worker thread and installs the fit; feedback that arrives
    meanwhile makes the copy stale, and it is not installed."""
    curve = state.accuracy["easy"]
    for i in range(40):
        curve.update(float(10 + 20 * i), i % 3 != 0, now=float(i))
    assert not curve.cached
    ctl = ControlLoop(state, ControllerSettings())
    await ctl.refresh_curves()
    assert curve.cached
    copy_of = curve.__class__(0.6, 0.3, 0.05)
    copy_of.update(1.0, True, now=0.0)
    curve.update(500.0, True, now=100.0)
    assert not curve.adopt(copy_of) and not curve.cached


def test_a_zero_step_intercept_is_a_valid_pool(tmp_path: Path) -> None:
    """``base_s = 0`` (what calibrate can write) loads with a pool of replicas and decides."""
    engine = "slots = 4\nstep = { base_s = 0.0, per_seq_s = 0.002 }"
    path = write_config(tmp_path, "http://127.0.0.1:9/v1", backend=engine)
    text = path.read_text().replace("overhead_s = 0.1, per_token_s = 0.001", "prefill_s = 0.05")
    two = 'url = ["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"]'
    path.write_text(text.replace('url = "http://127.0.0.1:9/v1"', two))
    state = build_state(load_settings(path))
    event = ControlLoop(state, ControllerSettings()).step(feed(state, 4.0, 0.0, 60.0))
    assert event is not None and event["inputs"]["queue"]["step_base_s"] == 0.0


def test_pinned_caps_enter_the_problem(state: ProxyState) -> None:
    """A pinned cap is the load the server carries: the problem holds it as a fixed cap, the
    predicted load is the load at the caps in force, and the other type's cap shrinks for it."""
    ctl = ControlLoop(state, ControllerSettings())
    t = feed(state, 3.0, 0.0, 300.0)
    free = ctl.step(t)
    state.caps.pin({"hard": 1000})
    pinned = ctl.step(feed(state, 3.0, t, 2.0, seed=1))
    assert free is not None and pinned is not None
    hard = next(k for k in pinned["inputs"]["types"] if k["name"] == "hard")
    assert hard["min_tokens"] == hard["max_tokens"] == 1000
    p = problem_from_record(pinned["inputs"])
    in_force = np.array([state.caps.effective()[n] for n in p.names], dtype=float)
    assert pinned["predicted_rho"] == pytest.approx(p.metrics(in_force).rho)
    assert pinned["predicted_rho"] > 0.5 * 3.0 * 1.1  # half the arrivals take 0.1 + 1.0 s
    assert pinned["caps"]["easy"] < free["caps"]["easy"]


def test_a_pin_that_overloads_the_server_is_an_overload(state: ProxyState) -> None:
    """With one type pinned at 4000 tokens the load at the caps in force exceeds the capacity:
    the decision says overload, where leaving the pin out read 0.64."""
    ctl = ControlLoop(state, ControllerSettings())
    state.caps.pin({"hard": 4000})
    event = ctl.step(feed(state, 1.0, 0.0, 300.0))
    assert event is not None and event["status"] == "overload" and event["load_at_min_caps"] > 1.0
