"""Several backend replicas behind one proxy: routing, ejection and re-admission, the config,
and a replica killed mid-run (two simulated batching servers, real processes on loopback)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.cli.test_sim import free_port
from thinkcap.controller.queue import BatchingEngine
from thinkcap.proxy.app import DataPlane, create_app
from thinkcap.proxy.pool import Pool
from thinkcap.proxy.serve_file import ReplicaSettings, load_settings
from thinkcap.proxy.state import ProxyState, build_state
from thinkcap.proxy.toml_reader import ConfigError


def _pool(*slots: int, eject_after: int = 2) -> Pool:
    return Pool([ReplicaSettings(f"http://127.0.0.1:{9000 + i}", s) for i, s in enumerate(slots)], eject_after)


def test_requests_go_to_the_least_loaded_replica_relative_to_its_slots() -> None:
    """A request goes to the replica with the fewest requests in service relative to its slots."""
    pool = _pool(2, 4)
    a, b = pool.replicas
    b.occupancy.start(0.0, streamed=False)
    b.occupancy.start(0.0, streamed=False)
    # a: 0/2, b: 2/4 -> a; then a: 1/2 ties b: 2/4 -> rotation; both stay candidates
    assert pool.route() is a
    a.occupancy.start(0.0, streamed=False)
    assert pool.route() is b  # tie at 1/2: the turn has moved past a


def test_ties_rotate() -> None:
    """Replicas equally loaded take requests in turn."""
    pool = _pool(4, 4, 4)
    assert [pool.route().index for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    """eject_after failures in a row eject a replica (and tell the listeners); a success between
    them resets the count."""
    pool = _pool(4, 4, eject_after=3)
    changes: list[tuple[int, bool]] = []
    pool.on_change.append(lambda r: changes.append((r.index, r.healthy)))
    a, b = pool.replicas
    assert not pool.failed(a, "HTTP 500", 1.0)
    assert not pool.failed(a, "HTTP 500", 1.0)
    pool.succeeded(a)
    assert not pool.failed(a, "refused", 2.0) and not pool.failed(a, "refused", 2.0)
    assert pool.failed(a, "refused", 3.0)  # the third in a row
    assert not a.healthy and a.ejections == 1 and a.last_error == "refused"
    assert changes == [(0, False)]
    assert pool.healthy_slots() == (4,)
    assert all(pool.route() is b for _ in range(5))
    assert a.record(5.0)["ejected_for_s"] == pytest.approx(2.0)
    pool.readmit(a)
    assert a.healthy and a.failures == 0 and changes == [(0, False), (0, True)]
    assert pool.healthy_slots() == (4, 4)


def test_with_every_replica_ejected_every_one_is_tried() -> None:
    """An ejection may be wrong: with none healthy, all stay in use rather than none."""
    pool = _pool(1, 1, eject_after=1)
    for r in pool.replicas:
        pool.failed(r, "refused", 0.0)
    assert pool.healthy_slots() == (1, 1)
    assert pool.pick(frozenset({0})) is pool.replicas[1]
    assert pool.pick(frozenset({0, 1})) is None


def test_a_pool_needs_a_replica() -> None:
    """A pool of no replica is refused."""
    with pytest.raises(ValueError, match="replica"):
        Pool([], 3)


BACKEND = """
[objective]
latency_penalty = 0.05

[backend]
{replicas}
dialect = "vllm"
{extra}

[proxy]
default_type = "short"

[[types]]
name = "short"
prior = 1.0
max_tokens = 512
accuracy = {{ base = 0.2, gain = 0.7, rate = 0.02 }}
service = {{ prefill_s = 0.02 }}
"""


def _settings(tmp_path: Path, replicas: str, extra: str = "step = { base_s = 0.012, per_seq_s = 0.006 }") -> Any:
    path = tmp_path / "thinkcap.toml"
    path.write_text(BACKEND.format(replicas=replicas, extra=extra))
    return load_settings(path)


def test_a_list_of_urls_is_a_pool_with_the_summed_slots(tmp_path: Path) -> None:
    """A list of URLs is a pool: each with the slots given, the admission limit and the queue model
    over their sum."""
    s = _settings(tmp_path, 'url = ["http://127.0.0.1:9001/v1", "http://127.0.0.1:9002"]\nslots = 4')
    assert [r.base for r in s.backend.replicas] == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    assert s.backend.slots == 8 and s.proxy.max_concurrency == 8
    assert s.model.queue == BatchingEngine(8, 0.012, 0.006, (4, 4))


@pytest.mark.parametrize("table", ["backend.replicas", "backends"])
def test_replica_tables_give_each_its_slots(tmp_path: Path, table: str) -> None:
    """``[[backend.replicas]]`` or a top-level ``[[backends]]``: one table per replica."""
    path = tmp_path / "thinkcap.toml"
    path.write_text(
        BACKEND.format(replicas="", extra="step = { base_s = 0.012, per_seq_s = 0.006 }")
        + f'[[{table}]]\nurl = "http://127.0.0.1:9001"\nslots = 2\n'
        + f'[[{table}]]\nurl = "http://127.0.0.1:9002"\nslots = 4\n'
    )
    s = load_settings(path)
    replicas = [(r.base, r.slots) for r in s.backend.replicas]
    assert replicas == [("http://127.0.0.1:9001", 2), ("http://127.0.0.1:9002", 4)]
    assert s.model.queue == BatchingEngine(6, 0.012, 0.006, (2, 4))
    path.write_text(path.read_text().replace("slots = 4\n", "slot = 4\n"))
    with pytest.raises(ConfigError, match=rf"{table}\[1\]\.slot: unknown key"):
        load_settings(path)
    if table == "backends":  # and not beside [backend] url
        path.write_text(path.read_text().replace("[backend]\n", '[backend]\nurl = "http://127.0.0.1:9003"\n', 1))
        with pytest.raises(ConfigError, match="one of them"):
            load_settings(path)


@pytest.mark.parametrize(
    ("replicas", "message"),
    [
        ('url = ["http://127.0.0.1:9001", "http://127.0.0.1:9001/v1"]', "listed twice"),
        ("url = []", "non-empty list"),
        ('url = ["ftp://x"]', "http"),
        ('url = "http://127.0.0.1:9001"\nreplicas = [{ url = "http://127.0.0.1:9002" }]', "not both"),
        ('replicas = [{ url = "http://127.0.0.1:9002", slot = 2 }]', "slot"),
    ],
)
def test_bad_replica_lists_name_the_key(tmp_path: Path, replicas: str, message: str) -> None:
    """A bad replica list is a config error naming the key."""
    with pytest.raises(ConfigError, match=message):
        _settings(tmp_path, replicas)


def test_several_replicas_need_the_step(tmp_path: Path) -> None:
    """A pool without the engine's step time is a config error saying so."""
    with pytest.raises(ConfigError, match="2 replicas needs the engine's step time"):
        _settings(tmp_path, 'url = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]\nslots = 4', extra="")


SCENARIO = """
[objective]
latency_penalty = 0.05

[server]
model = "sim"
slots = 4
step = { base_s = 0.012, per_seq_s = 0.006 }
time_scale = 1.0
seed = {seed}
reasoning_field = "reasoning_content"
default_type = "short"

[[types]]
name = "short"
prior = 1.0
max_tokens = 512
natural_tokens = 400
answer_tokens = 4
accuracy = { base = 0.2, gain = 0.7, rate = 0.02 }
service = { prefill_s = 0.0 }
prompts = ["a short question"]
"""

PROXY = """
[objective]
latency_penalty = 0.4

[workload]
arrival_rate = 6.0

[backend]
url = ["{a}", "{b}"]
dialect = "vllm"
slots = 4
probe = false
step = {{ base_s = 0.012, per_seq_s = 0.006 }}
eject_after = 1
probe_interval_s = 0.5

[controller]
interval_s = {interval}
min_resolve_interval_s = 0.2
min_arrivals = 100000

[[types]]
name = "short"
prior = 1.0
max_tokens = 400
accuracy = {{ base = 0.2, gain = 0.7, rate = 0.02 }}
service = {{ prefill_s = 0.0 }}
"""

INTERVAL_S = 1.0


def _mock_backend(tmp_path: Path, port: int, seed: int, time_scale: float = 1.0) -> subprocess.Popen[bytes]:
    scenario = tmp_path / f"scenario-{seed}.toml"
    text = SCENARIO.replace("{seed}", str(seed)).replace("time_scale = 1.0", f"time_scale = {time_scale}")
    scenario.write_text(text)
    cmd = [sys.executable, "-m", "thinkcap.cli", "mock-backend", "--scenario", str(scenario), "--port", str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})


async def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the simulated backend exited"
            try:
                async with s.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not start")


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    out = []
    for seed in (1, 2):
        port = free_port()
        out.append((f"http://127.0.0.1:{port}", _mock_backend(tmp_path, port, seed)))
    try:
        yield out
    finally:
        for _, proc in out:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
async def front(
    tmp_path: Path, backends: list[tuple[str, subprocess.Popen[bytes]]]
) -> AsyncIterator[tuple[ProxyState, DataPlane]]:
    for url, proc in backends:
        await _wait_up(url, proc)
    path = tmp_path / "thinkcap.toml"
    path.write_text(PROXY.format(a=backends[0][0] + "/v1", b=backends[1][0], interval=INTERVAL_S))
    state = build_state(load_settings(path))
    async with create_app(state, "127.0.0.1", 0) as plane:
        yield state, plane


async def test_a_killed_replica_fails_its_requests_clearly_and_the_caps_shrink_to_the_pool_left(
    front: tuple[ProxyState, DataPlane], backends: list[tuple[str, subprocess.Popen[bytes]]]
) -> None:
    """Eight clients keep both replicas busy; replica 0 is killed with requests in flight. Those
    requests end in a 502 naming the upstream; every request after goes to replica 1 and
    succeeds; the next decision plans for one replica of 4 slots, with smaller caps, within
    two control intervals of the kill. The killed replica, restarted, is probed and taken back."""
    state, plane = front
    url = str(plane.make_url("/v1/chat/completions"))
    body = {"model": "sim", "messages": [{"role": "user", "content": "a short question"}]}
    results: list[tuple[float, int, dict[str, Any]]] = []
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            async with session.post(url, json=body) as r:
                results.append((time.monotonic(), r.status, await r.json()))

    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            clients = [asyncio.create_task(client(session)) for _ in range(8)]
            await asyncio.sleep(2.5 * INTERVAL_S)
            before = state.caps.effective()["short"]
            assert state.pool.replicas[0].in_service > 0  # requests in flight on the replica killed
            backends[0][1].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.sleep(3 * INTERVAL_S)
            stop.set()
            await asyncio.gather(*clients)
            after = state.caps.effective()["short"]

    failed = [(t, payload) for t, status, payload in results if status != 200]
    assert failed, "the killed replica's requests in flight must fail"
    for t, payload in failed:
        assert t >= killed
        assert payload["error"]["type"] == "upstream_error"
        assert payload["error"]["code"] in {"upstream_disconnected", "upstream_unreachable"}
    later = [status for t, status, _ in results if t > killed + 0.5]
    assert later and all(status == 200 for status in later)  # new requests go to the replica left
    ejected = [i for i, e in enumerate(logs) if e["event"] == "replica" and e["action"] == "ejected"]
    assert [logs[i]["replica"] for i in ejected] == [backends[0][0]]
    after_ejection = [e for e in logs[ejected[0] :] if e["event"] == "request"]
    assert after_ejection
    for e in after_ejection:  # only requests in flight at the kill end on replica 0, and they fail
        assert e["replica"] == backends[1][0] if e["status"] == 200 else e["status"] == 502
    assert not state.pool.replicas[0].healthy and state.pool.healthy_slots() == (4,)
    assert state.admission.max_concurrency == 4  # half the slots, half the admission limit

    decisions = [e for e in logs if e["event"] == "decision"]
    pools = [tuple(e["inputs"]["queue"].get("pool", [e["inputs"]["queue"]["slots"]])) for e in decisions]
    first_small = next(i for i, p in enumerate(pools) if p == (4,))
    assert all(p == (4, 4) for p in pools[:first_small])
    assert before is not None and after < before
    shrunk = decisions[first_small]
    assert shrunk["caps"]["short"] < decisions[first_small - 1]["caps"]["short"]
    assert shrunk["time"] - decisions[first_small - 1]["time"] <= 2 * INTERVAL_S


async def test_an_ejected_replica_is_probed_and_taken_back(
    tmp_path: Path, front: tuple[ProxyState, DataPlane], backends: list[tuple[str, subprocess.Popen[bytes]]]
) -> None:
    """Replica 0 is killed, ejected on its first refused connection, then started again on its
    port: the health watch takes it back and requests reach it again."""
    state, plane = front
    url = str(plane.make_url("/v1/chat/completions"))
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    backends[0][1].kill()
    backends[0][1].wait()
    async with aiohttp.ClientSession() as session:
        for _ in range(4):  # refused on 0: retried on 1, so every client gets its answer
            async with session.post(url, json=body) as r:
                assert r.status == 200
        assert not state.pool.replicas[0].healthy
        port = int(backends[0][0].rsplit(":", 1)[1])
        backends[0] = (backends[0][0], _mock_backend(tmp_path, port, 3))
        await _wait_up(backends[0][0], backends[0][1])
        deadline = time.monotonic() + 10
        while not state.pool.replicas[0].healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert state.pool.replicas[0].healthy and state.pool.healthy_slots() == (4, 4)
        sent = state.pool.replicas[0].sent
        for _ in range(4):
            async with session.post(url, json=body) as r:
                assert r.status == 200
        assert state.pool.replicas[0].sent > sent
