"""The simulated reasoning server, driven through real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
from aiohttp.test_utils import TestServer

from tests.sim.conftest import ServerFactory, sim_type
from thinkcap.controller.queue import BatchingEngine
from thinkcap.sim.backend import CORRECT_HEADER, REASONING_HEADER, TYPE_HEADER, Engine, FifoSlots, Sequence
from thinkcap.sim.backend import FAULT_HEADER as FAULT
from thinkcap.sim.scenario import Faults


def base_url(server: TestServer) -> str:
    return str(server.make_url("/v1"))


def client(server: TestServer, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url(server), api_key="unused", max_retries=0, **kw)


def ask(kind: str = "hard") -> list[dict[str, str]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"<{kind}> what is 2 + 2?"}]


async def post(server: TestServer, body: Any, **headers: str) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/chat/completions"), json=body,
                                                    headers=headers) as r:  # fmt: skip
        return r.status, dict(r.headers), json.loads(await r.read())


async def test_openai_client_reads_a_plain_answer_with_reasoning_usage(sim_server: ServerFactory) -> None:
    """A non-streaming answer carries reasoning, content, usage details and the truth headers."""
    server = await sim_server()
    async with client(server) as c:
        raw = await c.chat.completions.with_raw_response.create(model="sim-reasoner", messages=ask())
    r = raw.parse()
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == 400
    assert r.usage.completion_tokens == 406
    assert r.usage.prompt_tokens == len(["be", "brief", "<hard>", "what", "is", "2", "+", "2?"])
    assert r.choices[0].finish_reason == "stop"
    assert (r.choices[0].message.model_extra or {})["reasoning"].split() == ["hmm"] * 400
    assert r.choices[0].message.content is not None and len(r.choices[0].message.content.split()) == 6
    assert raw.headers[TYPE_HEADER] == "hard" and raw.headers[REASONING_HEADER] == "400"
    assert raw.headers[CORRECT_HEADER] in {"0", "1"}


@pytest.mark.parametrize(
    ("fields", "reasoning", "completion", "finish"),
    [
        ({}, 400, 406, "stop"),
        ({"thinking_token_budget": 120}, 120, 126, "stop"),
        ({"custom_params": {"thinking_budget": 75}}, 75, 81, "stop"),
        ({"max_completion_tokens": 100}, 100, 100, "length"),
        ({"max_completion_tokens": 403}, 400, 403, "length"),
        ({"max_tokens": 0}, 400, 406, "stop"),
        ({"max_tokens": 1000}, 400, 406, "stop"),
        ({"max_tokens": 90, "thinking_token_budget": 50}, 50, 56, "stop"),
        ({"thinking_token_budget": 0}, 0, 6, "stop"),
    ],
)
async def test_every_cap_dialect_bounds_the_reasoning(
    sim_server: ServerFactory, fields: dict[str, Any], reasoning: int, completion: int, finish: str
) -> None:
    """vLLM, SGLang, OpenAI and llama.cpp limits are honoured; max_tokens 0 means unlimited."""
    server = await sim_server()
    status, headers, body = await post(server, {"messages": ask(), **fields})
    assert status == 200
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == reasoning
    assert body["usage"]["completion_tokens"] == completion
    assert body["choices"][0]["finish_reason"] == finish
    assert headers[REASONING_HEADER] == str(reasoning)


@pytest.mark.parametrize("field_name", ["reasoning", "reasoning_content"])
@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_sends_reasoning_then_content_then_usage(
    sim_server: ServerFactory, field_name: str, include_usage: bool
) -> None:
    """Streaming yields reasoning deltas, then content deltas, then usage only when asked for."""
    server = await sim_server(reasoning_field=field_name)
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    kinds, reasoning_words, usage, finish = [], 0, None, None
    async with client(server) as c:
        stream = await c.chat.completions.create(
            model="m", messages=ask(), stream=True, extra_body={"thinking_token_budget": 33}, **extra
        )
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                extra_fields = choice.delta.model_extra or {}
                if extra_fields.get(field_name):
                    kinds.append("r")
                    reasoning_words += len(extra_fields[field_name].split())
                if choice.delta.content:
                    kinds.append("c")
                finish = choice.finish_reason or finish
    assert reasoning_words == 33
    assert kinds == sorted(kinds, key=lambda k: k == "c") and "c" in kinds
    assert finish == "stop"
    if include_usage:
        assert usage is not None and usage.completion_tokens_details is not None
        assert usage.completion_tokens_details.reasoning_tokens == 33
    else:
        assert usage is None


async def test_marker_picks_the_true_type_and_default_applies_otherwise(sim_server: ServerFactory) -> None:
    """The last user message's marker decides the type; without one the default type answers."""
    server = await sim_server(default_type="easy")
    _, h1, _ = await post(server, {"messages": ask("easy")})
    _, h2, _ = await post(server, {"messages": [{"role": "user", "content": [{"type": "text", "text": "<hard> x"}]}]})
    _, h3, _ = await post(server, {"messages": [{"role": "user", "content": "no marker"}]})
    assert (h1[TYPE_HEADER], h2[TYPE_HEADER], h3[TYPE_HEADER]) == ("easy", "hard", "easy")


async def test_correctness_follows_the_accuracy_curve(sim_server: ServerFactory) -> None:
    """The share of correct answers matches p(reasoning tokens) within 4 binomial standard errors."""
    server = await sim_server()
    n, budget = 600, 150
    p = 0.2 + 0.7 * -math.expm1(-0.005 * budget)
    async with aiohttp.ClientSession() as s:
        flags = []
        for _ in range(n):
            async with s.post(server.make_url("/v1/chat/completions"),
                              json={"messages": ask(), "thinking_token_budget": budget}) as r:  # fmt: skip
                await r.read()
                flags.append(r.headers[CORRECT_HEADER] == "1")
    assert abs(np.mean(flags) - p) < 4 * math.sqrt(p * (1 - p) / n)


async def test_same_seed_gives_the_same_outcomes(sim_server: ServerFactory) -> None:
    """Two servers with one seed answer the same request sequence identically."""
    a, b = await sim_server(seed=3), await sim_server(seed=3)
    outs = []
    for server in (a, b):
        seq = []
        for i in range(40):
            _, h, _ = await post(server, {"messages": ask("hard" if i % 3 else "easy"), "thinking_token_budget": 60})
            seq.append(h[CORRECT_HEADER])
        outs.append(seq)
    assert outs[0] == outs[1] and len(set(outs[0])) == 2


async def test_one_slot_serves_in_arrival_order_and_spends_the_service_time(sim_server: ServerFactory) -> None:
    """With one slot, concurrent requests finish in arrival order, each at least a service time apart."""
    server = await sim_server(time_scale=1.0)  # hard type, budget 0: 0.1 + 0.001 * 6 s
    service = 0.1 + 0.001 * 6
    loop = asyncio.get_running_loop()
    done: list[tuple[int, float]] = []

    async def one(i: int, session: aiohttp.ClientSession) -> None:
        async with session.post(server.make_url("/v1/chat/completions"),
                                json={"messages": ask(), "thinking_token_budget": 0}) as r:  # fmt: skip
            await r.read()
            done.append((i, loop.time()))

    async with aiohttp.ClientSession() as s:
        start = loop.time()
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(one(i, s)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
    assert [i for i, _ in done] == [0, 1, 2, 3]
    ends = [t - start for _, t in done]
    for k, t in enumerate(ends):
        assert t >= (k + 1) * service * 0.98


async def test_client_disconnect_frees_the_slot_at_once(sim_server: ServerFactory) -> None:
    """A client that gives up on a long answer frees the only slot for the next request."""
    server = await sim_server(time_scale=1.0, types=(sim_type("hard", natural=4000),))  # 4.1 s answers
    url = server.make_url("/v1/chat/completions")
    long_body = {"messages": ask(), "stream": True, "thinking_token_budget": 4000}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(url, json=long_body)
        assert (await resp.content.readline()).startswith(b"data: ")
        resp.close()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as s:
        async with s.post(url, json={"messages": ask(), "thinking_token_budget": 0}) as r:
            assert r.status == 200
        async with s.get(server.make_url("/sim/state")) as r:
            state = await r.json()
    assert state["cancelled"] == 1 and state["in_service"] == 0 and state["queued"] == 0


async def test_errors_are_openai_shaped(sim_server: ServerFactory) -> None:
    """Unknown routes 404, bad JSON and bad fields 400, each with an OpenAI error object."""
    server = await sim_server()
    async with aiohttp.ClientSession() as s:
        async with s.get(server.make_url("/v1/nothing")) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with s.post(server.make_url("/v1/chat/completions"), data=b"{nope") as r:
            assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
    status, _, body = await post(server, {"messages": []})
    assert status == 400 and body["error"]["param"] == "messages"
    status, _, body = await post(server, {"messages": ask(), "thinking_token_budget": -1})
    assert status == 400 and body["error"]["param"] == "thinking_token_budget"
    status, _, body = await post(server, {"messages": ask(), "max_completion_tokens": 0})
    assert status == 400 and body["error"]["param"] == "max_completion_tokens"
    status, _, body = await post(server, {"messages": ask()}, **{"X-Sim-Fault": "gremlins"})
    assert status == 400


async def test_health_and_models(sim_server: ServerFactory) -> None:
    """``/health`` answers and ``/v1/models`` lists the scenario's model for the openai client."""
    server = await sim_server(model="tiny-thinker")
    async with client(server) as c:
        models = await c.models.list()
    assert [m.id for m in models.data] == ["tiny-thinker"]
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/health")) as r:
        assert r.status == 200 and (await r.json()) == {"status": "ok"}


async def test_forced_faults_break_requests_as_described(sim_server: ServerFactory) -> None:
    """error -> 500; malformed -> unparsable body or chunk; drop -> cut mid-stream; stall -> silence."""
    server = await sim_server(time_scale=0.0)
    status, _, body = await post(server, {"messages": ask()}, **{"X-Sim-Fault": "error"})
    assert status == 500 and body["error"]["type"] == "server_error"
    url = server.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={"messages": ask()}, headers={"X-Sim-Fault": "malformed"}) as r:
            with pytest.raises(json.JSONDecodeError):
                json.loads(await r.read())
        async with s.post(url, json={"messages": ask(), "stream": True}, headers={"X-Sim-Fault": "malformed"}) as r:
            lines = [ln for ln in (await r.read()).split(b"\n\n") if ln.startswith(b"data: {")]
            bad = 0
            for ln in lines:
                try:
                    json.loads(ln[6:])
                except json.JSONDecodeError:
                    bad += 1
            assert bad == 1
        async with s.post(url, json={"messages": ask(), "stream": True}, headers={"X-Sim-Fault": "drop"}) as r:
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    stalled = await sim_server(time_scale=0.0, faults=Faults(stall_s=5.0))
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    url = stalled.make_url("/v1/chat/completions")
    body = {"messages": ask(), "stream": True}
    async with aiohttp.ClientSession(timeout=timeout) as s, s.post(url, json=body, headers={FAULT: "stall"}) as r:
        with pytest.raises(TimeoutError):
            await r.read()
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/sim/state")) as r:
        faults = (await r.json())["faults"]
    assert faults == {"error": 1, "stall": 0, "drop": 1, "malformed": 2}


async def test_fault_rates_are_drawn_per_request(sim_server: ServerFactory) -> None:
    """An error rate of 0.3 fails about 30 % of requests with 500."""
    server = await sim_server(faults=Faults(error_rate=0.3))
    statuses = [(await post(server, {"messages": ask()}))[0] for _ in range(300)]
    share = statuses.count(500) / 300
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 300)
    assert set(statuses) == {200, 500}


async def test_fifo_slots_skip_cancelled_waiters() -> None:
    """A waiter cancelled in the queue loses its place; the rest keep their order."""
    slots = FifoSlots(1)
    await slots.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await slots.acquire()
        order.append(i)

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    slots.release()
    await asyncio.sleep(0)
    slots.release()
    await asyncio.gather(tasks[0], tasks[2])
    assert order == [0, 2] and slots.queued == 0
    slots.release()
    assert slots.free == 1


async def _state(server: TestServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/sim/state")) as r:
        out: dict[str, Any] = await r.json()
        return out


@pytest.mark.parametrize("stream", [False, True])
async def test_the_engine_runs_its_slots_in_one_batch(sim_server: ServerFactory, stream: bool) -> None:
    """Four requests on a 4-slot engine share their steps (one step per token of the longest);
    a fifth waits for a slot, so the engine takes its steps after theirs."""
    engine = BatchingEngine(4, 0.0, 0.001)
    server = await sim_server(slots=4, engine=engine, time_scale=1.0)
    body = {"model": "sim-reasoner", "messages": ask("easy"), "stream": stream, "thinking_token_budget": 30}
    async with aiohttp.ClientSession() as s:

        async def one() -> bytes:
            async with s.post(server.make_url("/v1/chat/completions"), json=body) as r:
                assert r.status == 200
                return await r.read()

        answers = await asyncio.gather(*(one() for _ in range(4)))
        state = await _state(server)
        assert state["steps"] == 36  # 30 reasoning + 6 answer tokens, made together
        await asyncio.gather(*(one() for _ in range(5)))
    state = await _state(server)
    assert state["steps"] == 36 + 36 + 36 and state["completed"] == 9
    if stream:
        text = answers[0].decode()
        assert text.count('"reasoning":"hmm ') == 6 and text.endswith("data: [DONE]\n\n")  # 5 tokens a chunk
    else:
        usage = json.loads(answers[0])["usage"]
        assert usage["completion_tokens"] == 36 and usage["completion_tokens_details"]["reasoning_tokens"] == 30


async def test_a_client_that_leaves_frees_its_engine_slot(sim_server: ServerFactory) -> None:
    """A streamed request whose client goes away stops taking engine steps."""
    server = await sim_server(slots=2, engine=BatchingEngine(2, 0.005, 0.0), time_scale=1.0)
    body = {"model": "sim-reasoner", "messages": ask("hard"), "stream": True}
    async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/chat/completions"), json=body) as r:
        await r.content.readline()
    for _ in range(200):
        state = await _state(server)
        if state["in_service"] == 0:
            break
        await asyncio.sleep(0.01)
    assert state["in_service"] == 0 and state["steps"] < 406


async def _steps_of_two(engine: Engine) -> list[float]:
    """Two sequences of 200 tokens through ``engine``; its measured step at two: [seconds, steps]."""
    seqs = [Sequence(need=200, prefill_s=0.0) for _ in range(2)]
    for seq in seqs:
        engine.submit(seq)
    await asyncio.gather(*(seq.made(200) for seq in seqs))
    await engine.close()
    return engine.wall_steps()["2"]


async def test_the_engine_measures_the_steps_it_really_took() -> None:
    """The engine records its steps on the wall clock: on a free event loop no shorter than
    nominal (4 ms at two sequences); on a loop that something blocks for 2 ms between steps,
    that much longer, which is the step a client then sees (the nominal line is not)."""
    quiet, quiet_steps = await _steps_of_two(Engine(2, 0.002, 0.001))

    async def block() -> None:
        while True:
            time.sleep(0.002)  # the point: a loop held by other work
            await asyncio.sleep(0)

    blocker = asyncio.create_task(block())
    try:
        busy, busy_steps = await _steps_of_two(Engine(2, 0.002, 0.001))
    finally:
        blocker.cancel()
    assert quiet_steps >= 190 and busy_steps >= 190  # every step but the first, all at two
    assert quiet >= 0.95 * 0.004
    assert busy >= 0.004 + 0.0015 and busy > quiet
