"""The fleet under faults: a real redis-server, three ``thinkcap serve`` processes, two simulated
batching backends and open-loop load behind a client that retries a refused or dropped
connection on the next replica (as a load balancer does). Each step checks that no request is
lost and that every replica's caps equal the leader's within two control intervals."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.proxy import fleet
from tests.proxy.conftest import RedisServer
from tests.proxy.fleet import INTERVAL_S, LEASE_S, Client, Replica, config_for, launched, start_replica, wait_ready

DWELL_S = 3.0  # [controller] shed_min_dwell_s
LONG_TYPE = """
[[types]]
name = "long"
prior = 0.5
max_tokens = 800
keywords = ["essay"]
accuracy = { base = 0.1, gain = 0.8, rate = 0.01 }
service = { prefill_s = 0.0 }
"""


def typed(rid: str, urls: list[str], redis_port: int) -> str:
    """The fleet's config with a second type (the priors shared)."""
    return config_for(rid, urls, redis_port, extra_types=LONG_TYPE).replace("prior = 1.0", "prior = 0.5")


async def admin(session: aiohttp.ClientSession, r: Replica) -> dict[str, Any] | None:
    """``/admin/state``, or ``None`` from a replica that does not answer within a second (stopped)."""
    try:
        async with session.get(f"http://127.0.0.1:{r.admin}/admin/state", timeout=aiohttp.ClientTimeout(total=1)) as x:
            return dict(await x.json())
    except (aiohttp.ClientError, TimeoutError):
        return None


async def states(session: aiohttp.ClientSession, replicas: list[Replica]) -> dict[str, dict[str, Any]]:
    out = {}
    for r in replicas:
        s = await admin(session, r)
        if s is not None:
            out[r.rid] = s
    return out


States = dict[str, dict[str, Any]]


async def converged(session: aiohttp.ClientSession, replicas: list[Replica], within: float,
                    check: Callable[[States], bool] = lambda _: True) -> States:  # fmt: skip
    """Within ``within`` seconds: exactly one leader, every replica connected with its caps equal
    to the leader's, and ``check`` holds; returns the states (and prints how long it took)."""
    deadline = time.monotonic() + within
    while True:
        st = await states(session, replicas)
        leaders = [s for s in st.values() if s["cluster"]["leader"]]
        if (
            len(st) == len(replicas)
            and len(leaders) == 1
            and all(s["cluster"]["connected"] for s in st.values())
            and all(s["caps"] == leaders[0]["caps"] for s in st.values())
            and check(st)
        ):
            print(f"converged in {within - (deadline - time.monotonic()):.2f} s (bound {within:g} s)")
            return st
        assert time.monotonic() < deadline, json.dumps(
            {k: {"caps": s["caps"], "cluster": s["cluster"]} for k, s in st.items()}, indent=1
        )
        await asyncio.sleep(0.05)


def leader_of(st: dict[str, dict[str, Any]], replicas: list[Replica]) -> Replica:
    (rid,) = [k for k, s in st.items() if s["cluster"]["leader"]]
    return next(r for r in replicas if r.rid == rid)


async def restart(replicas: list[Replica], i: int, tmp_path: Path, config: str, tag: str) -> None:
    """SIGTERM replica ``i`` (it drains), wait for it to exit, start it again on ``config``."""
    old = replicas[i]
    old.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(old.proc.wait, 30) == 0
    new = start_replica(tmp_path, old.rid, config, log_name=f"{old.rid}-{tag}.jsonl")
    replicas[i] = new  # the client's list: it sends there from now on
    await wait_ready(new, "/readyz")


@pytest.mark.timeout(300)
async def test_the_fleet_survives_a_paused_leader_redis_restarts_outages_and_rolling_restarts(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # shedding's dwell short enough for a 10-s outage to show it end
    """Five faults in a row under load, none losing a request: a leader paused past its lease (none
    of its later decisions applied), Redis restarted empty (the new leader's decisions applied
    everywhere), a 10-s outage with shedding on (it ends within the dwell), a rolling config change
    adding a type (the fleet converges on it) and a rolling restart with drains."""
    monkeypatch.setattr(
        fleet, "CONFIG", fleet.CONFIG.replace("[controller]\n", f"[controller]\nshed_min_dwell_s = {DWELL_S}\n")
    )
    async with launched(tmp_path, redis_server) as (replicas, backends):
        urls = [url for url, _ in backends]
        client = Client(replicas)
        load = asyncio.create_task(client.run())
        raw: aioredis.Redis | None = None
        shed_window: list[float] = []
        async with aiohttp.ClientSession() as session:
            try:
                st = await converged(
                    session, replicas, 15.0, lambda s: all(x["cluster"]["version"] > 0 for x in s.values())
                )

                # 1. the leader is paused past its lease, then resumed
                paused = leader_of(st, replicas)
                paused.proc.send_signal(signal.SIGSTOP)
                stopped_at = time.time()
                await asyncio.sleep(LEASE_S + 1.0)
                paused.proc.send_signal(signal.SIGCONT)
                resumed_at = time.time()
                st = await converged(session, replicas, 2 * INTERVAL_S)
                assert leader_of(st, replicas) is not paused
                await asyncio.sleep(2 * INTERVAL_S)
                for r in replicas:
                    late = [e for e in r.events() if e.get("event") == "decision"
                            and e.get("applied_from") == paused.rid and e["ts"] > stopped_at + 0.1]  # fmt: skip
                    assert not late, late[:1]
                published = [e for e in paused.events() if e.get("action") == "published" and e["ts"] > resumed_at]
                assert not published, published[:1]
                await converged(session, replicas, 2 * INTERVAL_S)

                # 2. Redis restarts empty: the new leader's decisions reach everyone
                before = max(s["cluster"]["epoch"] for s in (await states(session, replicas)).values())
                redis_server.kill()
                redis_server.start()
                # the caps stayed equal; each replica is back at its next retry (backoff up to the lease)
                await converged(session, replicas, 2 * INTERVAL_S + LEASE_S)  # the caps held equal through the restart
                st = await converged(session, replicas, 4 * INTERVAL_S + LEASE_S,
                                     lambda s: all(x["cluster"]["epoch"] > before for x in s.values()))  # fmt: skip
                versions = {(s["cluster"]["epoch"], s["cluster"]["version"]) for s in st.values()}
                assert len(versions) == 1, versions

                # 3. shedding on, then Redis is killed for 10 s: the followers stop shedding
                raw = aioredis.Redis(port=redis_server.port, decode_responses=True)
                current = json.loads(await raw.get("thinkcap:decision"))
                shed = {**current, "version": current["version"] + 1, "leader": "chaos", "shedding": True,
                        "admit_fraction": 0.5}  # fmt: skip
                await raw.set("thinkcap:decision", json.dumps(shed))
                await raw.publish("thinkcap:decisions", json.dumps(shed))
                shed_window.append(time.time())
                await asyncio.sleep(0.5)
                st = await states(session, replicas)
                shedding = [k for k, s in st.items() if s["shedding"]]
                assert len(shedding) == 2, shedding  # the followers took it; the leader decides for itself
                await raw.aclose()
                raw = None
                redis_server.kill()
                killed = time.monotonic()
                while any(s["shedding"] for s in (await states(session, replicas)).values()):
                    assert time.monotonic() - killed <= DWELL_S + INTERVAL_S, "shedding outlived the outage's dwell"
                    await asyncio.sleep(0.05)
                shed_window.append(time.time())
                await asyncio.sleep(10.0 - (time.monotonic() - killed))
                redis_server.start()
                # the caps stayed equal; each replica is back at its next retry (backoff up to the lease)
                await converged(session, replicas, 2 * INTERVAL_S + LEASE_S)

                # 4. a rolling config change that adds a type
                for i in range(3):
                    await restart(replicas, i, tmp_path, typed(replicas[i].rid, urls, redis_server.port), "typed")
                    st = await states(session, replicas)
                    assert all(s["cluster"]["tasks_running"] for s in st.values()), st
                st = await converged(
                    session,
                    replicas,
                    2 * INTERVAL_S,
                    lambda s: all(set(x["caps"]) == {"short", "long"} for x in s.values()),
                )
                for r in replicas:
                    async with session.get(r.url + "/readyz") as resp:
                        assert resp.status == 200

                # 5. a rolling restart of all three under load
                for i in range(3):
                    await restart(replicas, i, tmp_path, typed(replicas[i].rid, urls, redis_server.port), "rolled")
                await converged(session, replicas, 2 * INTERVAL_S)
            finally:
                client.stop()
                await load
                if raw is not None:
                    await raw.aclose()

    outcomes = client.outcomes
    assert len(outcomes) > 200
    lost = [o for o in outcomes if o.status is None]
    assert not lost, lost[:5]
    failed = [o for o in outcomes if o.status != 200
              and not (o.status == 503 and shed_window[0] <= o.sent <= shed_window[1] + 1)]  # fmt: skip
    assert not failed, failed[:5]
    retried = sum(o.attempts > 1 for o in outcomes)
    print(f"{len(outcomes)} requests, {retried} retried on the next replica, "
          f"{sum(o.status == 503 for o in outcomes)} shed")  # fmt: skip
