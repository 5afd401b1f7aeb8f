"""Three thinkcap replicas (processes) sharing one real Redis, in front of two simulated
batching backends, behind a round-robin client that retries a refused or dropped connection on
the next replica, as a load balancer does."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.proxy.conftest import RedisServer
from tests.proxy.fleet import (
    CONFIG,
    INTERVAL_S,
    LEASE_S,
    RATE,
    SYNC_S,
    Client,
    Member,
    Replica,
    _leaders,
    _state,
    _version,
    launched,
    member,
)
from thinkcap.cli.audit import audit
from thinkcap.proxy.cluster import REDIS_DOWN
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.toml_reader import ConfigError


@pytest.fixture
async def fleet(
    tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[tuple[list[Replica], RedisServer, list[subprocess.Popen[bytes]]]]:
    async with launched(tmp_path, redis_server) as (replicas, backends):
        yield replicas, redis_server, [p for _, p in backends]


async def test_three_replicas_share_one_estimate_one_leader_and_one_set_of_caps(
    fleet: tuple[list[Replica], RedisServer, list[subprocess.Popen[bytes]]],
) -> None:
    """Three serve processes under load: one leader decides on the merged rate; a killed leader is
    replaced within the lease; Redis lost and back keeps the caps and loses no request; every
    replica applies every decision within an interval; every log replays."""
    replicas, redis_server, _ = fleet
    client = Client(replicas)
    load = asyncio.create_task(client.run())
    async with aiohttp.ClientSession() as session:
        # 1. steady load: one leader, deciding on the merged estimate of the whole stream
        await asyncio.sleep(15.0)
        leaders = await _leaders(session, replicas)
        assert len(leaders) == 1, leaders
        leader = next(r for r in replicas if r.rid == leaders[0])
        decision = (await _state(session, leader))["last_decision"]
        assert set(decision["cluster"]["merged"]) == {r.rid for r in replicas}
        merged_rate = decision["inputs"]["arrival_rate"]
        assert merged_rate == pytest.approx(RATE, rel=0.05), merged_rate
        local = (await _state(session, leader))["estimates"]["arrival_rate"]
        assert local == pytest.approx(RATE / 3, rel=0.1)  # each replica alone sees a third

        # 2. the leader is killed: another takes the lease when it expires
        others = [r for r in replicas if r is not leader]
        leader.proc.send_signal(signal.SIGKILL)
        killed = time.time()
        new: list[str] = []
        while not new and time.time() - killed < 3 * LEASE_S:
            new = await _leaders(session, others)
            await asyncio.sleep(0.02)
        takeover_s = time.time() - killed
        assert len(new) == 1, "no replica took the lease"
        print(
            f"merged rate {merged_rate:.3f}/s (true {RATE:g}), leader's own {local:.3f}/s; takeover {takeover_s:.3f} s"
        )
        assert takeover_s <= LEASE_S + 0.25, takeover_s  # the lease's rest, and the sync that sees it expire
        await asyncio.sleep(3 * INTERVAL_S)
        states = [await _state(session, r) for r in others]
        assert states[0]["caps"] == states[1]["caps"]
        assert _version(states[0]) == _version(states[1])

        # 3. Redis is lost, then back: nothing is lost, the caps are held, the replicas rejoin
        held = [s["caps"] for s in states]
        version = max(_version(s) for s in states)
        redis_server.kill()
        await asyncio.sleep(3.0)
        states = [await _state(session, r) for r in others]
        assert [s["caps"] for s in states] == held
        assert all(s["cluster"]["connected"] is False and not s["cluster"]["leader"] for s in states)
        redis_server.start()
        deadline = time.time() + 5 * INTERVAL_S + LEASE_S
        while time.time() < deadline:
            states = [await _state(session, r) for r in others]
            if all(s["cluster"]["connected"] for s in states) and min(_version(s) for s in states) > version:
                break
            await asyncio.sleep(0.1)
        assert all(s["cluster"]["connected"] for s in states)
        assert sum(s["cluster"]["leader"] for s in states) == 1
        assert min(_version(s) for s in states) > version  # decisions flow again, newer than before
        await asyncio.sleep(2 * INTERVAL_S)
        client.stop()
        await load
        final = [await _state(session, r) for r in others]
        assert final[0]["caps"] == final[1]["caps"]

    # no request lost: every one answered, some after a retry on the next replica
    assert len(client.outcomes) >= 15 * RATE
    lost = [o for o in client.outcomes if o.status != 200]
    assert not lost, lost[:5]
    assert any(o.attempts > 1 for o in client.outcomes)  # the killed leader's share was retried

    # every replica applied every decision within one control interval of its publication
    published: dict[tuple[int, int], float] = {}
    applied: dict[tuple[str, tuple[int, int]], float] = {}
    for r in replicas:
        for e in r.events():
            if e.get("event") == "cluster" and e.get("action") == "published":
                published[(e["epoch"], e["version"])] = e["ts"]
            elif e.get("event") == "decision" and "cluster_version" in e:
                applied[(r.rid, (e["cluster_epoch"], e["cluster_version"]))] = e["ts"]
    assert len(published) >= 5
    lags = [ts - published[v] for (_, v), ts in applied.items() if v in published]
    retried = sum(o.attempts > 1 for o in client.outcomes)
    print(f"{len(client.outcomes)} requests, {retried} retried; {len(published)} decisions published, "
          f"{len(lags)} applied by followers, lag max {max(lags):.4f} s")  # fmt: skip
    for (rid, v), ts in applied.items():
        if v in published:
            assert ts - published[v] <= INTERVAL_S, (rid, v, ts - published[v])
    for r in others:
        seen = {v for (rid, v) in applied if rid == r.rid} | {v for v, _ in published.items()}
        assert len(seen) >= 3
    lost_logged = [
        e for r in others for e in r.events() if e.get("event") == "cluster" and e.get("action") == "redis_lost"
    ]
    rejoined = [e for r in others for e in r.events() if e.get("event") == "cluster" and e.get("action") == "rejoined"]
    assert len(lost_logged) == 2 and len(rejoined) == 2

    # every replica's log replays exactly
    for r in replicas:
        report = audit(str(r.log))
        assert report.decisions > 0 and not report.mismatches, (r.rid, report.mismatches[:3])


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('redis_url = "http://127.0.0.1:6379"', "cluster.redis_url"),
        ('redis_url = "redis://x"\nlease_s = 1.0\nsync_interval_s = 0.8', "cluster.sync_interval_s"),
        ('redis_url = "redis://x"\nfallback = "guess"', "cluster.fallback"),
        ('redis_url = "redis://x"\nleader = true', "cluster.leader"),
    ],
)
def test_bad_cluster_tables_name_the_key(tmp_path: Path, table: str, key: str) -> None:
    """A bad [cluster] table is a config error naming the key."""
    path = tmp_path / "t.toml"
    text = CONFIG.format(a="http://127.0.0.1:1", b="http://127.0.0.1:2", port=1, admin=2, redis=3, rid="r",
                         interval=1.0, lease=LEASE_S, sync=SYNC_S)  # fmt: skip
    head, _, _ = text.partition("[cluster]")
    tail = text[text.index("[[types]]") :]
    path.write_text(f"{head}[cluster]\n{table}\n\n{tail}")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(path)


def test_the_cluster_defaults(tmp_path: Path) -> None:
    """Without a [cluster] table: no Redis, a 5-s lease, 1-s syncs, static fallback."""
    path = tmp_path / "t.toml"
    text = CONFIG.format(a="http://127.0.0.1:1", b="http://127.0.0.1:2", port=1, admin=2, redis=3, rid="r",
                         interval=1.0, lease=LEASE_S, sync=SYNC_S)  # fmt: skip
    path.write_text(text[: text.index("[cluster]")] + text[text.index("[[types]]") :])
    c = load_settings(path).cluster
    assert c.redis_url is None and c.lease_s == 5.0 and c.sync_interval_s == 1.0 and c.fallback == "static"


def _member(tmp_path: Path, rid: str, redis_port: int, fallback: str = "static") -> tuple[Any, Member]:
    """A replica's state, control loop and cluster membership, in this process (clock: fake;
    40 arrivals over 10 s: 4/s on this replica)."""
    m = member(tmp_path, rid, redis_port, fallback=fallback, lease=LEASE_S)
    return m.state, m


async def test_the_leader_decides_on_merged_estimates_and_the_follower_applies_them(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """In one process, with a real Redis: the first to sync leads; the leader's inputs add the
    follower's arrival rate to its own; its decision reaches the follower, which applies it and
    logs it; a lost Redis keeps the caps (static) or lets a replica decide alone on its rate
    scaled by the replicas it saw (local); a leader that stops hands the lease on at once."""
    a_state, a = _member(tmp_path, "a", redis_server.port)
    b_state, b = _member(tmp_path, "b", redis_server.port, fallback="local")
    try:
        for m in (a, b, a):
            await m.sync_once()
            m.connected = True
        assert a.leader and not b.leader and a.deciding() and not b.deciding()
        assert set(a.peers) == {"b"} and set(b.peers) == {"a"}
        assert 0 < b.lease_left_s <= LEASE_S
        merged = a.inputs(100.0)
        assert a.loop is not None and b.loop is not None
        alone = a.loop.local_inputs(100.0)
        assert merged.snap.arrival_rate == pytest.approx(2 * alone.snap.arrival_rate)
        assert merged.arrivals == 80
        assert merged.cluster == {"replica": "a", "leader": "a", "merged": ["a", "b"], "epoch": a.epoch}

        with capture_logs() as logs:
            event = a.loop.step(100.0)
            assert event is not None and event["cluster"]["merged"] == ["a", "b"]
            await asyncio.gather(*a._sends)
            assert a.version[1] >= 1
            await b.sync_once()  # the key, had the channel been missed
        assert b.version == a.version and b.applied == 1
        assert dict(b_state.caps.table.caps) == dict(a_state.caps.table.caps)
        applied = [e for e in logs if e["event"] == "decision" and e.get("applied_from") == "a"]
        assert len(applied) == 1 and applied[0]["decision_id"] == event["decision_id"]
        assert applied[0]["caps"] == event["caps"] and applied[0]["inputs"] == event["inputs"]
        assert not b.apply({"epoch": a.epoch, "version": b.version[1], "leader": "a", "caps": {}, "event": {}})

        redis_server.kill()
        with capture_logs() as logs:
            for m in (a, b):
                with pytest.raises(REDIS_DOWN):
                    await m.sync_once()
                m._lost(ConnectionError("gone"))
        assert [e["action"] for e in logs if e["event"] == "cluster"] == ["redis_lost", "redis_lost"]
        assert not a.deciding()  # static: the caps in force stay
        assert b.deciding()  # local: b decides alone, on its rate times the two replicas it saw
        scaled = b.inputs(100.0)
        assert scaled.snap.arrival_rate == pytest.approx(2 * b.loop.local_inputs(100.0).snap.arrival_rate)
        assert scaled.cluster == {"replica": "b", "fallback": "local", "scaled_by": 2}

        redis_server.start()
        for m in (a, b):
            await m.sync_once()
            m.connected = True
        leader = a if a.leader else b
        follower = b if leader is a else a
        assert leader.leader and not follower.leader
        await leader.close()  # releases the lease
        await follower.sync_once()
        assert follower.leader
    finally:
        for m in (a, b):
            await m.close()
