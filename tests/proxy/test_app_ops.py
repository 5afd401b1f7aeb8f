"""Health, readiness, metrics and the admin listener."""

from __future__ import annotations

import asyncio
import math
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.proxy.conftest import Stack, StackFactory, write_config
from tests.sim.conftest import sim_type
from thinkcap.cli import main
from thinkcap.proxy import app
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.state import build_state

HARD = [{"role": "user", "content": "<hard> prove it"}]


async def get(url: Any, **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:
        return r.status, (await r.json()) if r.content_type == "application/json" else await r.text()


async def send(s: Stack, n: int = 1) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.post(f"{s.url}/chat/completions", json={"messages": HARD}) as r:
                assert r.status == 200


async def test_healthz_and_readyz(stack: StackFactory) -> None:
    """/healthz is always up; /readyz is 200 with caps when the upstream answers, 503 when not."""
    s = await stack()
    assert (await get(s.proxy.make_url("/healthz")))[0] == 200
    status, body = await get(s.proxy.make_url("/readyz"))
    assert status == 200 and body["ready"] is True and set(body["caps"]) == {"hard", "easy"}
    down = await stack(upstream="http://127.0.0.1:9")
    status, body = await get(down.proxy.make_url("/readyz"))
    assert status == 503 and body["ready"] is False and "failed" in body["upstream"]


async def test_metrics_expose_requests_latency_caps_tokens_and_estimates(stack: StackFactory) -> None:
    """/metrics has the documented series with values that match the traffic sent."""
    s = await stack()
    await send(s, 3)
    status, text = await get(s.proxy.make_url("/metrics"))
    assert status == 200
    lines = text.splitlines()

    def value(prefix: str) -> float:
        (line,) = [ln for ln in lines if ln.startswith(prefix)]
        return float(line.rsplit(" ", 1)[1])

    assert value('thinkcap_requests_total{status="200",type="hard"}') == 3
    assert value('thinkcap_system_time_seconds_count{type="hard"}') == 3
    assert value('thinkcap_queue_wait_seconds_count{type="hard"}') == 3
    assert value('thinkcap_cap_tokens{type="hard"}') == s.state.caps.cap("hard")
    reasoning = min(400, s.state.caps.cap("hard"))
    assert value('thinkcap_tokens_total{kind="reasoning",type="hard"}') == 3 * reasoning
    assert value("thinkcap_arrival_rate ") > 0
    assert value('thinkcap_type_prior{type="hard"}') > 0.5
    assert value("thinkcap_queue_length ") == 0
    assert value("thinkcap_in_flight ") == 0


async def test_the_genai_convention_metrics_and_an_unbuffered_stream(stack: StackFactory) -> None:
    """Beside the thinkcap_* series, /metrics has OpenTelemetry's GenAI ones with the
    conventions' buckets: tokens by type (input, output, reasoning), request duration, time to
    the first token and per output token (streamed answers); a stream carries
    ``X-Accel-Buffering: no`` so that an nginx in front does not hold it back."""
    s = await stack()
    await send(s, 2)
    async with aiohttp.ClientSession() as session:
        body = {"messages": HARD, "stream": True}
        async with session.post(f"{s.url}/chat/completions", json=body) as r:
            assert r.status == 200 and r.headers["X-Accel-Buffering"] == "no"
            await r.read()
    await asyncio.sleep(0.05)
    _, text = await get(s.proxy.make_url("/metrics"))
    lines = text.splitlines()

    def value(prefix: str) -> float:
        (line,) = [ln for ln in lines if ln.startswith(prefix)]
        return float(line.rsplit(" ", 1)[1])

    op = 'gen_ai_operation_name="chat"'
    for kind in ("input", "output", "reasoning"):
        assert value(f'gen_ai_client_token_usage_count{{{op},gen_ai_token_type="{kind}"}}') == 3
    reasoning = min(400, s.state.caps.cap("hard"))
    assert value(f'gen_ai_client_token_usage_sum{{{op},gen_ai_token_type="reasoning"}}') == 3 * reasoning
    assert value(f'gen_ai_client_token_usage_bucket{{{op},gen_ai_token_type="reasoning",le="4.0"}}') == 0
    assert value(f"gen_ai_server_request_duration_count{{{op}}}") == 3
    assert value(f'gen_ai_server_request_duration_bucket{{{op},le="81.92"}}') == 3
    assert value(f"gen_ai_server_time_to_first_token_count{{{op}}}") == 1  # the streamed one
    assert value(f"gen_ai_server_time_per_output_token_count{{{op}}}") == 1


async def test_metrics_show_the_requests_in_flight_and_waiting_at_the_scrape(stack: StackFactory) -> None:
    """With one slot, one slow request in flight and two behind it read as 1 and 2."""
    s = await stack(proxy="max_concurrency = 1", time_scale=1.0, types=(sim_type("hard", natural=300),))
    s.state.caps.pin({"hard": 300})  # 0.1 + 0.3 s of service each

    def gauge(text: str, name: str) -> float:
        (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
        return float(line.rsplit(" ", 1)[1])

    tasks = [asyncio.create_task(send(s)) for _ in range(3)]
    while s.state.admission.queued < 2:
        await asyncio.sleep(0.01)
    _, text = await get(s.proxy.make_url("/metrics"))
    assert gauge(text, "thinkcap_in_flight") == 1 and gauge(text, "thinkcap_queue_length") == 2
    await asyncio.gather(*tasks)
    _, text = await get(s.proxy.make_url("/metrics"))
    assert gauge(text, "thinkcap_in_flight") == 0 and gauge(text, "thinkcap_queue_length") == 0


async def test_admin_pins_and_unpins_caps_that_the_upstream_then_sees(stack: StackFactory) -> None:
    """PUT /admin/caps pins a cap used by the next request; DELETE restores the table."""
    s = await stack()
    admin = s.admin.make_url("/admin/caps")
    async with aiohttp.ClientSession() as session:
        async with session.put(admin, json={"caps": {"hard": 17}}) as r:
            assert r.status == 200 and (await r.json())["caps"]["hard"] == 17
        await send(s)
        assert (await s.upstream_bodies())[-1]["thinking_token_budget"] == 17
        for bad in ({"caps": {"poetry": 3}}, {"caps": {"hard": -1}}, {"caps": []}):
            async with session.put(admin, json=bad) as r:
                assert r.status == 400
        async with session.delete(admin, params={"type": "hard"}) as r:
            assert r.status == 200 and (await r.json())["pins"] == {}
        await send(s)
        assert (await s.upstream_bodies())[-1]["thinking_token_budget"] == s.state.caps.table.caps["hard"]


async def test_admin_state_and_feedback(stack: StackFactory) -> None:
    """GET /admin/state shows caps and estimates; feedback by request id reaches the accuracy
    curve, once per request: a second grade of the same request answers 409 and counts nothing."""
    s = await stack()
    async with aiohttp.ClientSession() as session:
        rids = []
        for _ in range(30):
            async with session.post(f"{s.url}/chat/completions", json={"messages": HARD}) as r:
                rids.append(r.headers["X-Request-Id"])
        fb = s.admin.make_url("/admin/feedback")
        for rid in rids:
            async with session.post(fb, json={"request_id": rid, "correct": False}) as r:
                assert r.status == 200 and (await r.json())["type"] == "hard"
        for again in (False, True):
            async with session.post(fb, json={"request_id": rids[0], "correct": again}) as r:
                assert r.status == 409 and "graded already" in (await r.json())["error"]["message"]
        assert s.state.accuracy["hard"].samples == 30
        rid = rids[0]
        async with session.post(fb, json={"request_id": "nope", "correct": True}) as r:
            assert r.status == 404
        async with session.post(fb, json={"request_id": rid, "score": 7}) as r:
            assert r.status == 400
    status, state = await get(s.admin.make_url("/admin/state"))
    assert status == 200 and state["feedback"] == 30
    assert state["caps"] == s.state.caps.effective() and state["estimates"]["arrival_rate"] > 0
    tokens = s.state.recent[rid].reasoning_tokens
    assert tokens is not None

    def p(c: dict[str, float]) -> float:
        return c["base"] + c["gain"] * (1 - math.exp(-c["rate"] * tokens))

    fitted = state["estimates"]["accuracy"]["hard"]
    assert p(fitted) < p({"base": 0.2, "gain": 0.7, "rate": 0.005}) - 0.05  # 30 wrong answers pull it down


async def test_admin_bearer_token(stack: StackFactory) -> None:
    """With admin_token set, the admin API needs it."""
    s = await stack(proxy='admin_token = "s3cret"')
    assert (await get(s.admin.make_url("/admin/state")))[0] == 401
    ok = await get(s.admin.make_url("/admin/state"), headers={"Authorization": "Bearer s3cret"})
    assert ok[0] == 200
    assert (await get(s.admin.make_url("/admin/state"), headers={"Authorization": "Bearer wrong"}))[0] == 401
    for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive
        assert (await get(s.admin.make_url("/admin/state"), headers={"Authorization": f"{scheme} s3cret"}))[0] == 200
    assert (await get(s.admin.make_url("/admin/state"), headers={"Authorization": "Basic s3cret"}))[0] == 401


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('[backend]\nurl = "ftp://x"', "backend.url"),
        ('[backend]\nurl = "http://x"\ndialect = "tgi"', "backend.dialect"),
        ('[backend]\nurl = "http://x"\nread_timeout_s = -1', "backend.read_timeout_s"),
        ('[backend]\nurl = "http://x"\n[proxy]\nlisten = "nope"', "proxy.listen"),
        ('[backend]\nurl = "http://x"\n[proxy]\nmax_concurrency = 0', "proxy.max_concurrency"),
        ('[backend]\nurl = "http://x"\n[proxy]\ndefault_type = "poetry"', "proxy.default_type"),
        ('[backend]\nurl = "http://x"\n[proxy]\nmax_queue_length = 3', "proxy.max_queue_length"),
        ('[backend]\nurl = "http://x"\n[proxy]\nmax_connections = 0', "proxy.max_connections"),
        ('[backend]\nurl = "http://x"\n[proxy]\nhead_timeout_s = 0', "proxy.head_timeout_s"),
        ('[backend]\nurl = "http://x"\nmax_answer_bytes = 10', "backend.max_answer_bytes"),
        ("", "backend"),
    ],
)
def test_serve_config_errors_name_the_key(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], extra: str, key: str
) -> None:
    """``thinkcap serve`` with a bad [backend] or [proxy] exits 2 naming file and key."""
    example = (Path(__file__).resolve().parents[2] / "examples" / "thinkcap.toml").read_text()
    example = example[: example.index("[backend]")] + example[example.index("[objective]") :]
    cfg = tmp_path / "c.toml"
    cfg.write_text(extra + "\n" + example)
    assert main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: {key}:" in err and "Traceback" not in err


def test_serve_on_a_taken_port_exits_2_with_one_line(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """``thinkcap serve`` whose listen address is in use says so in one line and exits 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.toml"
        example = (Path(__file__).resolve().parents[2] / "examples" / "thinkcap.toml").read_text()
        cfg.write_text(example)
        assert main(["serve", "--config", str(cfg), "--listen", f"127.0.0.1:{port}", "--loop", "asyncio"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


async def test_a_start_that_fails_after_listening_leaves_nothing_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure once the listener is up (here, in the start-up log line) closes the listener, the
    upstream clients and the probe task again before it propagates."""

    class Broken:
        def info(self, *_: Any, **__: Any) -> None:
            raise RuntimeError("the log is gone")

        def warning(self, *_: Any, **__: Any) -> None:
            pass

    monkeypatch.setattr(app, "logger", Broken)
    state = build_state(load_settings(write_config(tmp_path, "http://127.0.0.1:9/v1", backend="probe = true")))
    plane = app.create_app(state)
    with pytest.raises(RuntimeError, match="the log is gone"):
        await plane.start("127.0.0.1", 0)
    assert state.session is None and all(r.upstream is None for r in state.pool.replicas)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", plane.port)
