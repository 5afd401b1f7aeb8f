"""The open-loop load generator and its per-phase summary, against the simulated server."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.sim.conftest import ServerFactory, make_scenario, sim_type
from thinkcap.cli import main
from thinkcap.sim.backend import STATE_KEY
from thinkcap.sim.loadgen import LoadSettings, Record, arrival_times, run_load
from thinkcap.sim.scenario import Faults, LoadPhase
from thinkcap.sim.summary import summarise_records

EXAMPLE_SCENARIO = Path(__file__).resolve().parents[2] / "examples" / "scenario.toml"


def test_arrival_counts_follow_the_schedule() -> None:
    """Mean counts per phase match rate x duration, ramps included (5 standard errors, 400 seeds)."""
    phases = [LoadPhase(10.0, 2.0), LoadPhase(10.0, 1.0, 5.0), LoadPhase(5.0, 0.0)]
    counts = np.array(
        [np.bincount(arrival_times(phases, np.random.default_rng(s))[1], minlength=3) for s in range(400)]
    )
    expected = np.array([20.0, 30.0, 0.0])
    assert np.all(np.abs(counts.mean(axis=0) - expected) <= 5 * np.sqrt(np.maximum(expected, 1e-9) / 400))
    times, tags = arrival_times(phases, np.random.default_rng(1))
    assert np.all(np.diff(times) >= 0) and np.all((times >= 10) == (tags >= 1))


def test_a_ramp_puts_more_arrivals_late_than_early() -> None:
    """On a 1 -> 5 ramp over 10 s the second half expects 20 arrivals and the first half 10."""
    phases = [LoadPhase(10.0, 1.0, 5.0)]
    times = np.concatenate([arrival_times(phases, np.random.default_rng(s))[0] for s in range(300)])
    early, late = np.sum(times < 5.0), np.sum(times >= 5.0)
    assert late / early == pytest.approx(2.0, rel=0.08)


async def test_open_loop_keeps_sending_when_the_server_falls_behind(sim_server: ServerFactory) -> None:
    """Sends follow the drawn schedule even when every answer waits behind a backlog."""
    server = await sim_server(time_scale=1.0, types=(sim_type("hard", natural=100, overhead=0.05),))  # 0.156 s each
    scenario = make_scenario(types=(sim_type("hard"),), phases=(LoadPhase(1.5, 20.0),))
    settings = LoadSettings(target=str(server.make_url("/")), seed=4, drain_s=20.0)
    result = await run_load(scenario, settings)
    times, _ = arrival_times(scenario.phases, np.random.default_rng(4))
    assert [r.send_s for r in result.records] == pytest.approx(list(times))
    assert all(r.answered for r in result.records)
    waits = [r.first_byte_s - r.send_s for r in result.records if r.first_byte_s is not None]
    assert waits[-1] > 10 * waits[0] and waits[-1] > 1.0  # a backlog built up behind the server
    assert server.app[STATE_KEY].received == len(result.records) == times.size


async def test_the_run_stops_by_itself_and_records_what_it_cancelled(sim_server: ServerFactory) -> None:
    """Requests still open after the drain time are cancelled and recorded, never lost."""
    server = await sim_server(time_scale=1.0, types=(sim_type("hard", natural=1000),))  # 1.1 s each
    scenario = make_scenario(types=(sim_type("hard"),), phases=(LoadPhase(0.5, 10.0),))
    result = await run_load(scenario, LoadSettings(target=str(server.make_url("/v1")), seed=2, drain_s=0.5))
    kinds = {r.error for r in result.records}
    assert kinds <= {None, "cancelled"} and "cancelled" in kinds
    assert [r.id for r in result.records] == list(range(len(result.records)))


async def test_stream_records_tokens_and_correctness(sim_server: ServerFactory) -> None:
    """Streaming records carry usage-based tokens and the truth header; answers are all judged."""
    server = await sim_server()
    scenario = make_scenario(phases=(LoadPhase(1.0, 40.0),))
    settings = LoadSettings(target=str(server.make_url("/")), stream=True, extra_body={"thinking_token_budget": 30})
    result = await run_load(scenario, settings)
    assert result.records and all(r.answered and r.correct is not None for r in result.records)
    for r in result.records:
        assert r.reasoning_tokens == 30
        assert r.completion_tokens == 36 and r.prompt_tokens == len(f"<{r.type}> a {r.type} question".split())


async def test_errors_are_counted_not_raised(sim_server: ServerFactory) -> None:
    """500s, drops and malformed answers become error records; a dead target gives connect errors."""
    server = await sim_server(faults=Faults(error_rate=0.25, drop_rate=0.25, malformed_rate=0.25))
    scenario = make_scenario(phases=(LoadPhase(1.0, 60.0),))
    result = await run_load(scenario, LoadSettings(target=str(server.make_url("/")), stream=True, seed=1))
    errors = {r.error for r in result.records}
    assert {"http", "protocol", "disconnected"} <= errors
    assert any(r.answered for r in result.records)
    dead = await run_load(make_scenario(phases=(LoadPhase(0.3, 20.0),)),
                          LoadSettings(target="http://127.0.0.1:9", drain_s=5.0))  # fmt: skip
    assert dead.records and {r.error for r in dead.records} == {"connect"}


def test_summary_matches_the_records() -> None:
    """Per-phase counts, percentiles, accuracy and objective are computed from that phase only."""
    rng = np.random.default_rng(0)
    recs = []
    for i in range(300):
        phase = i % 2
        sys_t = float(rng.exponential(0.5 + phase))
        rec = Record(id=i, phase=phase, type="a" if i % 3 else "b", send_s=float(i), first_byte_s=float(i),
                     end_s=i + sys_t, status=200, correct=bool(rng.random() < 0.6))  # fmt: skip
        if i % 10 == 0:
            rec.status, rec.error = 429, "shed"
        if i % 25 == 0:
            rec.status, rec.error = 0, "timeout"
        recs.append(rec)
    rows = summarise_records(recs, [LoadPhase(100.0, 1.5), LoadPhase(100.0, 1.5)], weights={"a": 1.0, "b": 2.0},
                             latency_penalty=0.1)  # fmt: skip
    for k, row in enumerate(rows):
        ok = [r for r in recs if r.phase == k and r.answered]
        t = np.array([r.system_time_s for r in ok])
        assert row.sent == 150 and row.answered == len(ok)
        assert row.shed == sum(1 for r in recs if r.phase == k and r.error == "shed")
        assert row.p99_s == pytest.approx(np.percentile(t, 99)) and row.mean_s == pytest.approx(t.mean())
        score = np.mean([(1.0 if r.type == "a" else 2.0) * r.correct for r in ok])
        assert row.objective == pytest.approx(score - 0.1 * t.mean())
        assert row.throughput == pytest.approx(len(ok) / 100.0)


async def test_feedback_is_posted_for_every_judged_answer(sim_server: ServerFactory) -> None:
    """Graded feedback reaches the given URL once per answered request, with the documented fields."""
    got: list[dict[str, Any]] = []

    async def collect(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/feedback", collect)
    sink = TestServer(app, host="127.0.0.1")
    await sink.start_server()
    try:
        server = await sim_server()
        scenario = make_scenario(phases=(LoadPhase(1.0, 30.0),))
        settings = LoadSettings(target=str(server.make_url("/")), feedback_url=str(sink.make_url("/feedback")))
        result = await run_load(scenario, settings)
    finally:
        await sink.close()
    assert result.feedback_sent == len(result.records) == len(got) and result.feedback_errors == 0
    by_id = {r.request_id: r for r in result.records}
    for fb in got:
        rec = by_id[fb["request_id"]]
        assert fb["score"] == (1.0 if rec.correct else 0.0) and fb["type"] == rec.type
        assert fb["reasoning_tokens"] == rec.reasoning_tokens


async def test_loadgen_cli_prints_phases_and_writes_json_lines(
    sim_server: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``thinkcap loadgen`` against the example scenario writes one line per request and a JSON summary."""
    server = await sim_server()
    out = tmp_path / "records.jsonl"
    argv = ["loadgen", "--target", str(server.make_url("/")), "--scenario", str(EXAMPLE_SCENARIO),
            "--phase", "0.5:20", "--phase", "0.5:40", "--out", str(out), "--json"]  # fmt: skip
    code = await asyncio.get_running_loop().run_in_executor(None, main, argv)
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["sent"] for p in summary["phases"]] == [sum(r["phase"] == k for r in rows) for k in (0, 1)]
    assert set(rows[0]) >= {"type", "send_s", "first_byte_s", "end_s", "status", "prompt_tokens",
                            "reasoning_tokens", "completion_tokens", "correct", "system_time_s"}  # fmt: skip
    assert {r["type"] for r in rows} <= {"math", "code", "reasoning", "chat"}
    assert all(math.isfinite(p["mean_s"]) for p in summary["phases"])


async def test_event_times_keep_each_text_event_and_the_servers_own_clock() -> None:
    """With ``event_times``, each streamed event that brought text is kept with its arrival time
    and the server's ``timings.predicted_ms`` where it sends one; events without text (the role,
    the finish, usage) are not; without the setting nothing is kept."""

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunks: list[dict[str, Any]] = [
            {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
            {"choices": [{"index": 0, "delta": {"content": "Hel"}}], "timings": {"predicted_ms": 5.0}},
            {"choices": [{"index": 0, "delta": {"content": "lo"}}], "timings": {"predicted_ms": 17.5}},
            {"choices": [{"index": 0, "delta": {"content": "!"}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "timings": {"predicted_ms": 18.0}},
            {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}},
        ]
        for c in chunks:
            await resp.write(f"data: {json.dumps(c)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with TestServer(app, host="127.0.0.1") as server:
        scenario = make_scenario(phases=(LoadPhase(0.5, 10.0),))
        kept = await run_load(scenario, LoadSettings(target=str(server.make_url("/")), stream=True, event_times=True))
        plain = await run_load(scenario, LoadSettings(target=str(server.make_url("/")), stream=True))
    assert kept.records and all(r.answered for r in kept.records)
    for r in kept.records:
        assert r.events is not None and [clock for _, clock in r.events] == [5.0, 17.5, None]
        times = [t for t, _ in r.events]
        assert times == sorted(times) and r.send_s <= times[0] and times[-1] <= (r.end_s or 0.0)
    assert plain.records and all(r.events is None for r in plain.records)
