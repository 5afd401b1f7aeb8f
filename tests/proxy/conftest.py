"""A proxy in front of the simulated server, both real HTTP servers on loopback."""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.cli.test_sim import free_port
from tests.sim.conftest import make_scenario
from thinkcap.proxy.admin import create_admin_app
from thinkcap.proxy.app import DataPlane, create_app
from thinkcap.proxy.serve_file import Settings, load_settings
from thinkcap.proxy.state import ProxyState, build_state
from thinkcap.sim.backend import create_app as create_sim
from thinkcap.sim.scenario import DIALECT_USAGE

CONFIG = """
[objective]
latency_penalty = 0.05

[workload]
arrival_rate = 1.0

[backend]
url = "{url}"
dialect = "{dialect}"
{backend_extra}

[proxy]
default_type = "easy"
{proxy_extra}

[controller]
{controller_extra}

[[types]]
name = "hard"
prior = 0.5
min_tokens = 0
max_tokens = 4096
keywords = ["prove"]
patterns = ["(?i)\\\\bintegral\\\\b"]
examples = ["solve this equation for x", "compute the derivative of the function", "find all roots of the polynomial"]
accuracy = {{ base = 0.2, gain = 0.7, rate = 0.005 }}
service = {{ overhead_s = 0.1, per_token_s = 0.001 }}

[[types]]
name = "easy"
prior = 0.5
min_tokens = 0
max_tokens = 1024
examples = ["say hello to my friend", "tell me a joke about cats", "what a lovely day it is"]
accuracy = {{ base = 0.6, gain = 0.3, rate = 0.05 }}
service = {{ overhead_s = 0.1, per_token_s = 0.001 }}
"""


def write_config(
    tmp: Path,
    url: str,
    *,
    dialect: str = "vllm",
    backend: str = "",
    proxy: str = "",
    controller: str = "enabled = false",
) -> Path:
    path = tmp / "thinkcap.toml"
    path.write_text(
        CONFIG.format(url=url, dialect=dialect, backend_extra=backend, proxy_extra=proxy, controller_extra=controller)
    )
    return path


@dataclass
class Stack:
    """A running simulated server, proxy and admin listener."""

    sim: TestServer
    proxy: DataPlane
    admin: TestServer
    state: ProxyState

    @property
    def url(self) -> str:
        return str(self.proxy.make_url("/v1"))

    async def upstream_bodies(self) -> list[dict[str, Any]]:
        return [item["body"] for item in await self.upstream_seen()]

    async def upstream_seen(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(self.sim.make_url("/sim/requests")) as r:
            items: list[dict[str, Any]] = await r.json()
            return items

    async def sim_state(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(self.sim.make_url("/sim/state")) as r:
            out: dict[str, Any] = await r.json()
            return out


StackFactory = Callable[..., Any]

REDIS = shutil.which("redis-server")


def need_redis() -> str:
    if REDIS is None:
        message = "redis-server is not installed (make tools installs Debian's redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return REDIS


class RedisServer:
    """A real redis-server on a free loopback port, nothing persisted."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [need_redis(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.tmp)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(autouse=True)
def collect_garbage_after_each_test() -> Iterator[None]:
    """Transports or sockets a test leaves unclosed warn when they are collected; collecting at
    the end of each test makes the warning (an error here) name the test that left them."""
    yield
    gc.collect()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[StackFactory]:
    """``await stack(dialect=..., backend=..., proxy=..., upstream=None, **scenario_changes)``."""
    servers: list[TestServer | DataPlane] = []

    async def start(
        *,
        dialect: str = "vllm",
        backend: str = "probe = false",
        proxy: str = "",
        upstream: str | None = None,
        controller: str = "enabled = false",
        **scenario: Any,
    ) -> Stack:
        scenario.setdefault("usage_shape", DIALECT_USAGE[dialect])  # the shape that dialect's servers send
        sim = TestServer(create_sim(make_scenario(**scenario)), host="127.0.0.1")
        await sim.start_server()
        servers.append(sim)
        settings: Settings = load_settings(
            write_config(
                tmp_path,
                upstream or str(sim.make_url("/v1")),
                dialect=dialect,
                backend=backend,
                proxy=proxy,
                controller=controller,
            )
        )
        state = build_state(settings)
        front = create_app(state)
        await front.start("127.0.0.1", 0)
        admin = TestServer(create_admin_app(state), host="127.0.0.1")
        await admin.start_server()
        servers.extend([front, admin])
        return Stack(sim, front, admin, state)

    yield start
    for s in reversed(servers):
        await s.close()


@asynccontextmanager
async def in_front_of(
    upstream: web.Application, tmp: Path, *, backend: str = "probe = false"
) -> AsyncIterator[tuple[ProxyState, DataPlane]]:
    """A started proxy (the test config) in front of a stub upstream serving ``/v1``."""
    up = TestServer(upstream, host="127.0.0.1")
    await up.start_server()
    try:
        state = build_state(load_settings(write_config(tmp, str(up.make_url("/v1")), backend=backend)))
        async with create_app(state, "127.0.0.1", 0) as front:
            yield state, front
    finally:
        await up.close()
