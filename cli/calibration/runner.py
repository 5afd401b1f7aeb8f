"""Every item at every cap against the backend: the jobs, their results (kept as they come, for
``--resume``) and the timings the service and step fits read."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import numpy as np

from thinkcap.cli.calibration.dataset import Item, grade
from thinkcap.proxy.dialects import apply_cap, reasoning_cap
from thinkcap.proxy.transport.client import base_url
from thinkcap.sim.sse import sse_data

#: Seconds a calibration request may take.
REQUEST_TIMEOUT_S = 300.0


@dataclass
class Result:
    """One request of the run."""

    key: str
    line: int
    type: str
    cap: int
    concurrency: int
    correct: bool
    tokens: int
    seconds: float
    first_token_s: float | None
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (mean in flight, mean gap) while all decode
    error: str | None = None

    def record(self) -> dict[str, Any]:
        return self.__dict__.copy()


def job_key(item: Item, cap: int, repeat: int) -> str:
    return f"{item.line}:{cap}:{repeat}"


class Runner:
    """Sends the jobs, counts this run's requests in flight, keeps the results."""

    def __init__(self, url: str, dialect: str, model: str | None, thinks: bool) -> None:
        self.url = base_url(url) + "/v1/chat/completions"
        self.dialect = dialect
        self.model = model
        self.thinks = thinks
        self.in_flight = 0
        self.prefilling = 0  # sent, no token yet: reading its prompt, which pauses the others' decoding

    async def run_one(self, session: aiohttp.ClientSession, item: Item, cap: int, repeat: int, level: int) -> Result:
        body: dict[str, Any] = {"messages": list(item.messages), "stream": True, "temperature": 0.0,
                                "stream_options": {"include_usage": True}}  # fmt: skip
        if self.model:
            body["model"] = self.model
        caps_reasoning = reasoning_cap(self.dialect, self.thinks)
        if caps_reasoning:
            body["max_tokens"] = cap + 256  # room for the answer after the capped reasoning
        apply_cap(body, cap, self.dialect, thinks=self.thinks)
        if repeat:
            body["seed"] = repeat
        clock = time.perf_counter
        start = clock()
        self.in_flight += 1
        self.prefilling += 1
        waiting = True
        content: list[str] = []
        stamps: list[float] = []
        flight: list[float] = []
        clean: list[bool] = []  # no request of the run was reading its prompt at this token
        usage_tokens: int | None = None
        error = None
        try:
            async with session.post(self.url, json=body) as resp:
                if resp.status != 200:
                    error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                else:
                    async for raw in resp.content:
                        try:
                            chunk = sse_data(raw)
                        except ValueError:
                            continue
                        if not isinstance(chunk, dict):
                            continue
                        if isinstance(chunk.get("usage"), dict):
                            usage_tokens = chunk["usage"].get("completion_tokens")
                        for choice in chunk.get("choices") or []:
                            delta = choice.get("delta") or {}
                            piece = delta.get("content")
                            if piece or delta.get("reasoning_content") or delta.get("reasoning"):
                                if waiting:
                                    waiting = False
                                    self.prefilling -= 1
                                stamps.append(clock())
                                flight.append(float(self.in_flight))
                                clean.append(self.prefilling == 0)
                            if piece:
                                content.append(piece)
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self.in_flight -= 1
            if waiting:
                self.prefilling -= 1
        end = clock()
        tokens = usage_tokens if isinstance(usage_tokens, int) else len(stamps)
        gaps = []
        # the step: token gaps while every request of the run in flight was decoding
        steady = [i for i in range(1, len(stamps)) if clean[i] and clean[i - 1]]
        if len(steady) >= 2:
            gaps.append((float(np.mean([flight[i] for i in steady])),
                         float(np.mean([stamps[i] - stamps[i - 1] for i in steady]))))  # fmt: skip
        return Result(
            key=job_key(item, cap, repeat), line=item.line, type=item.type, cap=cap, concurrency=level,
            correct=error is None and grade(item, "".join(content)), tokens=int(tokens), seconds=end - start,
            first_token_s=(stamps[0] - start) if stamps else None, gaps=gaps, error=error,
        )  # fmt: skip


class Progress:
    """Items done, elapsed and remaining, on one line of a terminal (else every tenth)."""

    def __init__(self, total: int, done: int, out: IO[str]) -> None:
        self.total, self.done, self.out = total, done, out
        self.started = time.monotonic()
        self.fresh = 0
        self.tty = out.isatty()
        self._last_tenth = -1

    def tick(self) -> None:
        self.done += 1
        self.fresh += 1
        elapsed = time.monotonic() - self.started
        left = elapsed / self.fresh * (self.total - self.done)
        text = f"calibrate: {self.done}/{self.total} done, {elapsed:.0f} s elapsed, about {left:.0f} s left"
        if self.tty:
            self.out.write("\r" + text + (" " * 8) + ("\n" if self.done == self.total else ""))
        elif (tenth := self.done * 10 // self.total) != self._last_tenth:
            self._last_tenth = tenth
            self.out.write(text + "\n")
        self.out.flush()


async def run_jobs(
    runner: Runner, jobs: list[tuple[Item, int, int]], levels: Sequence[int], partial: Path, progress: Progress
) -> list[Result]:
    """Share the jobs out between the concurrency levels (in order), run each share with that
    many at once, append every result to ``partial`` as it comes."""
    out: list[Result] = []
    shares = np.array_split(np.arange(len(jobs)), len(levels))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    # a new connection per request: llama-server drops idle keep-alive connections (see KEEP_ALIVE)
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        with partial.open("a", encoding="utf-8") as fh:
            for level, share in zip(levels, shares, strict=True):
                queue = [jobs[i] for i in share]

                async def worker(queue: list[tuple[Item, int, int]] = queue, level: int = level) -> None:
                    while queue:
                        item, cap, repeat = queue.pop(0)
                        res = await runner.run_one(session, item, cap, repeat, level)
                        out.append(res)
                        fh.write(json.dumps(res.record()) + "\n")
                        fh.flush()
                        progress.tick()

                await asyncio.gather(*(worker() for _ in range(level)))
    return out


def load_partial(partial: Path) -> list[Result]:
    """The results a previous run kept; the file is rewritten with those alone, so that a line
    torn by a crash is dropped, not glued to the next result."""
    out: list[Result] = []
    if not partial.exists():
        return out
    kept = []
    for text in partial.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(text)
            row["gaps"] = [tuple(g) for g in row.get("gaps", [])]
            out.append(Result(**row))
            kept.append(text)
        except (json.JSONDecodeError, TypeError):
            continue
    partial.write_text("".join(t + "\n" for t in kept), encoding="utf-8")
    return out
