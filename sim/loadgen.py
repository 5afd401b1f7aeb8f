"""An open-loop Poisson load generator for OpenAI-compatible chat servers.

Arrival times are drawn up front from the schedule (a non-homogeneous Poisson process:
constant or linearly ramped rate per phase), so a slow server never slows the arrivals.
Each request gets a type from the scenario's mix and one of its prompts. Every request ends
as one :class:`Record`, whatever happens to it; errors are counted, never raised.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import numpy as np
from numpy.typing import NDArray

from thinkcap.sim.backend import CORRECT_HEADER
from thinkcap.sim.scenario import LoadPhase, Scenario
from thinkcap.sim.sse import DONE, sse_data

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

#: Statuses that mean "the server refused the request to protect itself".
SHED_STATUSES = (429, 503)


@dataclass(frozen=True)
class LoadSettings:
    """How to send: target, streaming, bounds on time and number of requests."""

    target: str
    stream: bool = False
    seed: int = 0
    timeout_s: float = 60.0
    drain_s: float = 30.0
    max_requests: int = 100_000
    max_in_flight: int = 1000
    feedback_url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    #: Keep each streamed event that brought text in :attr:`Record.events` (its time, and the
    #: server's own clock where it sends one).
    event_times: bool = False

    def __post_init__(self) -> None:
        if not self.target.startswith(("http://", "https://")):
            raise ValueError(f"target must be an http(s) URL, got {self.target!r}")
        for name in ("timeout_s", "drain_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.max_requests < 0 or self.max_in_flight < 1:
            raise ValueError("max_requests must be >= 0 and max_in_flight >= 1")

    @property
    def url(self) -> str:
        """The chat completions URL under ``target`` (which may or may not end in ``/v1``)."""
        base = self.target.rstrip("/")
        base = base.removesuffix("/v1")
        return base + "/v1/chat/completions"


@dataclass
class Record:
    """One request as the client saw it; times in seconds since the run started."""

    id: int
    phase: int
    type: str
    send_s: float
    first_byte_s: float | None = None
    end_s: float | None = None
    status: int = 0
    error: str | None = None
    prompt_tokens: int | None = None
    reasoning_tokens: int | None = None
    completion_tokens: int | None = None
    correct: bool | None = None
    request_id: str | None = None
    #: With ``LoadSettings.event_times``: per streamed event that brought text, its arrival time
    #: and the server's own count of milliseconds spent generating so far where the event
    #: carries it (llama-server's ``timings.predicted_ms`` under ``timings_per_token``), else ``None``.
    events: list[tuple[float, float | None]] | None = None

    @property
    def answered(self) -> bool:
        """A 200 with a complete, well-formed answer."""
        return self.status == 200 and self.error is None

    @property
    def system_time_s(self) -> float | None:
        """From sending to the last byte."""
        return None if self.end_s is None else self.end_s - self.send_s

    def as_dict(self) -> dict[str, Any]:
        """The JSON-lines form."""
        out = asdict(self)
        out["system_time_s"] = self.system_time_s
        return out


def arrival_times(phases: Sequence[LoadPhase], rng: np.random.Generator) -> tuple[FloatArray, IntArray]:
    """Arrival times (sorted) and their phase indices, by thinning a Poisson process per phase."""
    times, tags = [], []
    start = 0.0
    for k, ph in enumerate(phases):
        peak = max(ph.rate, ph.end_rate)
        n = int(rng.poisson(peak * ph.duration_s))
        t = np.sort(rng.uniform(0.0, ph.duration_s, n))
        if ph.rate_end is not None and peak > 0:
            rate = ph.rate + (ph.end_rate - ph.rate) * t / ph.duration_s
            t = t[rng.random(n) * peak < rate]
        times.append(start + t)
        tags.append(np.full(t.size, k, dtype=np.int64))
        start += ph.duration_s
    if not times:
        return np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate(times), np.concatenate(tags)


def _count_stream(line: bytes, rec: Record, counts: list[int]) -> dict[str, Any] | None:
    """Fold one SSE line into the record: usage if sent, else count reasoning/content deltas;
    the chunk if it brought text."""
    chunk = sse_data(line)
    if chunk is None:
        return None
    if chunk == DONE:
        counts[2] = 1
        return None
    assert isinstance(chunk, dict)
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        _apply_usage(usage, rec)
    text = False
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("reasoning") or delta.get("reasoning_content"):
            counts[0] += 1
            text = True
        if delta.get("content"):
            counts[1] += 1
            text = True
    return chunk if text else None


def _server_clock_ms(chunk: Mapping[str, Any]) -> float | None:
    """The server's own milliseconds spent generating so far, where the chunk says it."""
    timings = chunk.get("timings")
    value = timings.get("predicted_ms") if isinstance(timings, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _apply_usage(usage: Mapping[str, Any], rec: Record) -> None:
    rec.prompt_tokens = usage.get("prompt_tokens")
    rec.completion_tokens = usage.get("completion_tokens")
    details = usage.get("completion_tokens_details") or {}
    rec.reasoning_tokens = details.get("reasoning_tokens", 0) if isinstance(details, dict) else None


@dataclass
class LoadResult:
    """Everything a run produced."""

    records: list[Record]
    feedback_sent: int = 0
    feedback_errors: int = 0


class _Run:
    def __init__(self, scenario: Scenario, settings: LoadSettings, on_record: Callable[[Record], None] | None) -> None:
        self.scenario = scenario
        self.settings = settings
        self.on_record = on_record
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.in_flight = 0
        self.result = LoadResult([])

    def now(self) -> float:
        return self.loop.time() - self.t0

    def finish(self, rec: Record) -> None:
        self.result.records.append(rec)
        if self.on_record is not None:
            self.on_record(rec)

    async def one(self, session: aiohttp.ClientSession, rec: Record, prompt: str) -> None:
        s = self.settings
        body: dict[str, Any] = {
            "model": self.scenario.model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": s.stream,
            **s.extra_body,
        }
        if s.stream:
            body["stream_options"] = {"include_usage": True}
        self.in_flight += 1
        try:
            async with session.post(s.url, json=body, headers=dict(s.headers)) as resp:
                rec.first_byte_s = self.now()
                rec.status = resp.status
                rec.request_id = resp.headers.get("X-Request-Id")
                if resp.status != 200:
                    await resp.read()
                    rec.error = "shed" if resp.status in SHED_STATUSES else "http"
                elif s.stream:
                    counts = [0, 0, 0]
                    if s.event_times:
                        rec.events = []
                    async for line in resp.content:
                        chunk = _count_stream(line, rec, counts)
                        if chunk is not None and rec.events is not None:
                            rec.events.append((self.now(), _server_clock_ms(chunk)))
                    if not counts[2]:
                        rec.error = "truncated"
                    if rec.completion_tokens is None:
                        rec.reasoning_tokens, rec.completion_tokens = counts[0], counts[0] + counts[1]
                else:
                    data = json.loads(await resp.read())
                    if not isinstance(data, dict):
                        raise ValueError("the response is not a JSON object")
                    rec.request_id = rec.request_id or data.get("id")
                    _apply_usage(data.get("usage") or {}, rec)
                flag = resp.headers.get(CORRECT_HEADER)
                rec.correct = None if flag is None else flag == "1"
        except TimeoutError:
            rec.error = "timeout"
        except ValueError:
            rec.error = "protocol"
        except aiohttp.ClientConnectorError:
            rec.error = "connect"
        except aiohttp.ClientError:
            rec.error = "disconnected"
        except asyncio.CancelledError:
            rec.error = "cancelled"
        finally:
            self.in_flight -= 1
            rec.end_s = self.now() if rec.error is None or rec.first_byte_s is not None else None
            self.finish(rec)
        if s.feedback_url and rec.answered and rec.correct is not None:
            await self.feedback(session, rec)

    async def feedback(self, session: aiohttp.ClientSession, rec: Record) -> None:
        payload = {
            "request_id": rec.request_id,
            "type": rec.type,
            "score": 1.0 if rec.correct else 0.0,
            "reasoning_tokens": rec.reasoning_tokens,
        }
        try:
            assert self.settings.feedback_url is not None
            async with session.post(self.settings.feedback_url, json=payload) as resp:
                await resp.read()
                ok = resp.status < 300
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok:
            self.result.feedback_sent += 1
        else:
            self.result.feedback_errors += 1

    async def run(self) -> LoadResult:
        s, sc = self.settings, self.scenario
        rng = np.random.default_rng(s.seed)
        times, phase = arrival_times(sc.phases, rng)
        times, phase = times[: s.max_requests], phase[: s.max_requests]
        kinds = rng.choice(len(sc.types), size=times.size, p=sc.priors)
        picks = rng.integers(0, 1 << 30, size=times.size)
        timeout = aiohttp.ClientTimeout(total=s.timeout_s)
        connector = aiohttp.TCPConnector(limit=s.max_in_flight, force_close=False)
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            for i, (t, k, ph, pick) in enumerate(zip(times, kinds, phase, picks, strict=True)):
                delay = float(t) - self.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                sim_type = sc.types[int(k)]
                rec = Record(id=i, phase=int(ph), type=sim_type.name, send_s=float(t))
                if self.in_flight >= s.max_in_flight:
                    rec.error = "client_overflow"
                    self.finish(rec)
                    continue
                task = asyncio.create_task(self.one(session, rec, sim_type.prompt(int(pick))))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            end = sum(p.duration_s for p in sc.phases)
            if self.now() < end:
                await asyncio.sleep(end - self.now())
            if tasks:
                _, pending = await asyncio.wait(set(tasks), timeout=s.drain_s)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        self.result.records.sort(key=lambda r: r.id)
        return self.result


async def run_load(
    scenario: Scenario, settings: LoadSettings, *, on_record: Callable[[Record], None] | None = None
) -> LoadResult:
    """Send the scenario's schedule to ``settings.target``; returns when every request ended.

    The run lasts the schedule plus at most ``drain_s``; requests still open then are
    cancelled and recorded with ``error = "cancelled"``.
    """
    return await _Run(scenario, settings, on_record).run()
