"""Simulator benchmarks: the discrete-event M/G/1 simulator and the simulated HTTP server.

Run: .venv/bin/python bench/sim.py [--only des|server] [--seconds S] [--connections C]

*des*: one million requests end to end (sampling the workload, then simulating one cap
policy on it) and a further policy on the same workload; median of 5.

*server*: the simulated server (``thinkcap mock-backend --time-scale 0``, so service takes
no time) in its own process pinned to CPU 0, and a minimal keep-alive HTTP/1.1 client pinned
to CPU 1 with C connections, each sending non-streaming chat completions back to back for S
seconds; three rounds, median. (The client is raw asyncio streams so that it is not the
bottleneck.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from thinkcap.sim.des import Phase, sample_workload, simulate  # noqa: E402
from thinkcap.sim.instances import random_problem  # noqa: E402

REQUESTS = 1_000_000
SCENARIO = ROOT / "examples" / "scenario.toml"


def bench_des() -> None:
    p = random_problem(1, 8, "heavy")
    caps = p.lo + 0.3 * (p.hi - p.lo)
    lam = 0.8 / p.moments(caps)[0]
    factors = (0.5, 1.0, 1.2, 0.5)
    phases = [Phase(REQUESTS / (lam * sum(factors)), lam * f) for f in factors]
    full, again = [], []
    for seed in range(5):
        start = time.perf_counter()
        work = sample_workload(phases, p.prior, np.random.default_rng(seed))
        simulate(p, caps, work)
        full.append(time.perf_counter() - start)
        start = time.perf_counter()
        simulate(p, caps * 0.5, work)
        again.append(time.perf_counter() - start)
    print("| operation | requests | median time | requests per second |")
    print("|---|---|---|---|")
    n = work.size
    for name, ts in (
        ("sample workload + simulate one policy", full),
        ("simulate another policy, same workload", again),
    ):
        med = statistics.median(ts)
        print(f"| {name} | {n:,} | {med:.3f} s | {n / med / 1e6:.1f} M/s |")


def _request(port: int) -> bytes:
    body = json.dumps({"model": "sim-reasoner", "messages": [{"role": "user", "content": "[sim:chat] hi"}],
                       "max_tokens": 16}).encode()  # fmt: skip
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _connection(port: int, deadline: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = _request(port)
    loop = asyncio.get_running_loop()
    try:
        while loop.time() < deadline:
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head[:40].decode())
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))  # fmt: skip
            await reader.readexactly(length)
            counts[0] += 1
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _round(port: int, seconds: float, connections: int) -> float:
    counts = [0]
    start = asyncio.get_running_loop().time()
    await asyncio.gather(*(_connection(port, start + seconds, counts) for _ in range(connections)))
    return counts[0] / (asyncio.get_running_loop().time() - start)


def bench_server(seconds: float, connections: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = cpus[0], cpus[-1]
    cmd = [sys.executable, "-m", "thinkcap.cli", "mock-backend", "--scenario", str(SCENARIO), "--port", str(port),
           "--time-scale", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    os.sched_setaffinity(proc.pid, {server_cpu})
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        os.sched_setaffinity(0, {client_cpu})
        rates = [asyncio.run(_round(port, seconds, connections)) for _ in range(3)]
    finally:
        proc.terminate()
        proc.wait()
    print("| simulated server (time scale 0), non-streaming | connections | rounds (req/s) | median req/s |")
    print("|---|---|---|---|")
    print(f"| server on CPU {server_cpu}, client on CPU {client_cpu} | {connections} | "
          f"{', '.join(f'{r:,.0f}' for r in rates)} | {statistics.median(rates):,.0f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("des", "server"))
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    if args.only in (None, "des"):
        bench_des()
    if args.only in (None, "server"):
        print()
        bench_server(args.seconds, args.connections)


if __name__ == "__main__":
    main()
