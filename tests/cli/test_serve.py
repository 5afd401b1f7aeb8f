"""``thinkcap serve`` as a process: the drain on SIGTERM, in front of a simulated server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from tests.cli.test_sim import free_port
from tests.proxy.conftest import write_config
from tests.proxy.fleet import Replica
from tests.sim.conftest import make_scenario, sim_type
from thinkcap.sim.backend import create_app as create_sim
from thinkcap.sim.sse import sse_data

HARD = [{"role": "user", "content": "<hard> prove it"}]
EASY = [{"role": "user", "content": "<easy> say hello"}]
LONG = 4000  # reasoning tokens of a long answer: 4 s at 1 ms a token


@asynccontextmanager
async def serving(tmp_path: Path, proxy: str) -> AsyncIterator[Replica]:
    """A simulated server (1 ms a token) and ``thinkcap serve`` in front of it, the hard type's
    cap pinned to LONG; ``proxy`` adds to the ``[proxy]`` table."""
    sim = TestServer(create_sim(make_scenario(time_scale=1.0, slots=4, types=(sim_type("hard", natural=LONG),
                                                                       sim_type("easy", natural=20)))),
                     host="127.0.0.1")  # fmt: skip
    await sim.start_server()
    port, admin = free_port(), free_port()
    listen = f'listen = "127.0.0.1:{port}"\nadmin_listen = "127.0.0.1:{admin}"\nmax_concurrency = 4\n'
    config = write_config(tmp_path, str(sim.make_url("/v1")), proxy=listen + proxy, backend="probe = false")
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "thinkcap.cli", "serve", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    served = Replica("serve", port, admin, log, proc)
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "thinkcap serve did not start"
                try:
                    async with session.put(f"http://127.0.0.1:{admin}/admin/caps", json={"caps": {"hard": LONG}}) as r:
                        assert r.status == 200, await r.text()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        await sim.close()


async def stream(session: aiohttp.ClientSession, url: str) -> tuple[int, list[dict[str, Any] | str]]:
    """A streamed hard answer: its status and its events (``"[DONE]"`` as a string)."""
    body = {"messages": HARD, "stream": True}
    events: list[dict[str, Any] | str] = []
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        async for line in r.content:
            event = sse_data(line)
            if event is not None:
                events.append(event)
        return r.status, events


async def until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_sigterm_fails_readiness_at_once_takes_requests_for_min_drain_s_and_finishes_those_in_flight(
    tmp_path: Path,
) -> None:
    """On SIGTERM /readyz answers 503 at once; new requests are still answered for min_drain_s
    (a load balancer has yet to notice); then the listener closes, the answer in flight (4 s)
    finishes whole, and the process exits 0. Before, the listener closed at once: readiness
    never failed first and a request sent just after the signal was refused."""
    async with serving(tmp_path, "min_drain_s = 1.5\ndrain_timeout_s = 20\n") as s, aiohttp.ClientSession() as session:
        long = asyncio.create_task(stream(session, s.url))

        async def in_service() -> bool:
            async with session.get(f"http://127.0.0.1:{s.admin}/admin/state") as r:
                return bool((await r.json())["queue"]["in_flight"] >= 1)

        await until(in_service)
        async with session.get(s.url + "/readyz") as r:
            assert r.status == 200
        s.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        async def not_ready() -> bool:
            async with session.get(s.url + "/readyz") as r:
                return r.status == 503 and "draining" in (await r.json())["reason"]

        await until(not_ready, timeout=1.0)
        async with session.post(s.url + "/v1/chat/completions", json={"messages": EASY}) as r:
            assert r.status == 200  # still taken: the load balancer may still send here
        assert time.monotonic() - signalled < 1.5

        async def refused() -> bool:
            try:
                async with session.get(s.url + "/healthz") as r:
                    await r.read()
                    return False
            except aiohttp.ClientConnectionError:
                return True

        await until(refused, timeout=5.0)
        assert time.monotonic() - signalled >= 1.5  # not before min_drain_s
        status, events = await long
        assert status == 200 and events[-1] == "[DONE]"
        assert not any(isinstance(e, dict) and "error" in e for e in events)
        assert await asyncio.to_thread(s.proc.wait, 20) == 0
    names = [e["event"] for e in s.events()]
    assert names.index("drain") < names.index("shutdown")


async def test_what_outlasts_the_drain_ends_with_an_error_and_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    """drain_timeout_s = 0.5 against a 4-s answer: the stream ends with an ``error`` event
    (code ``shutting_down``), not a cut connection, and a whole answer waited for gets a 503
    body. Then, with a 60-s min_drain_s, a second SIGTERM stops the process at once."""
    async with serving(tmp_path, "min_drain_s = 0.2\ndrain_timeout_s = 0.5\n") as s, aiohttp.ClientSession() as session:
        long = asyncio.create_task(stream(session, s.url))
        whole = asyncio.create_task(session.post(s.url + "/v1/chat/completions", json={"messages": HARD}))

        async def two_in_service() -> bool:
            async with session.get(f"http://127.0.0.1:{s.admin}/admin/state") as r:
                return bool((await r.json())["queue"]["in_flight"] >= 2)

        await until(two_in_service)
        s.proc.send_signal(signal.SIGTERM)
        status, events = await long
        assert status == 200 and isinstance(events[-1], dict)
        assert events[-1]["error"]["code"] == "shutting_down", events[-1]
        resp = await whole
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "shutting_down"
        resp.release()
        assert await asyncio.to_thread(s.proc.wait, 10) == 0

    async with serving(tmp_path, "min_drain_s = 60\n") as s:
        s.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert s.proc.poll() is None  # draining for a minute
        started = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(s.proc.wait, 10) == 0
        assert time.monotonic() - started < 3.0
