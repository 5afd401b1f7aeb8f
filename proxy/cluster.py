"""Several thinkcap replicas behind one load balancer, sharing one Redis.

Each replica sees part of the arrivals. Every ``sync_interval_s`` it writes its estimates
(``{prefix}:stats:{id}``, expiring after three intervals unless rewritten; the ids sit in the
sorted set ``{prefix}:replicas`` scored by that expiry, so a sync reads them without scanning
the keyspace) and reads the others'. One replica with a control loop holds the leader lease
(``{prefix}:leader``: ``SET NX PX lease_s``, renewed by its holder at every sync); only it
decides, on the merged estimates (:mod:`thinkcap.estimators.merge`).

Fencing. Taking the lease starts an *epoch*: Redis ``TIME`` in milliseconds, above every epoch
before it (``{prefix}:epoch``) and above any this replica has seen, so it grows even when Redis
restarts empty. Each decision is versioned ``(epoch, seq)`` and published by one script that
writes ``{prefix}:decision`` and publishes on ``{prefix}:decisions`` only while the publisher
still holds the lease and its epoch is the current one: a leader paused past its lease (GC,
SIGSTOP, CPU steal) cannot publish when it wakes. It also stops deciding on its own at its
local lease deadline (the monotonic time it last sent a renewal that succeeded, plus
``lease_s`` less a tenth): its control loop may run before its sync notices the loss. The
other replicas apply the newest version they see (from the channel at once, from the key at
each sync) unless its epoch is older than the current one (a record naming other types, from a
rolling config change, sets the types both name), and log it as their own
``decision`` event, so ``thinkcap audit`` replays any replica's log; the lease holder applies
nobody else's.

A follower that finds the lease taken tries again when it expires, so a leader that dies is
replaced within the lease time. A leader that stops releases the lease. With Redis
unreachable a replica retries with backoff (doubling from one sync interval up to the lease
time), keeps the caps in force (``fallback = "static"``; shedding decays to off, as after a
failed decision, since no leader confirms it) or decides on its own estimates with the arrival
rate scaled by the replicas it last saw (``fallback = "local"``); it logs the loss and, when
Redis answers again, that it rejoined. The sync and listen loops never stop on an error: they
log it (``cluster_error``), count it (``thinkcap_cluster_errors_total``) and go on; a record
that cannot be applied is logged and skipped; ``/readyz`` answers 503 if either loop is not
running; closing never raises. A listener that hears nothing (its pings included) for
``LISTEN_SILENCE_SYNCS`` sync intervals subscribes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from thinkcap.estimators import Snapshot, StepEstimate
from thinkcap.estimators.merge import merge_curves, merge_means, merge_snapshots, merge_steps
from thinkcap.estimators.snapshot import TypeEstimate
from thinkcap.proxy.control import Inputs, decay_shedding, local_inputs
from thinkcap.proxy.logs import logger
from thinkcap.proxy.serve_file import ClusterSettings, ControllerSettings
from thinkcap.proxy.state import ProxyState

#: A replica's estimates live this many sync intervals unless rewritten.
STATS_TTL_SYNCS = 3
#: The share of ``lease_s`` a leader stops deciding before its lease could have expired.
LEASE_MARGIN = 0.1
#: A listener that hears nothing for this many sync intervals subscribes again.
LISTEN_SILENCE_SYNCS = 3
#: Renew the lease only if this replica still holds it.
RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
#: Release the lease only if this replica holds it.
RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
#: Take a free lease and start an epoch (KEYS: leader, epoch; ARGV: id, lease ms, the newest
#: epoch this replica saw): Redis TIME in ms, above every epoch before; 0 if the lease is held.
ACQUIRE = """
if not redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local t = redis.call('time')
local e = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local before = math.max(tonumber(redis.call('get', KEYS[2]) or '0'), tonumber(ARGV[3]))
if e <= before then e = before + 1 end
redis.call('set', KEYS[2], e)
return e
"""
#: Publish a decision only while holding the lease in the current epoch (KEYS: leader, epoch,
#: decision, channel; ARGV: id, epoch, record): 1 if published, 0 if fenced off.
PUBLISH = """
if redis.call('get', KEYS[1]) ~= ARGV[1] or redis.call('get', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('set', KEYS[3], ARGV[3])
redis.call('publish', KEYS[4], ARGV[3])
return 1
"""
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


def step_from(record: dict[str, Any]) -> StepEstimate:
    """A peer's step fit from its record (a replica of an older version sends no levels)."""
    return StepEstimate(**{**record, "levels": tuple(float(v) for v in record.get("levels", ()))})


def merged_inputs(local: Inputs, peers: list[dict[str, Any]], now: float, cluster: dict[str, Any]) -> Inputs:
    """This replica's inputs merged with the others' records: the whole stream's estimates."""
    records = [inputs_record(local), *peers]
    snaps = [local.snap, *(snapshot_from(r, now) for r in peers)]
    rates = [max(s.arrival_rate, 0.0) for s in snaps]
    steps = [local.step, *(None if r["step"] is None else step_from(r["step"]) for r in peers)]
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

    def __init__(
        self,
        state: ProxyState,
        settings: ClusterSettings,
        controller: ControllerSettings | None,
        *,
        wake: asyncio.Event | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``controller``: the settings of this replica's control loop (``None``: it has none,
        and never takes the lease); ``wake``: the event that makes it decide at once (the
        loop's, see :meth:`strategy`)."""
        if settings.redis_url is None:
            raise ValueError("a cluster needs [cluster] redis_url")
        self.state = state
        self.settings = settings
        self.controller = controller
        self.wake = wake or asyncio.Event()
        self.monotonic = monotonic  # the lease deadline's clock (the lease is real time, whatever the state's)
        self.id = settings.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        p = settings.key_prefix
        self.keys = {
            "stats": f"{p}:stats:",
            "replicas": f"{p}:replicas",
            "leader": f"{p}:leader",
            "epoch": f"{p}:epoch",
            "decision": f"{p}:decision",
            "channel": f"{p}:decisions",
        }
        t = settings.redis_timeout_s
        self.redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=t, socket_connect_timeout=t, decode_responses=True
        )
        self.leader = False
        self.lease_until = -math.inf  # monotonic time after which this replica stops deciding
        self.connected: bool | None = None  # None until the first sync
        self.peers: dict[str, dict[str, Any]] = {}  # the other replicas' records, as last read
        self.epoch = 0  # the newest epoch seen (this replica's own while it leads)
        self.version = (0, 0)  # (epoch, seq) of the newest decision applied or published
        self.lease_left_s: float | None = None  # the lease's remaining time when another holds it
        self.failures = 0  # syncs failed in a row
        self.applied = 0
        self.published = 0
        self.fenced = 0  # decisions this replica made that the lease check kept from publishing
        self.errors = 0  # errors the sync and listen loops logged and went on from
        self._heard = -math.inf  # monotonic time the listener last heard from Redis
        self._lost_at: float | None = None  # the state's clock when Redis was lost
        self._seq = 0  # decisions published in this replica's epoch
        self._tasks: list[asyncio.Task[None]] = []
        self._sends: set[asyncio.Task[None]] = set()

    # -- what the control loop asks -------------------------------------------------------

    def strategy(self) -> dict[str, Any]:
        """The control loop's constructor arguments in a cluster: merged inputs, decide while
        leading, publish each decision, and the shared wake-up."""
        return {"source": self.inputs, "deciding": self.deciding, "on_decision": [self.decided], "wake": self.wake}

    def deciding(self) -> bool:
        """The leader decides until its local lease deadline; with Redis lost, every replica
        does under ``fallback = "local"``."""
        if self.connected is False:
            return self.settings.fallback == "local"
        return self.connected is True and self.leader and self.monotonic() < self.lease_until

    def inputs(self, now: float) -> Inputs:
        """The merged inputs (the leader), or this replica's scaled by the replicas last seen (fallback)."""
        local = local_inputs(self.state, now)
        if self.connected is not True:
            n = 1 + len(self.peers)
            snap = local.snap
            scaled = replace(snap, arrival_rate=snap.arrival_rate * n, arrivals=snap.arrivals * n,
                             arrival_rate_stderr=snap.arrival_rate_stderr * math.sqrt(n))  # fmt: skip
            return replace(local, snap=scaled, arrivals=local.arrivals * n,
                           cluster={"replica": self.id, "fallback": "local", "scaled_by": n})  # fmt: skip
        peers = sorted(self.peers)
        info = {"replica": self.id, "leader": self.id, "merged": [self.id, *peers], "epoch": self.epoch}
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
        k = self.keys
        self._seq += 1
        epoch, seq = self.epoch, self._seq
        record = {
            "epoch": epoch,
            "version": seq,
            "leader": self.id,
            "caps": dict(st.caps.table.caps),
            "shedding": st.shedding,
            "admit_fraction": st.admit_fraction,
            "event": event,
        }
        data = json.dumps(record)
        log = logger()
        try:
            done = int(await self.redis.eval(PUBLISH, 4, k["leader"], k["epoch"], k["decision"], k["channel"],
                                             self.id, str(epoch), data))  # fmt: skip
        except REDIS_DOWN as exc:
            self._lost(exc)
            return
        if not done:  # the lease went to another (or Redis lost it): this decision is not the fleet's
            self.fenced += 1
            if self.leader:
                self.leader = False
                self.lease_until = -math.inf
            log.warning("cluster", action="fenced", replica=self.id, epoch=epoch, version=seq,
                        decision_id=event["decision_id"])  # fmt: skip
            return
        self.version = max(self.version, (epoch, seq))
        self.published += 1
        log.info("cluster", action="published", replica=self.id, epoch=epoch, version=seq,
                 decision_id=event["decision_id"], caps=record["caps"])  # fmt: skip

    def apply(self, record: dict[str, Any]) -> bool:
        """Apply a published decision if it is newer than the last and of the current epoch;
        returns whether it was. A record that cannot be applied is logged and skipped."""
        try:
            version = (int(record.get("epoch", 0)), int(record["version"]))
            leader = str(record["leader"])
        except (KeyError, TypeError, ValueError) as exc:
            self._error("apply", exc, record=str(record)[:200])
            return False
        if version <= self.version or version[0] < self.epoch:
            return False
        if leader == self.id or (self.leader and self.monotonic() < self.lease_until):
            return False  # our own, or another's while we hold the lease
        st = self.state
        try:
            event = dict(record["event"])
            now = st.clock()
            sent = {str(k): int(c) for k, c in record["caps"].items()}
            shedding, admit = bool(record["shedding"]), float(record["admit_fraction"])
            if not 0.0 <= admit <= 1.0:
                raise ValueError(f"admit_fraction {admit!r} is not in [0, 1]")
            ours = dict(st.caps.table.caps)
            if set(sent) != set(ours):  # a rolling config change: follow the types both know
                logger().warning("cluster", action="types_differ", replica=self.id, leader=leader,
                                 only_leader=sorted(set(sent) - set(ours)),
                                 only_here=sorted(set(ours) - set(sent)))  # fmt: skip
            caps = {t: sent.get(t, c) for t, c in ours.items()}
            if caps != ours:
                st.caps.publish(caps, "cluster", decision_id=event.get("decision_id"), now=now)
                st.metrics.set_caps(st.caps.effective())
        except Exception as exc:  # a cap that is not a count, say
            self.version = version  # not retried at every sync
            self._error("apply", exc, epoch=version[0], version=version[1], leader=leader)
            return False
        self.version = version
        self.epoch = max(self.epoch, version[0])
        st.shedding = shedding
        st.admit_fraction = admit
        event.update(
            time=now,  # this replica's clock, as its request events' (the leader's is leader_time)
            leader_time=record["event"].get("time"),
            applied_from=leader,
            cluster_epoch=version[0],
            cluster_version=version[1],
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
        margin = LEASE_MARGIN * s.lease_s
        now_ms = round(time.time() * 1000)
        own = inputs_record(local_inputs(self.state, self.state.clock()))  # with or without a control loop
        own["healthy_slots"] = list(self.state.pool.healthy_slots())
        async with r.pipeline(transaction=True) as pipe:
            pipe.set(k["stats"] + self.id, json.dumps(own), px=ttl_ms)
            pipe.zadd(k["replicas"], {self.id: now_ms + ttl_ms})
            await pipe.execute()
        log = logger()
        if self.leader:
            sent = self.monotonic()
            if int(await r.eval(RENEW, 1, k["leader"], self.id, lease_ms)):
                self.lease_until = sent + s.lease_s - margin
            else:
                self.leader = False
                self.lease_until = -math.inf
                log.warning("cluster", action="lease_lost", replica=self.id, epoch=self.epoch)
        if not self.leader:
            sent = self.monotonic()
            # only a replica with a control loop leads: one without would hold the lease and decide nothing
            epoch = int(await r.eval(ACQUIRE, 2, k["leader"], k["epoch"], self.id, lease_ms, self.epoch)) \
                if self.controller is not None else 0  # fmt: skip
            if epoch:
                self.leader = True
                self.epoch = epoch
                self._seq = 0
                self.lease_until = sent + s.lease_s - margin
                self.lease_left_s = None
                log.info("cluster", action="leader", replica=self.id, lease_s=s.lease_s, epoch=epoch)
                self.wake.set()  # decide now, not at the next interval
            else:
                pttl = int(await r.pttl(k["leader"]))
                self.lease_left_s = pttl / 1000 if pttl >= 0 else 0.0
                current = await r.get(k["epoch"])
                if current is not None:
                    self.epoch = max(self.epoch, int(current))
        await r.zremrangebyscore(k["replicas"], "-inf", now_ms)
        ids = [str(rid) for rid in await r.zrange(k["replicas"], 0, -1) if rid != self.id]
        values = await r.mget([k["stats"] + rid for rid in ids]) if ids else []
        peers = {}
        for rid, value in zip(ids, values, strict=True):
            if value is not None:
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
        if self._lost_at is None:
            self._lost_at = self.state.clock()
        self.connected = False
        self.leader = False
        self.lease_until = -math.inf
        self.lease_left_s = None

    def _error(self, task: str, exc: BaseException, **detail: Any) -> None:
        """An error a loop goes on from: logged and counted."""
        self.errors += 1
        self.state.metrics.cluster_errors.labels(task).inc()
        logger().error("cluster_error", replica=self.id, task=task, error=f"{type(exc).__name__}: {exc}", **detail)

    def _shedding_ends_at(self) -> float | None:
        """Under ``fallback = "static"``, with Redis lost while shedding: when shedding ends (the
        state's clock), ``shed_min_dwell_s`` after the loss; ``None`` otherwise."""
        if self.settings.fallback != "static" or not self.state.shedding or self.controller is None:
            return None
        return None if self._lost_at is None else self._lost_at + self.controller.shed_min_dwell_s

    def _fallback_shedding(self) -> None:
        """Under ``fallback = "static"`` no leader confirms an overload: shedding decays to off,
        its share halving at every failed sync (as after a failed decision), and ends once
        Redis has been lost for ``shed_min_dwell_s``."""
        ends = self._shedding_ends_at()
        if ends is not None:
            now = self.state.clock()
            decay_shedding(self.state, "cluster_fallback", now, evidence="redis_lost", end=now >= ends)

    def retry_delay(self) -> float:
        """Seconds to the next sync: one interval; the moment a held lease expires; doubling
        from one interval up to ``lease_s`` while Redis is lost."""
        tick = self.settings.sync_interval_s
        if self.connected is False:
            delay = min(tick * 2.0 ** max(self.failures - 1, 0), max(self.settings.lease_s, tick))
            ends = self._shedding_ends_at()
            if ends is not None:  # the failed sync that ends fallback shedding is on time
                delay = min(delay, max(ends - self.state.clock(), 0.0) + 0.005)
            return delay
        if not self.leader and self.lease_left_s is not None:
            return min(tick, self.lease_left_s + 0.005)  # try again the moment the lease expires
        return tick

    async def _sync(self) -> None:
        clock = asyncio.get_running_loop().time
        while True:
            started = clock()
            try:
                await self.sync_once()
            except REDIS_DOWN as exc:
                self.failures += 1
                self._lost(exc)
                self._fallback_shedding()
            except Exception as exc:  # anything else: logged, counted, and the next sync runs
                self._error("sync", exc)
            else:
                self.failures = 0
                self._lost_at = None
                if self.connected is not True:
                    logger().info("cluster", action="joined" if self.connected is None else "rejoined",
                                  replica=self.id, peers=sorted(self.peers), leader=self.leader)  # fmt: skip
                    self.connected = True
            delay = self.retry_delay()
            if self.connected is not False:
                delay -= clock() - started
            await asyncio.sleep(max(delay, 0.005))

    async def _listen(self) -> None:
        silence = LISTEN_SILENCE_SYNCS * self.settings.sync_interval_s
        tick = self.settings.sync_interval_s
        while True:
            ps = self.redis.pubsub()
            try:
                await ps.subscribe(self.keys["channel"])
                self._heard = pinged = self.monotonic()
                while self.monotonic() - self._heard < silence:
                    msg = await ps.get_message(ignore_subscribe_messages=True, timeout=min(tick, 1.0))
                    now = self.monotonic()
                    if msg is not None:
                        self._heard = now
                        if msg.get("type") == "message":
                            self.apply(json.loads(msg["data"]))
                    if now - pinged >= tick:  # a silent channel still answers a ping
                        await ps.ping()
                        pinged = now
                logger().warning("cluster", action="resubscribe", replica=self.id, silent_s=silence)
            except REDIS_DOWN:
                await asyncio.sleep(tick)
            except Exception as exc:  # a record that is not JSON, say: logged, counted, listened on
                self._error("listen", exc)
                await asyncio.sleep(tick)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.settings.redis_timeout_s):
                        await ps.aclose()

    # -- life --------------------------------------------------------------------------

    def start(self) -> list[asyncio.Task[None]]:
        """Start syncing and listening; returns the tasks (the caller cancels them)."""
        self._tasks = [asyncio.create_task(self._sync()), asyncio.create_task(self._listen())]
        return self._tasks

    def running(self) -> bool:
        """Both background loops are alive (false before :meth:`start` and after :meth:`close`)."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    async def close(self) -> None:
        """Stop; a leader releases the lease so another takes it at once; this replica's
        estimates leave Redis. Never raises, and every wait is bounded."""
        bound = self.settings.redis_timeout_s * 2
        tasks = [*self._tasks, *self._sends]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(bound):
                    await task
        self._tasks = []
        with contextlib.suppress(Exception):
            async with asyncio.timeout(bound):
                if self.leader:
                    await self.redis.eval(RELEASE, 1, self.keys["leader"], self.id)
                    logger().info("cluster", action="lease_released", replica=self.id)
                await self.redis.delete(self.keys["stats"] + self.id)
                await self.redis.zrem(self.keys["replicas"], self.id)
        self.leader = False
        self.lease_until = -math.inf
        with contextlib.suppress(Exception):
            async with asyncio.timeout(bound):
                await self.redis.aclose()

    def record(self) -> dict[str, Any]:
        """What ``/admin/state`` and ``/readyz`` show."""
        return {
            "replica": self.id,
            "connected": self.connected,
            "leader": self.leader,
            "peers": sorted(self.peers),
            "epoch": self.version[0],
            "version": self.version[1],
            "applied": self.applied,
            "published": self.published,
            "fenced": self.fenced,
            "errors": self.errors,
            "tasks_running": self.running(),
            "lease_left_s": self.lease_left_s,
            "fallback": self.settings.fallback,
        }
