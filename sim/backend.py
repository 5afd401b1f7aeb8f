"""A simulated reasoning-model server speaking the OpenAI chat completions API.

Requests are served first come, first served by ``scenario.slots`` servers. A request of true
type k thinks for ``min(natural, caps)`` reasoning tokens, then writes its answer; its service
time ``overhead + per_token x tokens (+ noise)``, times ``time_scale``, is actually spent.
Everything random (noise, correctness, faults) is drawn from one seeded generator at arrival.

With an engine (``[server] step``) the server batches continuously instead: one engine runs
up to ``slots`` sequences, each engine step takes ``base_s + per_seq_s x j`` (times
``time_scale``) with j sequences and gives each of them one token; a new sequence's prefill
(its type's ``overhead_s``) pauses the engine before it joins (:class:`Engine`).

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` and
``GET /sim/state`` and ``GET /sim/requests`` (counters and recent bodies, for
tests). A request may force a fault with the header
``X-Sim-Fault: error|stall|drop|malformed``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from thinkcap.sim.scenario import FAULT_KINDS, Scenario, SimType

SCENARIO_KEY = web.AppKey("scenario", Scenario)

#: Headers through which the load generator learns the ground truth of an answer.
CORRECT_HEADER = "X-Sim-Correct"
TYPE_HEADER = "X-Sim-Type"
REASONING_HEADER = "X-Sim-Reasoning-Tokens"
FAULT_HEADER = "X-Sim-Fault"
#: How many recent request bodies ``GET /sim/requests`` shows.
SEEN_REQUESTS = 1000
#: The largest request body the simulated server reads (aiohttp's default is 1 MiB; model servers take more).
MAX_BODY_BYTES = 64 * 1024 * 1024
#: Sleeps shorter than this are skipped; the pacing catches up at the next deadline.
MIN_SLEEP_S = 0.001


class FifoSlots:
    """``n`` identical servers handed out strictly in arrival order."""

    def __init__(self, n: int) -> None:
        self.free = n
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return sum(1 for f in self._waiters if not f.done())

    async def acquire(self) -> None:
        """Wait for a slot; a cancelled waiter leaves the queue (or returns a slot it got)."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        """Hand the slot to the oldest waiter, or free it."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1


@dataclass(eq=False)
class Sequence:
    """One request inside the batching engine."""

    need: int
    prefill_s: float
    done: int = 0
    cancelled: bool = False
    wake_at: int = 0  # the engine sets ``progress`` once ``done`` reaches this (or at the end)
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    async def made(self, tokens: int) -> None:
        """Wait until the engine has made ``tokens`` tokens (or all of them)."""
        while self.done < min(tokens, self.need):
            self.wake_at = tokens
            self.progress.clear()
            await self.progress.wait()

    @property
    def finished(self) -> bool:
        """Every token is out."""
        return self.done >= self.need


class Engine:
    """A continuous-batching engine: FIFO admission to ``slots``, one token per step each.

    The step clock runs ahead of the wall clock by less than ``MIN_SLEEP_S`` and sleeps when
    it is further ahead, so short steps cost no timer each; every step yields to the event loop.
    A busy event loop makes the steps late: ``wall`` holds, per occupancy ``j``, the wall-clock
    seconds and the number of the steps taken back to back (no prefill or idle wait before
    them), the step the engine really took.
    """

    def __init__(self, slots: int, base_s: float, per_seq_s: float) -> None:
        self.slots = slots
        self.base_s = base_s
        self.per_seq_s = per_seq_s
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self.steps = 0
        self.wall: dict[int, list[float]] = {}  # j -> [seconds, steps]
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wall_steps(self) -> dict[str, list[float]]:
        """Per occupancy: the mean wall-clock step, seconds, and how many steps it rests on."""
        return {str(j): [w / n, n] for j, (w, n) in sorted(self.wall.items()) if n}

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence (it joins at the next step boundary with a free slot)."""
        self.waiting.append(seq)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop the step loop."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _pace(self, due: float) -> float:
        """Sleep until ``due`` when it is at least ``MIN_SLEEP_S`` ahead; returns the clock."""
        loop = asyncio.get_running_loop()
        delay = due - loop.time()
        await asyncio.sleep(delay if delay >= MIN_SLEEP_S else 0)
        return due

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        clock = loop.time()
        ended: float | None = None  # the wall time the step before ended, if nothing came between
        while True:
            while self.waiting and len(self.active) < self.slots:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    continue
                if seq.prefill_s > 0:
                    clock = await self._pace(max(clock, loop.time()) + seq.prefill_s)
                    ended = None
                self.active.append(seq)
            if not self.active:
                self._wake.clear()
                await self._wake.wait()
                clock = loop.time()
                ended = None
                continue
            j = len(self.active)
            step = self.base_s + self.per_seq_s * j
            # Steps that take no time (time_scale 0) are taken together up to the next finish.
            k = 1 if step > 0 else max(1, min(seq.need - seq.done for seq in self.active))
            clock = await self._pace(max(clock, loop.time() - MIN_SLEEP_S) + step)
            now = loop.time()
            if ended is not None and step > 0:
                acc = self.wall.setdefault(j, [0.0, 0])
                acc[0] += max(now, clock) - ended  # a clock ahead of the wall: time the step still owes
                acc[1] += 1
            ended = max(now, clock)
            self.steps += k
            still = []
            for seq in self.active:
                seq.done += k
                if seq.done >= seq.wake_at or seq.done >= seq.need:
                    seq.progress.set()
                if not seq.finished and not seq.cancelled:
                    still.append(seq)
            self.active = still


@dataclass
class ServerState:
    """Live counters of the simulated server."""

    slots: FifoSlots
    rng: random.Random
    ids: itertools.count[int] = field(default_factory=itertools.count)
    received: int = 0
    in_service: int = 0
    completed: int = 0
    cancelled: int = 0
    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_KINDS, 0))
    seen: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=SEEN_REQUESTS))
    engine: Engine | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form for ``GET /sim/state``."""
        engine = self.engine
        return {
            "received": self.received,
            "in_service": self.in_service if engine is None else len(engine.active),
            "queued": self.slots.queued if engine is None else sum(not s.cancelled for s in engine.waiting),
            "steps": None if engine is None else engine.steps,
            "step_wall_s": None if engine is None else engine.wall_steps(),
            "completed": self.completed,
            "cancelled": self.cancelled,
            "faults": dict(self.faults),
        }


STATE_KEY = web.AppKey("state", ServerState)


class BadRequestError(ValueError):
    """A request the server rejects with 400; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Plan:
    """How one request will be answered, fixed at arrival."""

    sim_type: SimType
    reasoning: int
    answer: int
    finish_reason: str
    correct: bool
    service_s: float
    fault: str | None
    prompt_tokens: int
    stream: bool
    include_usage: bool

    @property
    def completion_tokens(self) -> int:
        """Reasoning plus answer tokens."""
        return self.reasoning + self.answer


def error_body(message: str, kind: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """An error in OpenAI's format."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _json_error(status: int, message: str, kind: str, **extra: Any) -> web.Response:
    return web.json_response(error_body(message, kind, **extra), status=status)


def _text(content: Any) -> str:
    """The text of a message's content (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _limit(body: dict[str, Any], key: str, *, zero_unlimited: bool = False, holder: str = "") -> int | None:
    source = body if not holder else body.get(holder)
    if not isinstance(source, dict) or source.get(key) is None:
        return None
    value = source[key]
    name = f"{holder}.{key}" if holder else key
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequestError(f"{name} must be a non-negative integer, got {value!r}", name)
    if value == 0 and zero_unlimited:
        return None
    if value == 0 and key == "max_completion_tokens":
        raise BadRequestError("max_completion_tokens must be >= 1", name)
    return value


def plan_request(scenario: Scenario, state: ServerState, body: Any, forced_fault: str | None) -> Plan:
    """Validate a chat completions body and decide, with the server's generator, its answer.

    Caps honoured: ``thinking_token_budget`` (vLLM), ``custom_params.thinking_budget``
    (SGLang strict thinking) and ``thinking_budget_tokens`` (llama.cpp's llama-server)
    bound the reasoning; ``max_completion_tokens`` and
    ``max_tokens`` (0 = unlimited, as on llama.cpp) bound reasoning plus answer.
    """
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequestError("messages must be a non-empty list of message objects", "messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequestError(f"stream must be a boolean, got {stream!r}", "stream")
    options = body.get("stream_options")
    asked = isinstance(options, dict) and options.get("include_usage") is True
    include_usage = bool(stream and asked and scenario.stream_usage)
    users = [_text(m.get("content")) for m in messages if m.get("role") == "user"]
    sim_type = scenario.recognise(users[-1] if users else "")
    prompt_tokens = sum(len(_text(m.get("content")).split()) for m in messages)

    if not scenario.thinking_budget_supported and body.get("thinking_token_budget") is not None:
        raise BadRequestError(
            "thinking_token_budget is set but reasoning is not configured; start the server with a "
            "--reasoning-parser that defines its start and end strings, or --reasoning-config",
            "thinking_token_budget",
        )
    vllm_budget = _limit(body, "thinking_token_budget")
    sglang_budget = _limit(body, "thinking_budget", holder="custom_params")
    llama_budget = body.get("thinking_budget_tokens")
    llama_budget = None if llama_budget == -1 else _limit(body, "thinking_budget_tokens")  # -1: unlimited
    budgets = [b for b in (vllm_budget, sglang_budget, llama_budget) if b is not None]
    total_limits = (_limit(body, "max_completion_tokens"), _limit(body, "max_tokens", zero_unlimited=True))
    totals = [t for t in total_limits if t is not None]
    reasoning = min([sim_type.natural_tokens, *budgets, *totals])
    answer = min([sim_type.answer_tokens, *(t - reasoning for t in totals)])
    finish = "stop" if answer == sim_type.answer_tokens else "length"

    rng = state.rng
    u_correct, z, u_fault = rng.random(), rng.gauss(0.0, 1.0), rng.random()
    fault = forced_fault if forced_fault is not None else scenario.faults.pick(u_fault)
    task = sim_type.task
    tokens = reasoning + answer
    service = max(0.0, task.overhead_s + task.per_token_s * tokens + math.sqrt(task.variance_s2) * z)
    correct = finish == "stop" and u_correct < sim_type.accuracy(reasoning)
    return Plan(
        sim_type,
        reasoning,
        answer,
        finish,
        correct,
        service * scenario.time_scale,
        fault,
        prompt_tokens,
        stream,
        include_usage,
    )


def _truth_headers(plan: Plan) -> dict[str, str]:
    return {
        CORRECT_HEADER: "1" if plan.correct else "0",
        TYPE_HEADER: plan.sim_type.name,
        REASONING_HEADER: str(plan.reasoning),
    }


def _usage(plan: Plan, shape: str) -> dict[str, Any]:
    """The ``usage`` object in the server's shape (:data:`sim.scenario.USAGE_SHAPES`)."""
    usage: dict[str, Any] = {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.completion_tokens,
        "total_tokens": plan.prompt_tokens + plan.completion_tokens,
    }
    if shape == "openai":
        usage["completion_tokens_details"] = {"reasoning_tokens": plan.reasoning}
    elif shape == "sglang":
        usage["reasoning_tokens"] = plan.reasoning
    return usage


class Pacer:
    """Sleeps so that token ``j`` is out at ``start + service x (overhead + c j) / (overhead + c n)``."""

    def __init__(self, plan: Plan) -> None:
        task = plan.sim_type.task
        self.start = asyncio.get_running_loop().time()
        self.total = plan.service_s
        nominal = task.overhead_s + task.per_token_s * plan.completion_tokens
        self.head = task.overhead_s / nominal if nominal > 0 else 0.0
        self.per_token = task.per_token_s / nominal if nominal > 0 else 0.0

    def delay(self, tokens_done: int) -> float:
        """Seconds until ``tokens_done`` tokens are due (<= 0 when they already are)."""
        if self.total <= 0:
            return 0.0
        due = self.start + self.total * min(1.0, self.head + self.per_token * tokens_done)
        return due - asyncio.get_running_loop().time()


def _chunk(rid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _stream(
    request: web.Request, scenario: Scenario, plan: Plan, rid: str, seq: Sequence | None
) -> web.StreamResponse:
    """Chunks due within ``MIN_SLEEP_S`` of each other leave in one write; a pause flushes them.

    Without an engine the tokens are paced by the plan's service time; with one (``seq``) each
    token leaves when the engine has made it.
    """
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **_truth_headers(plan)}
    )
    await resp.prepare(request)
    created, model, field_name = int(time.time()), scenario.model, scenario.reasoning_field
    pacer = Pacer(plan) if seq is None else None
    pending = [_chunk(rid, created, model, {"role": "assistant", "content": ""})]

    async def flush() -> None:
        if pending:
            await resp.write(b"".join(pending))
            pending.clear()

    async def until(tokens: int) -> None:
        """Wait until ``tokens`` tokens are made, writing what is pending first."""
        if pacer is not None:
            delay = pacer.delay(tokens)
            if delay >= MIN_SLEEP_S:
                await flush()
                await asyncio.sleep(delay)
            return
        assert seq is not None
        if seq.done < tokens:
            await flush()
            await seq.made(tokens)

    step = scenario.chunk_tokens
    n = plan.completion_tokens
    trouble_at = n // 2
    done = 0
    made: dict[tuple[bool, int], bytes] = {}  # identical chunks are serialised once
    while done < n:
        if plan.fault is not None and done >= trouble_at:
            await flush()
            if plan.fault == "drop":
                if request.transport is not None:
                    request.transport.close()
                return resp
            if plan.fault == "stall":
                await asyncio.sleep(scenario.faults.stall_s)
            elif plan.fault == "malformed":
                pending.append(b'data: {"choices": [{"delta": \n\n')
            trouble_at = n + 1
        thinking = done < plan.reasoning
        k = min(step, (plan.reasoning - done) if thinking else n - done)
        await until(done + k)
        chunk = made.get((thinking, k))
        if chunk is None:
            delta = {field_name: "hmm " * k} if thinking else {"content": "yes " * k}
            chunk = made[thinking, k] = _chunk(rid, created, model, delta)
        pending.append(chunk)
        done += k
    await until(n)
    pending.append(_chunk(rid, created, model, {}, plan.finish_reason))
    if plan.include_usage:
        usage = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": _usage(plan, scenario.usage_shape),
        }
        pending.append(b"data: " + json.dumps(usage).encode() + b"\n\n")
    pending.append(b"data: [DONE]\n\n")
    await flush()
    await resp.write_eof()
    return resp


async def _respond(
    request: web.Request, scenario: Scenario, plan: Plan, rid: str, seq: Sequence | None = None
) -> web.StreamResponse:
    if plan.fault == "error":
        return _json_error(500, "simulated internal error", "server_error", code="sim_fault")
    if plan.stream:
        return await _stream(request, scenario, plan, rid, seq)
    if plan.fault == "stall":
        await asyncio.sleep(scenario.faults.stall_s)
    if plan.fault == "drop":
        if seq is None:
            await asyncio.sleep(plan.service_s / 2)
        else:
            await seq.made(seq.need // 2)
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=500)
    if seq is not None:
        await seq.made(seq.need)
    elif plan.service_s >= MIN_SLEEP_S:
        await asyncio.sleep(plan.service_s)
    headers = _truth_headers(plan)
    if plan.fault == "malformed":
        return web.Response(
            body=b'{"id": "' + rid.encode() + b'", "choices": [', content_type="application/json", headers=headers
        )
    message = {"role": "assistant", "content": "yes " * plan.answer, scenario.reasoning_field: "hmm " * plan.reasoning}
    body = {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": scenario.model,
        "choices": [{"index": 0, "message": message, "finish_reason": plan.finish_reason}],
        "usage": _usage(plan, scenario.usage_shape),
    }
    return web.json_response(body, headers=headers)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    scenario, state = request.app[SCENARIO_KEY], request.app[STATE_KEY]
    state.received += 1
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _json_error(400, "the request body is not valid JSON", "invalid_request_error")
    state.seen.append(
        {
            "body": body,
            "authorization": request.headers.get("Authorization"),
            "expect": request.headers.get("Expect"),
            "objective": request.headers.get("x-gateway-inference-objective"),
            "content_length": request.headers.get("Content-Length"),
            "body_bytes": len(await request.read()),  # what arrived (the parsed body is cached)
        }
    )
    forced = request.headers.get(FAULT_HEADER)
    if forced is not None and forced not in FAULT_KINDS:
        return _json_error(400, f"{FAULT_HEADER} must be one of {list(FAULT_KINDS)}", "invalid_request_error")
    try:
        plan = plan_request(scenario, state, body, forced)
    except BadRequestError as exc:
        return _json_error(400, str(exc), "invalid_request_error", param=exc.param)
    rid = f"chatcmpl-sim-{next(state.ids)}"
    if state.engine is not None:
        return await _engine_request(request, scenario, state, state.engine, plan, rid=rid)
    await state.slots.acquire()
    state.in_service += 1
    try:
        if plan.fault is not None:
            state.faults[plan.fault] += 1
        resp = await _respond(request, scenario, plan, rid)
        state.completed += 1
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        state.cancelled += 1
        raise
    finally:
        state.in_service -= 1
        state.slots.release()


async def _engine_request(
    request: web.Request, scenario: Scenario, state: ServerState, engine: Engine, plan: Plan, *, rid: str
) -> web.StreamResponse:
    """One request through the batching engine; leaving early frees its slot at the next step."""
    if plan.fault is not None:
        state.faults[plan.fault] += 1
    if plan.fault == "error":
        return await _respond(request, scenario, plan, rid)
    scale = scenario.time_scale
    seq = Sequence(need=plan.completion_tokens, prefill_s=plan.sim_type.task.overhead_s * scale)
    engine.submit(seq)
    try:
        resp = await _respond(request, scenario, plan, rid, seq)
        state.completed += 1
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        state.cancelled += 1
        raise
    finally:
        seq.cancelled = True


async def models(request: web.Request) -> web.Response:
    """``GET /v1/models``."""
    model = request.app[SCENARIO_KEY].model
    return web.json_response(
        {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "thinkcap-sim"}]}
    )


async def health(_: web.Request) -> web.Response:
    """``GET /health``."""
    return web.json_response({"status": "ok"})


async def sim_state(request: web.Request) -> web.Response:
    """``GET /sim/state``: live counters."""
    return web.json_response(request.app[STATE_KEY].as_dict())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's own 404/405 into OpenAI-style error bodies."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json_error(
            exc.status,
            f"{request.method} {request.path}: {exc.reason}",
            "invalid_request_error",
            code=exc.reason.lower().replace(" ", "_"),
        )


async def sim_requests(request: web.Request) -> web.Response:
    """``GET /sim/requests``: the last request bodies received (their length in bytes, and their
    Authorization, Expect, Content-Length and ``x-gateway-inference-objective`` headers)."""
    return web.json_response(list(request.app[STATE_KEY].seen))


def create_app(scenario: Scenario) -> web.Application:
    """The simulated server for ``scenario``.

    Run it with ``handler_cancellation=True`` (as :func:`serve` does) so that a client
    disconnect cancels the request and frees its slot at once.
    """
    app = web.Application(middlewares=[openai_errors], client_max_size=MAX_BODY_BYTES)
    app[SCENARIO_KEY] = scenario
    state = ServerState(FifoSlots(scenario.slots), random.Random(scenario.seed))
    app[STATE_KEY] = state
    engine = scenario.engine
    if engine is not None:
        scale = scenario.time_scale
        state.engine = Engine(engine.slots, engine.step_base_s * scale, engine.step_per_seq_s * scale)

        async def stop_engine(_: web.Application) -> None:
            assert state.engine is not None
            await state.engine.close()

        app.on_cleanup.append(stop_engine)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/sim/state", sim_state)
    app.router.add_get("/sim/requests", sim_requests)
    return app


async def serve(scenario: Scenario, host: str, port: int) -> web.AppRunner:
    """Start the simulated server on ``host:port``; the caller awaits ``runner.cleanup()``."""
    runner = web.AppRunner(create_app(scenario), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
