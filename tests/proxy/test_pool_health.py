"""Replica health against stub upstreams on loopback: a hung replica, one whose chat route
fails while it lists its models, and a single backend that recovers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.proxy.conftest import write_config
from thinkcap.proxy.app import create_app
from thinkcap.proxy.pool import Pool, Replica
from thinkcap.proxy.serve_file import ReplicaSettings, load_settings
from thinkcap.proxy.state import ProxyState, build_state

ANSWER = {
    "id": "x",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "OK"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class Stub:
    """A stub upstream: its chat route is ``ok``, ``hang`` (accepts, never answers) or
    ``fail`` (500), switchable through ``mode``; ``/v1/models`` always answers 200."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.chats = 0

    async def completions(self, request: web.Request) -> web.Response:
        self.chats += 1
        await request.read()
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "fail":
            return web.json_response({"error": {"message": "engine dead"}}, status=500)
        return web.json_response(ANSWER)

    async def listing(self, _: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.listing)
        return app


@asynccontextmanager
async def proxy(tmp_path: Path, stubs: list[Stub], backend: str) -> AsyncIterator[tuple[ProxyState, str]]:
    """A proxy in front of the stub upstreams (one replica each)."""
    servers = [TestServer(stub.app(), host="127.0.0.1") for stub in stubs]
    for s in servers:
        await s.start_server()
    urls = [str(s.make_url("/v1")) for s in servers]
    path = write_config(tmp_path, urls[0], backend=backend)
    if len(urls) > 1:
        listed = ", ".join(f'"{u}"' for u in urls)
        text = path.read_text().replace(f'url = "{urls[0]}"', f"url = [{listed}]")
        path.write_text(text.replace("overhead_s = 0.1, per_token_s = 0.001", "prefill_s = 0.1"))
    state = build_state(load_settings(path))
    async with create_app(state, "127.0.0.1", 0) as front:
        yield state, str(front.make_url("/v1/chat/completions"))
        for s in servers:
            await s.close()


async def post(session: aiohttp.ClientSession, url: str) -> int:
    async with session.post(url, json=BODY) as r:
        await r.read()
        return r.status


POOL = "probe = false\nslots = 1\nstep = {{ base_s = 0.01, per_seq_s = 0.01 }}\n{extra}"


async def test_a_replica_that_never_answers_is_ejected(tmp_path: Path) -> None:
    """Two replicas, one hung: its read timeouts count as failures, so after ``eject_after``
    of them every request goes to the working one (it alternated 504/200 for ever before)."""
    backend = POOL.format(extra="eject_after = 2\nread_timeout_s = 0.3\nprobe_interval_s = 60")
    async with proxy(tmp_path, [Stub("ok"), Stub("hang")], backend) as (state, url):
        async with aiohttp.ClientSession() as session:
            statuses = [await post(session, url) for _ in range(10)]
        hung = state.pool.replicas[1]
        assert statuses.count(504) == 2 and statuses[-6:] == [200] * 6
        assert not hung.healthy and hung.ejections == 1 and "timed out" in (hung.last_error or "")


async def test_a_replica_whose_generations_fail_is_not_taken_back_for_listing_its_models(tmp_path: Path) -> None:
    """A replica whose chat route answers 500 while ``GET /v1/models`` answers 200 stays
    ejected: the probe is a shaped request, and probes back off after repeated ejections."""
    backend = POOL.format(extra="eject_after = 1\nprobe_interval_s = 0.1")
    broken = Stub("fail")
    async with proxy(tmp_path, [Stub("ok"), broken], backend) as (state, url):
        async with aiohttp.ClientSession() as session:
            statuses = [await post(session, url) for _ in range(4)]
            replica = state.pool.replicas[1]
            assert statuses.count(500) == 1 and not replica.healthy
            await asyncio.sleep(1.5)  # about 15 probe intervals
            statuses = [await post(session, url) for _ in range(20)]
        assert statuses == [200] * 20 and replica.ejections == 1 and not replica.healthy
        assert broken.chats >= 3  # it was probed, with the chat route


async def test_a_single_backend_once_ejected_is_taken_back(tmp_path: Path) -> None:
    """One replica failing ``eject_after`` times is marked unhealthy, and once it answers again
    the health watch takes it back (a single backend stayed ``healthy: false`` for ever)."""
    stub = Stub("fail")
    backend = "probe = false\neject_after = 2\nprobe_interval_s = 0.1"
    async with proxy(tmp_path, [stub], backend) as (state, url), aiohttp.ClientSession() as session:
        assert [await post(session, url) for _ in range(2)] == [500, 500]
        replica = state.pool.replicas[0]
        assert not replica.healthy
        stub.mode = "ok"
        deadline = time.monotonic() + 5
        while not replica.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert replica.healthy and await post(session, url) == 200


def test_probes_back_off_after_repeated_ejections() -> None:
    """An ejected replica is due for a probe after the interval, doubled for each ejection since
    its last answered request, at most a minute; an answered request resets the backoff."""
    pool = Pool([ReplicaSettings("http://a"), ReplicaSettings("http://b")], eject_after=1)
    r: Replica = pool.replicas[1]
    waits: list[Any] = []
    for k in range(9):
        assert pool.failed(r, "HTTP 500", now=100.0 * k)
        due = next(t for t in (0.5 * i for i in range(1, 400)) if pool.probe_due(r, 100.0 * k + t, 1.0))
        waits.append(due)
        pool.readmit(r)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    pool.succeeded(r)
    assert pool.failed(r, "HTTP 500", now=1000.0) and pool.probe_due(r, 1001.0, 1.0)
