"""The cluster's faults, in one process with a real redis-server: loops that die, a paused
leader, Redis losing its data, shedding in fallback, a replica without a control loop, retries
while Redis is down, the keyspace scan, and a listener across a Redis restart."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from structlog.testing import capture_logs

from tests.proxy.conftest import RedisServer
from tests.proxy.fleet import Clock, Member
from tests.proxy.fleet import member as fleet_member

LEASE_S = 1.0
SYNC_S = 0.25


def member(tmp_path: Path, rid: str, redis_port: int, **kwargs: Any) -> Member:
    """:func:`tests.proxy.fleet.member` with this file's one-second lease."""
    return fleet_member(tmp_path, rid, redis_port, lease=LEASE_S, **kwargs)


async def joined(*members: Member) -> None:
    for m in members:
        await m.sync_once()
        m.connected = True


async def decide(m: Member, now: float) -> dict[str, Any]:
    """One decision by ``m``'s control loop, published (if ``m`` may)."""
    assert m.loop is not None
    event = m.loop.step(now)
    assert event is not None
    await asyncio.gather(*m._sends)
    return event


async def until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def record(epoch: int, version: int, caps: dict[str, int], **extra: Any) -> str:
    event = {"decision_id": f"x{version}", "time": 1.0, "caps": caps}
    return json.dumps({"epoch": epoch, "version": version, "leader": "x", "caps": caps, "shedding": False,
                       "admit_fraction": 1.0, "event": event, **extra})  # fmt: skip


async def test_a_record_the_follower_cannot_apply_is_skipped_and_its_loops_go_on(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A decision naming another set of types (a rolling config change that adds one) and one
    whose cap is not a number: the follower applies the types both know, logs and skips the
    bad one, and its sync goes on (its estimates keep being rewritten); closing never raises.
    The sync died on the first for good (ValueError from the cap table), and close re-raised."""
    b = member(tmp_path, "b", redis_server.port)
    raw = aioredis.Redis(port=redis_server.port, decode_responses=True)
    try:
        b.start()
        await until(lambda: b.connected is True)
        newer = 10**14  # above any epoch Redis TIME gives
        await raw.delete("thinkcap:leader")
        b.leader = False
        with capture_logs() as logs:
            await raw.set("thinkcap:leader", "x", px=60_000)  # another replica leads
            await raw.set("thinkcap:decision", record(newer, 1, {"short": 77, "long": 900}))
            await until(lambda: b.applied == 1)
            assert dict(b.state.caps.table.caps) == {"short": 77}
            await raw.set("thinkcap:decision", record(newer, 2, {"short": "many"}))  # type: ignore[dict-item]
            await until(lambda: b.errors >= 1)
            before = await raw.pttl("thinkcap:stats:b")
            await asyncio.sleep(4 * SYNC_S)
            assert b.running()
            after = await raw.pttl("thinkcap:stats:b")
            assert after > 0 and (await raw.zscore("thinkcap:replicas", "b")) is not None
            assert before > 0
        assert any(e.get("action") == "types_differ" and e["only_leader"] == ["long"] for e in logs)
        errors = [e for e in logs if e["event"] == "cluster_error"]
        assert errors and errors[0]["task"] == "apply" and "many" in errors[0]["error"]
        assert b.state.metrics.cluster_errors.labels("apply")._value.get() >= 1
        assert b.record()["tasks_running"] is True
    finally:
        await b.close()  # never raises
        await raw.aclose()
    assert b.record()["tasks_running"] is False


async def test_a_paused_leader_neither_decides_nor_publishes_when_it_wakes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Leader a pauses past its lease; b takes it (a newer epoch) and decides; c follows b. a
    wakes and its control loop runs before its sync: it no longer decides (its local lease
    deadline passed), a decision it still publishes is fenced off by Redis, and neither b nor
    c applies a record of a's older epoch. Before: a decided on its stale view, published, and
    both b (the holder) and c applied it."""
    a = member(tmp_path, "a", redis_server.port, arrivals=10)
    b = member(tmp_path, "b", redis_server.port, arrivals=60)
    c = member(tmp_path, "c", redis_server.port, arrivals=60)
    try:
        await joined(a, b, c)
        assert a.leader and a.deciding()
        first = await decide(a, 100.0)
        await joined(b, c)
        assert b.version == c.version == a.version and b.applied == c.applied == 1

        await asyncio.sleep(LEASE_S + 0.2)  # a is paused: no sync renews its lease
        await joined(b, c)
        assert b.leader
        await decide(b, 101.0)
        await c.sync_once()
        assert c.version == b.version and c.applied == 2
        caps_b = dict(b.state.caps.table.caps)

        assert a.leader  # a still believes it leads: its sync has not run
        assert not a.deciding()  # but its lease deadline has passed: its control loop stands by
        with capture_logs() as logs:
            await a._publish({**first, "decision_id": "stale"})  # a decision made just before the deadline
        assert a.published == 1 and not a.leader and a.fenced == 1 and b.epoch > a.epoch
        assert any(e.get("action") == "fenced" for e in logs)
        stale = {"epoch": a.epoch, "version": 99, "leader": "a", "caps": {"short": 3}, "shedding": True,
                 "admit_fraction": 0.1, "event": {**first, "decision_id": "late"}}  # fmt: skip
        assert not b.apply(stale) and not c.apply(stale)  # an older epoch: never applied
        await joined(a, c)
        assert dict(c.state.caps.table.caps) == caps_b == dict(a.state.caps.table.caps)
        assert not c.state.shedding and not a.leader
    finally:
        for m in (a, b, c):
            await m.close()


async def test_decisions_after_redis_restarts_empty_are_applied(tmp_path: Path, redis_server: RedisServer) -> None:
    """Follower b has applied decision 50 of leader a; Redis restarts with nothing and c, which
    never saw the old decisions, takes the lease: its decisions (a newer epoch, from Redis TIME)
    reach b. Before, c numbered them from 1 and b ignored every one at or below 50."""
    a = member(tmp_path, "a", redis_server.port)
    b = member(tmp_path, "b", redis_server.port)
    try:
        await joined(a, b)
        for k in range(50):
            await decide(a, 100.0 + k / 100)
        await b.sync_once()
        assert b.version == a.version and b.record()["version"] == 50
        await a.close()
        redis_server.kill()
        redis_server.start()
        c = member(tmp_path, "c", redis_server.port, arrivals=200)
        try:
            await joined(c, b)
            assert c.leader
            for k in range(3):
                event = await decide(c, 101.0 + k)
                await b.sync_once()
                assert b.version == c.version, k
                assert b.state.last_decision is not None
                assert b.state.last_decision["decision_id"] == event["decision_id"]
            assert dict(b.state.caps.table.caps) == dict(c.state.caps.table.caps)
        finally:
            await c.close()
    finally:
        await b.close()


async def test_static_fallback_ends_shedding_while_redis_is_lost(tmp_path: Path, redis_server: RedisServer) -> None:
    """A follower sheds 98.8 % on the leader's word; Redis dies. Its share halves at the first
    failed sync, and shedding ends once Redis has been gone for shed_min_dwell_s. Before, the
    follower kept admit_fraction 0.012 for the whole outage."""
    clock = Clock()
    b = member(tmp_path, "b", redis_server.port, clock=clock)
    raw = aioredis.Redis(port=redis_server.port, decode_responses=True)
    try:
        await raw.set("thinkcap:leader", "x", px=60_000)
        await b.sync_once()
        b.connected = True
        event = {"decision_id": "x1", "time": 1.0}
        assert b.apply({"epoch": 10**14, "version": 1, "leader": "x", "caps": {"short": 40}, "shedding": True,
                        "admit_fraction": 0.012, "event": event})  # fmt: skip
        assert b.state.shedding and b.state.admit_fraction == 0.012
        b.start()
        redis_server.kill()
        await until(lambda: b.connected is False)
        await until(lambda: b.state.admit_fraction > 0.5)
        assert b.state.shedding  # halved, not yet off
        assert b.loop is not None
        clock.now += b.loop.settings.shed_min_dwell_s
        await until(lambda: not b.state.shedding, timeout=3 * LEASE_S)
        assert b.state.admit_fraction == 1.0
    finally:
        await b.close()
        await raw.aclose()


async def test_a_replica_without_a_control_loop_never_takes_the_lease(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """``[controller] enabled = false``: the replica syncs but never leads, so the one with a
    control loop does. Before, it took the lease first and nobody decided."""
    idle = member(tmp_path, "idle", redis_server.port, loop=False)
    b = member(tmp_path, "b", redis_server.port)
    try:
        await joined(idle, b, idle)
        assert not idle.leader and b.leader and b.deciding()
    finally:
        for m in (idle, b):
            await m.close()


async def test_syncs_back_off_while_redis_is_down(tmp_path: Path, redis_server: RedisServer) -> None:
    """Redis down for 2 s with sync_interval_s = 0.25: the retries double from one interval up
    to the lease (0.25, 0.5, 1 s: at most 5 attempts). Before, a stale lease_left_s capped the
    delay and the sync spun (79 attempts in 2 s)."""
    b = member(tmp_path, "b", redis_server.port)
    raw = aioredis.Redis(port=redis_server.port, decode_responses=True)
    await raw.set("thinkcap:leader", "x", px=60_000)
    await raw.aclose()
    attempts = []
    sync = b.sync_once

    async def counted() -> None:
        attempts.append(time.monotonic())
        await sync()

    b.sync_once = counted  # type: ignore[method-assign]
    try:
        await b.sync_once()  # another holds the lease: b knows its time left
        b.connected = True
        assert b.lease_left_s is not None and b.lease_left_s > 50
        await asyncio.sleep(0.01)
        attempts.clear()
        redis_server.kill()
        b.start()
        await asyncio.sleep(2.0)
        assert b.connected is False
        assert 2 <= len(attempts) <= 5, [round(t - attempts[0], 3) for t in attempts]
    finally:
        await b.close()


async def test_a_sync_reads_the_replicas_without_scanning_the_keyspace(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """With 20,000 other keys in Redis, syncs find the peers through the replicas' sorted set:
    no SCAN reaches Redis (each SCAN walked the whole keyspace), and a replica that left is
    gone from the set."""
    raw = aioredis.Redis(port=redis_server.port, decode_responses=True)
    async with raw.pipeline(transaction=False) as pipe:
        for k in range(20_000):
            pipe.set(f"other:{k}", "x")
        await pipe.execute()
    await raw.config_resetstat()
    a = member(tmp_path, "a", redis_server.port)
    b = member(tmp_path, "b", redis_server.port)
    try:
        await joined(a, b, a, b)
        assert set(a.peers) == {"b"} and set(b.peers) == {"a"}
        stats = await raw.info("commandstats")
        assert "cmdstat_scan" not in stats, stats.get("cmdstat_scan")
        await b.close()
        await a.sync_once()
        assert a.peers == {} and await raw.zrange("thinkcap:replicas", 0, -1) == ["a"]
    finally:
        for m in (a, b):
            await m.close()
        await raw.aclose()


async def test_the_listener_hears_decisions_after_redis_restarts(tmp_path: Path, redis_server: RedisServer) -> None:
    """Only the listener runs (no sync): Redis restarts, and a decision published afterwards
    on the channel still reaches the follower, within a few sync intervals."""
    b = member(tmp_path, "b", redis_server.port)
    try:
        b._tasks = [asyncio.create_task(b._listen())]
        await asyncio.sleep(0.3)
        redis_server.kill()
        await asyncio.sleep(0.5)
        redis_server.start()
        raw = aioredis.Redis(port=redis_server.port, decode_responses=True)
        try:
            deadline = time.monotonic() + 3 * LEASE_S
            while b.applied == 0:
                assert time.monotonic() < deadline, "the listener never heard the new decision"
                await raw.publish("thinkcap:decisions", record(10**14, 1, {"short": 55}))
                await asyncio.sleep(0.2)
        finally:
            await raw.aclose()
        assert dict(b.state.caps.table.caps) == {"short": 55}
        assert b.running()
    finally:
        await b.close()
