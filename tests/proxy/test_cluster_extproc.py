"""Two ``thinkcap extproc`` replicas sharing one real Redis, each behind its own real Envoy (two
gateway replicas) in front of one simulated batching backend: the cluster works through the
gateway as it does with ``serve``."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.cli.test_sim import free_port
from tests.proxy.conftest import RedisServer
from tests.proxy.fleet import CONFIG, INTERVAL_S, LEASE_S, SYNC_S, Replica, _state, start_replica, stop, wait_ready
from tests.proxy.test_pool import _mock_backend, _wait_up
from thinkcap.sim.envoy import start_envoy

RATE = 8.0  # requests per second through both gateways together


def extproc_config(rid: str, backend: str, redis_port: int) -> str:
    text = CONFIG.replace('url = ["{a}", "{b}"]', 'url = "{a}"')
    text = text.format(a=backend, port="{port}", admin="{admin}", redis=redis_port, rid=rid, interval=INTERVAL_S,
                       lease=LEASE_S, sync=SYNC_S)  # fmt: skip
    return text + f'\n[extproc]\nlisten = "127.0.0.1:{free_port()}"\n'


def grpc_port(replica: Replica) -> int:
    text = (replica.log.parent / f"{replica.rid}.toml").read_text()
    return int(text.split('[extproc]\nlisten = "127.0.0.1:')[1].split('"')[0])


async def send(urls: list[str], seconds: float) -> list[int]:
    """Evenly spaced streamed requests, alternately through each gateway; their statuses."""
    statuses: list[int] = []

    async def one(session: aiohttp.ClientSession, url: str) -> None:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "say something short"}]}
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            await r.read()
            statuses.append(r.status)

    async with aiohttp.ClientSession() as session:
        tasks = []
        for k in range(int(seconds * RATE)):
            tasks.append(asyncio.create_task(one(session, urls[k % len(urls)])))
            await asyncio.sleep(1 / RATE)
        await asyncio.gather(*tasks)
    return statuses


@pytest.mark.timeout(180)
async def test_extproc_replicas_share_one_estimate_one_leader_and_one_set_of_caps(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Traffic split over two gateways, each with its own processor: one processor holds the
    lease and decides on the merged arrival rate of both (each alone sees half), and the other
    applies its caps; every request is answered."""
    port = free_port()
    backend = _mock_backend(tmp_path, port, 1, time_scale=0.1)
    replicas: list[Replica] = []
    envoys: list[subprocess.Popen[bytes]] = []
    try:
        await _wait_up(f"http://127.0.0.1:{port}", backend)
        for rid in ("x1", "x2"):
            config = extproc_config(rid, f"http://127.0.0.1:{port}", redis_server.port)
            replicas.append(start_replica(tmp_path, rid, config, command="extproc"))
        urls = []
        for r in replicas:
            await wait_ready(r)
            envoy, envoy_port = await asyncio.to_thread(start_envoy, tmp_path, f"envoy-{r.rid}", upstream=port,
                                                        grpc=grpc_port(r))  # fmt: skip
            envoys.append(envoy)
            urls.append(f"http://127.0.0.1:{envoy_port}")
        statuses = await send(urls, 14.0)
        assert statuses and all(s == 200 for s in statuses), statuses
        async with aiohttp.ClientSession() as session:
            states = [await _state(session, r) for r in replicas]
        leaders = [s for s in states if s["cluster"]["leader"]]
        assert len(leaders) == 1, [s["cluster"] for s in states]
        decision = leaders[0]["last_decision"]
        assert set(decision["cluster"]["merged"]) == {"x1", "x2"}
        assert decision["inputs"]["arrival_rate"] == pytest.approx(RATE, rel=0.15)
        assert leaders[0]["estimates"]["arrival_rate"] == pytest.approx(RATE / 2, rel=0.15)
        assert states[0]["caps"] == states[1]["caps"]
    finally:
        for envoy in envoys:
            envoy.terminate()
            envoy.wait(10)
        stop(replicas)
        backend.kill()
        backend.wait()
