"""Proxy overhead: the simulated server (time scale 0) direct vs through ``thinkcap serve``.

Run: .venv/bin/python bench/proxy.py [--seconds S] [--same-cpu | --sequential N]

Four processes: the simulated server (``thinkcap mock-backend --time-scale 0``, one token per
streamed chunk) pinned to CPU 0, the proxy (``thinkcap serve``, ``max_concurrency`` 256 so
admission never waits, request logs to /dev/null) and a plain aiohttp pass-through
(``bench/aiohttp_passthrough.py``: aiohttp's server and client, relaying; nothing else) pinned
to CPU 1, and this client, a raw keep-alive HTTP/1.1 client, pinned to CPU 0. All requests ask
for 64 tokens (``max_tokens``; the proxy's dialect is ``llamacpp`` with every cap >= 64, so
every path generates the same answer; the control loop is off, so the caps and admission never
change; ``--controller`` turns it on, in front of an engine declared with 256 slots, so that
what a decision costs the requests around it shows). For each rate, the same seeded open-loop
Poisson schedule is sent direct, through the aiohttp pass-through and through the proxy, in
turn, three rounds (seeds 0-2); each cell is the
median over rounds. Latency is from the scheduled send time to the last byte (and, streaming,
to the first body byte). Added latency = percentile through a forwarder - direct percentile.
The aiohttp pass-through's row is what the usual Python gateway pays on the machine at the time
of the run; thinkcap's goal is to add no more. The highest sustained rate is measured closed-
loop with 64 connections, non-streaming. The first table, printed before the others, is the
machine's own cost of a hop: a one-byte loopback round trip from the client's CPU, to a process
on the same CPU and to one on the proxy's CPU, back to back and with 5 ms of idleness before
each (at 200/s a request finds the CPUs idle). A forwarder on its own CPU puts two such round
trips on every request's path. ``--same-cpu`` pins the proxy to CPU 0 too and runs the open-
loop part at 200/s only: on a virtual machine, a request that crosses to an idle CPU waits for
it to wake up, and this separates that wait from the proxy's own work. ``--sequential N`` sends
N requests one at a time instead, plain then streaming, and reports the added median latency
with each forwarder process's CPU time per request (from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "examples" / "scenario.toml"
TOKENS = 64
ROUNDS = 3

CONFIG = """
[objective]
latency_penalty = 0.02
[workload]
arrival_rate = 1.0
[backend]
url = "http://127.0.0.1:{port}"
dialect = "llamacpp"
probe = false
{engine}
[proxy]
listen = "127.0.0.1:{proxy_port}"
admin_listen = "127.0.0.1:0"
max_concurrency = 256
max_queue = 4096
[controller]
enabled = {controller}
[[types]]
name = "chat"
prior = 1.0
min_tokens = 64
max_tokens = 1024
accuracy = {{ base = 0.7, gain = 0.2, rate = 0.01 }}
{service}
"""
#: With --controller: the control loop on, in front of an engine declared with 256 slots (vLLM's
#: default max_num_seqs), so every decision builds the batching queue model at that size.
ENGINE = "slots = 256\nstep = { base_s = 0.007, per_seq_s = 0.0001 }"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def wait_ready(url: str) -> None:
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} never answered")


def request_bytes(port: int, stream: bool) -> bytes:
    body = json.dumps(
        {
            "model": "sim-reasoner",
            "messages": [{"role": "user", "content": "[sim:chat] hi"}],
            "max_tokens": TOKENS,
            "stream": stream,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Conn:
    """One keep-alive connection that sends a request and reads the whole response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def exchange(self, payload: bytes) -> float | None:
        """Send; return the loop time of the first body byte (None if no body)."""
        loop = asyncio.get_running_loop()
        self.writer.write(payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:60].decode(errors="replace"))
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            first = None
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                data = await self.reader.readexactly(size + 2)
                if first is None and size:
                    first = loop.time()
                if size == 0:
                    return first
                del data
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        await self.reader.readexactly(length)
        return loop.time()


async def open_conn(port: int) -> Conn:
    return Conn(*await asyncio.open_connection("127.0.0.1", port))


async def open_loop(port: int, rate: float, seconds: float, stream: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Latencies (to last byte, to first byte) of an open-loop Poisson schedule."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1 / rate, int(rate * seconds * 1.2)))
    times = times[times < seconds]
    payload = request_bytes(port, stream)
    idle: list[Conn] = [await open_conn(port) for _ in range(64)]
    total = np.full(times.size, np.nan)
    first = np.full(times.size, np.nan)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2

    async def one(i: int) -> None:
        conn = idle.pop() if idle else await open_conn(port)
        try:
            fb = await conn.exchange(payload)
        except (ConnectionError, RuntimeError, asyncio.IncompleteReadError):
            conn.writer.close()
            return  # counted as an error: its latency stays NaN
        end = loop.time()
        total[i] = end - (start + times[i])
        first[i] = (fb if fb is not None else end) - (start + times[i])
        idle.append(conn)

    tasks = []
    for i, t in enumerate(times):
        delay = start + t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    for c in idle:
        c.writer.close()
    return total, first


async def one_at_a_time(port: int, stream: bool, count: int) -> np.ndarray:
    """Latencies of ``count`` requests sent one after another on one connection."""
    conn = await open_conn(port)
    payload = request_bytes(port, stream)
    loop = asyncio.get_running_loop()
    out = np.empty(count)
    for i in range(count):
        start = loop.time()
        await conn.exchange(payload)
        out[i] = loop.time() - start
    conn.writer.close()
    return out


ECHO = """
import os, socket, sys
os.sched_setaffinity(0, {int(sys.argv[2])})
s = socket.socket(fileno=int(sys.argv[1]))
while data := s.recv(64):
    s.send(data)
"""


def round_trips(here: int, there: int, gap_s: float, count: int = 400) -> tuple[float, float]:
    """p50 and p90 µs of a one-byte loopback round trip from a process on CPU ``here`` to an echo
    process on CPU ``there``, with ``gap_s`` of sleep before each (long enough for both CPUs to
    go idle) or none (both stay busy)."""
    mine, theirs = socket.socketpair()
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(theirs.fileno()), str(there)], pass_fds=(theirs.fileno(),))
    theirs.close()
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {here})
    try:
        mine.send(b"x")  # the echo process is up (and pinned) once this comes back
        mine.recv(64)
        samples = []
        for _ in range(count):
            if gap_s:
                time.sleep(gap_s)
            start = time.perf_counter_ns()
            mine.send(b"x")
            mine.recv(64)
            samples.append(time.perf_counter_ns() - start)
    finally:
        mine.close()
        echo.wait()
        os.sched_setaffinity(0, old)
    return float(np.percentile(samples, 50)) / 1e3, float(np.percentile(samples, 90)) / 1e3


def wake_table(client_cpu: int, proxy_cpu: int) -> None:
    """What a hop between the benchmark's CPUs costs on this machine at the time of the run."""
    print("| loopback round trip, one byte, µs | back to back p50 / p90 | 5 ms apart (CPUs idle) p50 / p90 |")
    print("|---|---|---|")
    for label, there in (("same CPU", client_cpu), ("client's CPU to the proxy's", proxy_cpu)):
        busy, idle = round_trips(client_cpu, there, 0.0), round_trips(client_cpu, there, 0.005)
        print(f"| {label} | {busy[0]:.0f} / {busy[1]:.0f} | {idle[0]:.0f} / {idle[1]:.0f} |")
    print()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sequential(sim_port: int, paths: list[tuple[str, int, int]], count: int) -> None:
    """Each forwarder's CPU time and added latency per request when requests come one at a time."""
    print("| mode | through | direct p50 ms | through p50 ms | added p50 ms | forwarder CPU per request |")
    print("|---|---|---|---|---|---|")
    for stream in (False, True):
        mode = "stream 64 chunks" if stream else "plain"
        d = ms(asyncio.run(one_at_a_time(sim_port, stream, count)), 50)
        for name, port, pid in paths:
            before = cpu_seconds(pid)
            p = ms(asyncio.run(one_at_a_time(port, stream, count)), 50)
            cpu = (cpu_seconds(pid) - before) / count
            print(f"| {mode} | {name} | {d:.2f} | {p:.2f} | {p - d:.2f} | {cpu * 1e6:.0f} µs |")


async def closed_loop(port: int, seconds: float, connections: int) -> float:
    """Requests per second with ``connections`` connections each sending back to back."""
    payload = request_bytes(port, False)
    count = [0]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def worker() -> None:
        conn = await open_conn(port)
        while loop.time() < deadline:
            await conn.exchange(payload)
            count[0] += 1
        conn.writer.close()

    start = loop.time()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return count[0] / (loop.time() - start)


def ms(x: np.ndarray, q: float) -> float:
    return float(np.nanpercentile(x, q) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each open-loop run")
    ap.add_argument(
        "--same-cpu",
        action="store_true",
        help="pin the proxy to the client's and the server's CPU as well (open loop at 200/s only): no request "
        "then waits for another CPU to wake up",
    )
    ap.add_argument(
        "--sequential",
        type=int,
        metavar="N",
        help="instead, send N requests one at a time (plain, then streaming); report each forwarder's CPU time "
        "per request",
    )
    ap.add_argument("--rates", default="200,1000", help="open-loop rates, requests/s (comma-separated)")
    ap.add_argument("--modes", default="plain,stream", help="plain, stream or both (comma-separated)")
    ap.add_argument("--no-closed-loop", action="store_true", help="skip the closed-loop throughput table")
    ap.add_argument(
        "--controller",
        action="store_true",
        help="run thinkcap with its control loop on (256 slots, a decision every 2 s) instead of off",
    )
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    if not set(modes) <= {"plain", "stream"}:
        ap.error(f"--modes: plain and/or stream, got {args.modes!r}")
    cpus = sorted(os.sched_getaffinity(0))
    sim_cpu, proxy_cpu = cpus[0], cpus[0] if args.same_cpu else cpus[-1]
    sim_port, proxy_port, bare_port = free_port(), free_port(), free_port()  # bare: the aiohttp pass-through
    with tempfile.TemporaryDirectory() as tmp:
        scenario = Path(tmp) / "scenario.toml"
        scenario.write_text(SCENARIO.read_text().replace("chunk_tokens = 8", "chunk_tokens = 1"))
        config = Path(tmp) / "proxy.toml"
        config.write_text(
            CONFIG.format(
                port=sim_port,
                proxy_port=proxy_port,
                controller=str(args.controller).lower(),
                engine=ENGINE if args.controller else "",
                service="service = { prefill_s = 0.15 }"
                if args.controller
                else "service = { overhead_s = 0.15, per_token_s = 0.012 }",
            )
        )
        exe = [sys.executable, "-m", "thinkcap.cli"]
        sim = subprocess.Popen(
            [*exe, "mock-backend", "--scenario", str(scenario), "--port", str(sim_port), "--time-scale", "0"],
            stdout=subprocess.DEVNULL,
        )
        prox = subprocess.Popen([*exe, "serve", "--config", str(config)], stdout=subprocess.DEVNULL)
        forwarder = Path(__file__).with_name("aiohttp_passthrough.py")
        # -P: the script's directory holds this file, which would shadow the ``proxy`` package.
        bare = subprocess.Popen([sys.executable, "-P", str(forwarder), str(bare_port), str(sim_port)])
        try:
            os.sched_setaffinity(sim.pid, {sim_cpu})
            os.sched_setaffinity(prox.pid, {proxy_cpu})
            os.sched_setaffinity(bare.pid, {proxy_cpu})
            os.sched_setaffinity(0, {sim_cpu})
            wait_ready(f"http://127.0.0.1:{sim_port}/health")
            wait_ready(f"http://127.0.0.1:{proxy_port}/healthz")
            wait_listening(bare_port)
            if args.sequential:
                sequential(
                    sim_port,
                    [("aiohttp pass-through", bare_port, bare.pid), ("thinkcap", proxy_port, prox.pid)],
                    args.sequential,
                )
                return
            if proxy_cpu != sim_cpu:
                wake_table(sim_cpu, proxy_cpu)
            print(
                "| rate | mode | through | direct p50 / p99 ms | through p50 / p99 ms | added p50 / p99 ms "
                "| first byte added p50 ms | errors direct / through |"
            )
            print("|---|---|---|---|---|---|---|---|")
            paths = (("aiohttp pass-through", bare_port), ("thinkcap", proxy_port))
            for rate in (200.0,) if args.same_cpu else rates:
                for stream in [m == "stream" for m in modes]:
                    rows: dict[str, list[tuple[float, ...]]] = {name: [] for name, _ in paths}
                    for seed in range(ROUNDS):  # direct and each forwarder in turn, same schedule per round
                        d, df = asyncio.run(open_loop(sim_port, rate, args.seconds, stream, seed))
                        for name, port in paths:
                            p, pf = asyncio.run(open_loop(port, rate, args.seconds, stream, seed))
                            rows[name].append(
                                (
                                    ms(d, 50),
                                    ms(d, 99),
                                    ms(p, 50),
                                    ms(p, 99),
                                    ms(df, 50),
                                    ms(pf, 50),
                                    int(np.isnan(d).sum()),
                                    int(np.isnan(p).sum()),
                                )
                            )
                    mode = "stream 64 chunks" if stream else "plain"
                    for name, _ in paths:
                        m = np.median(np.array(rows[name]), axis=0)
                        fb = f"{m[5] - m[4]:.2f}" if stream else "-"
                        print(
                            f"| {rate:.0f}/s | {mode} | {name} | {m[0]:.2f} / {m[1]:.2f} | "
                            f"{m[2]:.2f} / {m[3]:.2f} | {m[2] - m[0]:.2f} / {m[3] - m[1]:.2f} | {fb} | "
                            f"{sum(r[6] for r in rows[name])} / {sum(r[7] for r in rows[name])} |"
                        )
            if args.same_cpu or args.no_closed_loop:
                return
            direct = asyncio.run(closed_loop(sim_port, 5.0, 64))
            through = {name: asyncio.run(closed_loop(port, 5.0, 64)) for name, port in paths}
            print()
            print("| closed loop, 64 connections, plain | req/s |")
            print("|---|---|")
            print(f"| direct to the simulated server | {direct:,.0f} |")
            print(
                f"| through the aiohttp pass-through (one process, one CPU) | {through['aiohttp pass-through']:,.0f} |"
            )
            print(f"| through thinkcap (one process, one CPU) | {through['thinkcap']:,.0f} |")
        finally:
            for proc in (bare, prox, sim):
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()
