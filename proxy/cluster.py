"""Several thinkcap replicas behind one load balancer, sharing one Redis.

Each replica sees part of the arrivals. Every ``sync_interval_s`` it writes its estimates
(``{prefix}:stats:{id}``, expiring after three intervals unless rewritten) and reads the
others'. One replica holds the leader lease (``{prefix}:leader``: ``SET NX PX lease_s``,
renewed by its holder at every sync); only it decides, on the merged estimates
(:mod:`thinkcap.estimators.merge`), and publishes each decision with a version: the record
goes to ``{prefix}:decision`` and to the channel ``{prefix}:decisions``. Every other replica
applies the newest version it sees (from the channel at once, from the key at each sync) and
logs the decision as its own ``decision`` event, so ``thinkcap audit`` replays any replica's log.

A follower that finds the lease taken tries again when it expires (its remaining time is
read with ``PTTL``), so a leader that dies is replaced within the lease time. A leader that
stops releases the lease. With Redis unreachable a replica keeps the caps in force
(``fallback = "static"``) or decides on its own estimates with the arrival rate scaled by the
replicas it last saw (``fallback = "local"``); it logs the loss and, when Redis answers
again, that it rejoined.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from thinkcap.estimators import Snapshot, StepEstimate
from thinkcap.estimators.merge import merge_curves, merge_means, merge_snapshots, merge_steps
from thinkcap.estimators.snapshot import TypeEstimate
from thinkcap.proxy.control import ControlLoop, Inputs
from thinkcap.proxy.logs import logger
from thinkcap.proxy.settings import ClusterSettings
from thinkcap.proxy.state import ProxyState

#: A replica's estimates live this many sync intervals unless rewritten.
STATS_TTL_SYNCS = 3
#: Renew the lease only if this replica still holds it.
RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
#: Release the lease only if this replica holds it.
RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
#: What a lost or refused Redis raises.
REDIS_DOWN = (RedisError, OSError, TimeoutError)


def inputs_record(inputs: Inputs) -> dict[str, Any]:
    """A replica's inputs as JSON-able data (its clock's times are its own and are dropped)."""
    s = inputs.snap
    return {
        "arrival_rate": s.arrival_rate,
        "arrival_rate_stderr": s.arrival_rate_stderr,
        "arrivals_decayed": s.arrivals,
        "changes": s.changes,
        "types": [t._asdict() for t in s.types],
        "arrivals": inputs.arrivals,
        "curves": {k: list(v) for k, v in inputs.curves.items()},
        "curve_samples": inputs.curve_samples,
        "step": None if inputs.step is None else inputs.step._asdict(),
        "answer": inputs.answer,
        "used": inputs.used,
        "prompt_tokens": inputs.prompt_tokens,
    }


def snapshot_from(record: dict[str, Any], now: float) -> Snapshot:
    """The snapshot of :func:`inputs_record`'s output, dated ``now``."""
    return Snapshot(
        time=now,
        arrival_rate=float(record["arrival_rate"]),
        arrival_rate_stderr=float(record["arrival_rate_stderr"]),
        arrivals=float(record["arrivals_decayed"]),
        changes=int(record["changes"]),
        last_change=None,
        types=tuple(TypeEstimate(**t) for t in record["types"]),
    )


def merged_inputs(local: Inputs, peers: list[dict[str, Any]], now: float, cluster: dict[str, Any]) -> Inputs:
    """This replica's inputs merged with the others' records: the whole stream's estimates."""
    records = [inputs_record(local), *peers]
    snaps = [local.snap, *(snapshot_from(r, now) for r in peers)]
    rates = [max(s.arrival_rate, 0.0) for s in snaps]
    steps = [local.step, *(None if r["step"] is None else StepEstimate(**r["step"]) for r in peers)]
    curves = [{k: (v[0], v[1], v[2]) for k, v in r["curves"].items()} for r in records]
    return replace(
        local,
        snap=merge_snapshots(snaps, now),
        arrivals=sum(int(r["arrivals"]) for r in records),
        curves=merge_curves(curves, [r["curve_samples"] for r in records]),
        step=merge_steps(steps),
        answer=merge_means([r["answer"] for r in records], rates),
        used=merge_means([r["used"] for r in records], rates),
        prompt_tokens=merge_means([r["prompt_tokens"] for r in records], rates),
        cluster=cluster,
    )


class Cluster:
    """This replica's part in the cluster: sync, lease, publish and apply (see the module)."""

    def __init__(self, state: ProxyState, settings: ClusterSettings, loop: ControlLoop | None) -> None:
        if settings.redis_url is None:
            raise ValueError("a cluster needs [cluster] redis_url")
        self.state = state
        self.settings = settings
        self.loop = loop
        self.id = settings.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        p = settings.key_prefix
        self.keys = {
            "stats": f"{p}:stats:",
            "leader": f"{p}:leader",
            "decision": f"{p}:decision",
            "version": f"{p}:version",
            "channel": f"{p}:decisions",
        }
        t = settings.redis_timeout_s
        self.redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=t, socket_connect_timeout=t, decode_responses=True
        )
        self.leader = False
        self.connected: bool | None = None  # None until the first sync
        self.peers: dict[str, dict[str, Any]] = {}  # the other replicas' records, as last read
        self.version = 0  # the newest decision applied or published
        self.lease_left_s: float | None = None  # the lease's remaining time when another holds it
        self.applied = 0
        self.published = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._sends: set[asyncio.Task[None]] = set()
        if loop is not None:
            loop.source = self.inputs
            loop.deciding = self.deciding
            loop.on_decision.append(self.decided)

    # -- what the control loop asks -------------------------------------------------------

    def deciding(self) -> bool:
        """The leader decides; with Redis lost, every replica does under ``fallback = "local"``."""
        if self.connected is False:
            return self.settings.fallback == "local"
        return self.connected is True and self.leader

    def inputs(self, now: float) -> Inputs:
        """The merged inputs (the leader), or this replica's scaled by the replicas last seen (fallback)."""
        assert self.loop is not None
        local = self.loop.local_inputs(now)
        if self.connected is not True:
            n = 1 + len(self.peers)
            snap = local.snap
            scaled = replace(snap, arrival_rate=snap.arrival_rate * n, arrivals=snap.arrivals * n,
                             arrival_rate_stderr=snap.arrival_rate_stderr * math.sqrt(n))  # fmt: skip
            return replace(local, snap=scaled, arrivals=local.arrivals * n,
                           cluster={"replica": self.id, "fallback": "local", "scaled_by": n})  # fmt: skip
        peers = sorted(self.peers)
        info = {"replica": self.id, "leader": self.id, "merged": [self.id, *peers]}
        return merged_inputs(local, [self.peers[p] for p in peers], now, info)

    def decided(self, event: dict[str, Any]) -> None:
        """The leader's decision goes out to the others (a decision made in fallback does not)."""
        if self.connected is True and self.leader:
            task = asyncio.get_running_loop().create_task(self._publish(event))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    # -- Redis ---------------------------------------------------------------------------

    async def _publish(self, event: dict[str, Any]) -> None:
        st = self.state
        try:
            v = int(await self.redis.incr(self.keys["version"]))
            if v <= self.version:  # Redis lost its data (a restart): stay above what was applied
                v = self.version + 1
                await self.redis.set(self.keys["version"], v)
            self.version = v
            record = {
                "version": v,
                "leader": self.id,
                "caps": dict(st.caps.table.caps),
                "shedding": st.shedding,
                "admit_fraction": st.admit_fraction,
                "event": event,
            }
            data = json.dumps(record)
            await self.redis.set(self.keys["decision"], data)
            await self.redis.publish(self.keys["channel"], data)
            self.published += 1
            logger().info("cluster", action="published", replica=self.id, version=v,
                          decision_id=event["decision_id"], caps=record["caps"])  # fmt: skip
        except REDIS_DOWN as exc:
            self._lost(exc)

    def apply(self, record: dict[str, Any]) -> bool:
        """Apply a published decision if it is newer than the last; returns whether it was."""
        v = int(record["version"])
        if v <= self.version:
            return False
        self.version = v
        if record["leader"] == self.id:
            return False
        st = self.state
        event = dict(record["event"])
        now = st.clock()
        caps = {k: int(c) for k, c in record["caps"].items()}
        if caps != dict(st.caps.table.caps):
            st.caps.publish(caps, "cluster", decision_id=event.get("decision_id"), now=now)
            st.metrics.set_caps(st.caps.effective())
        st.shedding = bool(record["shedding"])
        st.admit_fraction = float(record["admit_fraction"])
        event.update(
            time=now,  # this replica's clock, as its request events' (the leader's is leader_time)
            leader_time=record["event"]["time"],
            applied_from=record["leader"],
            cluster_version=v,
            caps_in_force=st.caps.effective(),
            pinned=dict(st.caps.pins),
        )
        st.last_decision = event
        self.applied += 1
        logger().info("decision", **event)
        return True

    async def sync_once(self) -> None:
        """Write this replica's estimates, hold or seek the lease, read the others' and the newest decision."""
        r, k, s = self.redis, self.keys, self.settings
        ttl_ms = max(1, round(STATS_TTL_SYNCS * s.sync_interval_s * 1000))
        lease_ms = max(1, round(s.lease_s * 1000))
        if self.loop is not None:
            own = inputs_record(self.loop.local_inputs(self.state.clock()))
            own["healthy_slots"] = list(self.state.pool.healthy_slots())
            await r.set(k["stats"] + self.id, json.dumps(own), px=ttl_ms)
        log = logger()
        if self.leader and not int(await r.eval(RENEW, 1, k["leader"], self.id, lease_ms)):
            self.leader = False
            log.warning("cluster", action="lease_lost", replica=self.id)
        if not self.leader:
            if await r.set(k["leader"], self.id, nx=True, px=lease_ms):
                self.leader = True
                self.lease_left_s = None
                log.info("cluster", action="leader", replica=self.id, lease_s=s.lease_s)
                if self.loop is not None:
                    self.loop.wake.set()  # decide now, not at the next interval
            else:
                pttl = int(await r.pttl(k["leader"]))
                self.lease_left_s = pttl / 1000 if pttl >= 0 else 0.0
        keys = [key async for key in r.scan_iter(match=k["stats"] + "*", count=1000)]
        values = await r.mget(keys) if keys else []
        peers = {}
        for key, value in zip(keys, values, strict=True):
            rid = key[len(k["stats"]) :]
            if value is not None and rid != self.id:
                peers[rid] = json.loads(value)
        self.peers = peers
        if not self.leader:
            raw = await r.get(k["decision"])
            if raw is not None:
                self.apply(json.loads(raw))

    def _lost(self, exc: BaseException) -> None:
        if self.connected is not False:
            logger().error("cluster", action="redis_lost", replica=self.id, error=f"{type(exc).__name__}: {exc}",
                           was_leader=self.leader, fallback=self.settings.fallback,
                           caps_kept=self.state.caps.effective())  # fmt: skip
        self.connected = False
        self.leader = False

    async def _sync(self) -> None:
        clock = asyncio.get_running_loop().time
        tick = self.settings.sync_interval_s
        while True:
            started = clock()
            try:
                await self.sync_once()
            except REDIS_DOWN as exc:
                self._lost(exc)
            else:
                if self.connected is not True:
                    logger().info("cluster", action="joined" if self.connected is None else "rejoined",
                                  replica=self.id, peers=sorted(self.peers), leader=self.leader)  # fmt: skip
                    self.connected = True
            delay = tick - (clock() - started)
            if not self.leader and self.lease_left_s is not None:
                delay = min(delay, self.lease_left_s + 0.005)  # try again the moment the lease expires
            await asyncio.sleep(max(delay, 0.005))

    async def _listen(self) -> None:
        while True:
            try:
                async with self.redis.pubsub() as ps:
                    await ps.subscribe(self.keys["channel"])
                    while True:
                        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is not None and msg.get("type") == "message":
                            self.apply(json.loads(msg["data"]))
            except REDIS_DOWN:
                await asyncio.sleep(self.settings.sync_interval_s)

    # -- life --------------------------------------------------------------------------

    def start(self) -> list[asyncio.Task[None]]:
        """Start syncing and listening; returns the tasks (the caller cancels them)."""
        self._tasks = [asyncio.create_task(self._sync()), asyncio.create_task(self._listen())]
        return self._tasks

    async def close(self) -> None:
        """Stop; a leader releases the lease so another takes it at once; this replica's
        estimates leave Redis."""
        for task in [*self._tasks, *self._sends]:
            task.cancel()
        for task in [*self._tasks, *self._sends]:
            with contextlib.suppress(asyncio.CancelledError, *REDIS_DOWN):
                await task
        self._tasks = []
        with contextlib.suppress(*REDIS_DOWN):
            async with asyncio.timeout(self.settings.redis_timeout_s * 2):
                if self.leader:
                    await self.redis.eval(RELEASE, 1, self.keys["leader"], self.id)
                    logger().info("cluster", action="lease_released", replica=self.id)
                await self.redis.delete(self.keys["stats"] + self.id)
        self.leader = False
        with contextlib.suppress(*REDIS_DOWN):
            await self.redis.aclose()

    def record(self) -> dict[str, Any]:
        """What ``/admin/state`` and ``/readyz`` show."""
        return {
            "replica": self.id,
            "connected": self.connected,
            "leader": self.leader,
            "peers": sorted(self.peers),
            "version": self.version,
            "applied": self.applied,
            "published": self.published,
            "lease_left_s": self.lease_left_s,
            "fallback": self.settings.fallback,
        }
