"""Three thinkcap replicas as processes sharing one real Redis, in front of two simulated
batching backends, behind a round-robin client that retries a refused or dropped connection on
the next replica, as a load balancer does (the cluster's process tests)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.cli.test_sim import free_port
from tests.proxy.conftest import RedisServer
from tests.proxy.test_pool import _mock_backend, _wait_up
from thinkcap.proxy.cluster import Cluster
from thinkcap.proxy.control import ControlLoop
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.state import build_state

RATE = 10.0  # requests per second, all replicas together, evenly spaced
LEASE_S = 2.0
SYNC_S = 0.25
INTERVAL_S = 1.0

CONFIG = """
[objective]
latency_penalty = 0.4

[workload]
arrival_rate = 2.0

[backend]
url = ["{a}", "{b}"]
dialect = "vllm"
slots = 4
probe = false
step = {{ base_s = 0.0012, per_seq_s = 0.0006 }}

[proxy]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
min_drain_s = 1.0

[controller]
interval_s = {interval}
min_resolve_interval_s = 0.2
min_arrivals = 10

[estimators]
arrival_half_life_s = 60

[cluster]
redis_url = "redis://127.0.0.1:{redis}/0"
replica_id = "{rid}"
lease_s = {lease}
sync_interval_s = {sync}

[[types]]
name = "short"
prior = 1.0
max_tokens = 400
accuracy = {{ base = 0.2, gain = 0.7, rate = 0.02 }}
service = {{ prefill_s = 0.0 }}
"""

SCENARIO_SCALE = 0.1  # the simulated engines run ten times faster than the model they stand for


@dataclass
class Replica:
    rid: str
    port: int
    admin: int
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


@dataclass
class Outcome:
    index: int
    sent: float
    status: int | None = None
    attempts: int = 0
    replicas: list[str] = field(default_factory=list)


async def _state(session: aiohttp.ClientSession, r: Replica) -> dict[str, Any]:
    async with session.get(f"http://127.0.0.1:{r.admin}/admin/state") as resp:
        return dict(await resp.json())


class Client:
    """Evenly spaced requests, round-robin over the replicas; a connection refused or dropped
    is retried on the next one (nothing else is)."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()

    async def _one(self, session: aiohttp.ClientSession, out: Outcome) -> None:
        body = {"model": "sim", "messages": [{"role": "user", "content": "a short question"}]}
        n = len(self.replicas)
        while out.attempts < 2 * n:
            r = self.replicas[(out.index + out.attempts) % n]
            out.attempts += 1
            out.replicas.append(r.rid)
            try:
                async with session.post(r.url + "/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    out.status = resp.status
                    return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            start = loop.time()
            i = 0
            while not self._stop.is_set():
                due = start + i / RATE
                await asyncio.sleep(max(0.0, due - loop.time()))
                out = Outcome(i, time.time())
                self.outcomes.append(out)
                task = asyncio.create_task(self._one(session, out))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
                i += 1
            await asyncio.gather(*self._inflight)

    def stop(self) -> None:
        self._stop.set()


def _version(state: dict[str, Any]) -> tuple[int, int]:
    """A replica's newest decision, as ``/admin/state`` shows it: (epoch, seq)."""
    return state["cluster"]["epoch"], state["cluster"]["version"]


async def _leaders(session: aiohttp.ClientSession, replicas: list[Replica]) -> list[str]:
    states = [await _state(session, r) for r in replicas]
    return [s["cluster"]["replica"] for s in states if s["cluster"]["leader"]]


def start_replica(
    tmp_path: Path, rid: str, config: str, log_name: str | None = None, command: str = "serve"
) -> Replica:
    """``thinkcap serve`` (or ``command``) on ``config`` (a TOML text with ``{port}`` and
    ``{admin}`` left to fill)."""
    port, admin = free_port(), free_port()
    path = tmp_path / f"{rid}.toml"
    path.write_text(config.replace("{port}", str(port)).replace("{admin}", str(admin)))
    log = tmp_path / (log_name or f"{rid}.jsonl")
    with log.open("wb") as fh:
        cmd = [sys.executable, "-m", "thinkcap.cli", command, "--config", str(path)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    return Replica(rid, port, admin, log, proc)


async def wait_ready(replica: Replica, path: str = "/healthz", timeout: float = 30.0) -> None:
    """Until ``path`` answers 200 (the process must stay up)."""
    async with aiohttp.ClientSession() as s:
        deadline = time.monotonic() + timeout
        while True:
            assert replica.proc.poll() is None, replica.log.read_text()[-3000:]
            try:
                async with s.get(replica.url + path) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"{replica.rid} did not answer {path}"
            await asyncio.sleep(0.1)


def config_for(rid: str, backends: list[str], redis_port: int, extra_types: str = "") -> str:
    """The fleet's config for replica ``rid`` (ports left as ``{port}`` and ``{admin}``)."""
    text = CONFIG.format(a=backends[0], b=backends[1], port="{port}", admin="{admin}", redis=redis_port, rid=rid,
                         interval=INTERVAL_S, lease=LEASE_S, sync=SYNC_S)  # fmt: skip
    return text + extra_types


def stop(replicas: list[Replica], timeout: float = 15.0) -> None:
    for r in replicas:
        if r.proc.poll() is None:
            r.proc.send_signal(signal.SIGTERM)
    for r in replicas:
        try:
            r.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()


@asynccontextmanager
async def launched(
    tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[tuple[list[Replica], list[tuple[str, subprocess.Popen[bytes]]]]]:
    """Two simulated batching backends (their URLs and processes) and three replicas r1..r3,
    started; stopped after."""
    backends = []
    for seed in (1, 2):
        port = free_port()
        scenario_dir = tmp_path / f"b{seed}"
        scenario_dir.mkdir()
        backends.append(
            (f"http://127.0.0.1:{port}", _mock_backend(scenario_dir, port, seed, time_scale=SCENARIO_SCALE))
        )
    replicas: list[Replica] = []
    try:
        for url, proc in backends:
            await _wait_up(url, proc)
        urls = [u for u, _ in backends]
        for k in range(3):
            rid = f"r{k + 1}"
            replicas.append(start_replica(tmp_path, rid, config_for(rid, urls, redis_server.port)))
        for r in replicas:
            await wait_ready(r)
        yield replicas, backends
    finally:
        stop(replicas)
        for _, proc in backends:
            proc.kill()
            proc.wait()


class Member(Cluster):
    """A cluster member in this process, with its control loop (``loop``, ``None`` without)."""

    loop: ControlLoop | None


class Clock:
    """A clock the test moves (the replicas' state clock)."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def member(
    tmp_path: Path,
    rid: str,
    redis_port: int,
    *,
    clock: Clock | None = None,
    fallback: str = "static",
    loop: bool = True,
    arrivals: int = 40,
    lease: float = LEASE_S,
) -> Member:
    """A replica's state, control loop (unless ``loop`` is false) and cluster membership, in
    this process; ``arrivals`` evenly over the 10 s before the clock's time."""
    path = tmp_path / f"{rid}.toml"
    text = CONFIG.format(a="http://127.0.0.1:1", b="http://127.0.0.1:2", port=0, admin=0, redis=redis_port, rid=rid,
                         interval=1.0, lease=lease, sync=SYNC_S)  # fmt: skip
    path.write_text(text.replace("[cluster]", f'[cluster]\nfallback = "{fallback}"'))
    clock = clock or Clock()
    state = build_state(load_settings(path), clock=clock)
    for k in range(arrivals):
        state.arrived("short", clock.now - 10 + k * 10 / arrivals)
    m = Member(state, state.settings.cluster, state.settings.controller if loop else None)
    m.loop = state.controller = ControlLoop(state, state.settings.controller, **m.strategy()) if loop else None
    return m
