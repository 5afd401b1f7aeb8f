"""Calibrated against hand-written: the objective thinkcap reaches with each config, measured.

Run: .venv/bin/python bench/calibrate.py --calibrated calibrated.toml [--runs 3] [--rate 0.5]

``calibrated.toml`` is what ``thinkcap calibrate`` wrote for the shipped set
(``examples/calibration.jsonl``) against llama.cpp's ``llama-server`` (SmolLM2-135M, 4 slots,
one thread; started here unless ``--backend`` names one). Each run starts ``thinkcap serve``
with one config (the calibrated one or ``examples/calibration-hand.toml``, alternately, the
controller on) and sends it Poisson arrivals of the set's items (the same seeded sequence
for both configs in a run), whole answers; every answer is graded as ``thinkcap calibrate``
grades it. The objective is the one thinkcap maximises: the share graded correct minus the
latency penalty times the mean system time.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinkcap.cli.calibration.dataset import Item, grade, read_dataset
from thinkcap.sim.llamacpp import free_port, start_llama_server, wait_for

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "examples" / "calibration.jsonl"
HAND = ROOT / "examples" / "calibration-hand.toml"
WARM_S = 10.0  # the first seconds of a run are not counted (the estimators settle)


async def load(url: str, items: list[Item], rate: float, seconds: float, seed: int) -> list[dict[str, Any]]:
    """Poisson arrivals of random items for ``seconds``; returns one record per request."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, int(rate * seconds * 3) + 10)
    starts = np.cumsum(gaps)
    starts = starts[starts < seconds]
    picks = rng.integers(0, len(items), starts.size)
    out: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    async def one(session: aiohttp.ClientSession, at: float, item: Item) -> None:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        sent = time.perf_counter()
        body = {"model": "smollm2", "messages": list(item.messages), "temperature": 0.0}
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                data = await r.json()
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            out.append({"at": at, "status": None, "error": str(exc)})
            return
        text = (data.get("choices") or [{}])[0].get("message", {}).get("content") or "" if status == 200 else ""
        out.append({"at": at, "status": status, "type": item.type, "seconds": time.perf_counter() - sent,
                    "correct": status == 200 and grade(item, text)})  # fmt: skip

    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(one(session, float(a), items[int(k)]) for a, k in zip(starts, picks, strict=True)))
    return out


def serve(config: Path, backend: str, tmp: Path, name: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log = tmp / f"{name}.jsonl"
    with log.open("w") as fh:
        cmd = [sys.executable, "-m", "thinkcap.cli", "serve", "--config", str(config), "--backend", backend,
               "--listen", f"127.0.0.1:{port}"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    wait_for(f"http://127.0.0.1:{port}/healthz", proc, 30.0, log)
    return proc, f"http://127.0.0.1:{port}", log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibrated", required=True, help="the TOML thinkcap calibrate wrote")
    ap.add_argument("--hand", default=str(HAND), help="the hand-written config to compare with")
    ap.add_argument("--backend", help="a running llama-server (default: start one)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.5, help="requests per second")
    ap.add_argument("--seconds", type=float, default=90.0, help="length of each run")
    args = ap.parse_args()
    configs = {"calibrated": Path(args.calibrated), "hand-written": Path(args.hand)}
    penalties = {k: tomllib.loads(p.read_text())["objective"]["latency_penalty"] for k, p in configs.items()}
    if len(set(penalties.values())) != 1:
        raise SystemExit(f"the configs' latency penalties differ: {penalties}")
    gamma = next(iter(penalties.values()))
    items, bad = read_dataset(DATASET)
    assert not bad
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server = None
        backend = args.backend
        if backend is None:
            server = start_llama_server(tmp, slots=4, threads=1)
            backend = server.url
        print(f"backend {backend}; {args.runs} runs a config, {args.seconds:g} s each at {args.rate:g}/s "
              f"(the first {WARM_S:g} s not counted); latency penalty {gamma:g}/s")  # fmt: skip
        print()
        print("| run | config | requests | correct | mean system time | objective | count correct | add correct |")
        print("|---|---|---|---|---|---|---|---|")
        scores: dict[str, list[float]] = {k: [] for k in configs}
        try:
            for run in range(args.runs):
                order = list(configs) if run % 2 == 0 else list(configs)[::-1]
                for name in order:
                    proc, url, _ = serve(configs[name], backend, tmp, f"{name}-{run}")
                    try:
                        records = asyncio.run(load(url, items, args.rate, args.seconds, seed=run))
                    finally:
                        proc.terminate()
                        proc.wait(timeout=30)
                    rs = [r for r in records if r["at"] >= WARM_S]
                    ok = [r for r in rs if r["status"] == 200]
                    acc = sum(r["correct"] for r in rs) / len(rs)
                    mean_t = float(np.mean([r["seconds"] for r in ok])) if ok else float("nan")
                    objective = acc - gamma * mean_t
                    scores[name].append(objective)
                    by = {t: [r["correct"] for r in rs if r.get("type") == t] for t in ("count", "add")}
                    share = {t: f"{sum(v) / len(v):.2f} ({len(v)})" if v else "-" for t, v in by.items()}
                    failed = len(rs) - len(ok)
                    print(f"| {run + 1} | {name} | {len(rs)} ({failed} failed) | {acc:.3f} | {mean_t:.2f} s | "
                          f"{objective:.3f} | {share['count']} | {share['add']} |", flush=True)  # fmt: skip
        finally:
            if server is not None:
                server.stop()
    print()
    for name, s in scores.items():
        print(f"{name}: objective {np.mean(s):.3f} on average over {len(s)} runs ({', '.join(f'{v:.3f}' for v in s)})")
    wins = sum(a >= b for a, b in zip(scores["calibrated"], scores["hand-written"], strict=True))
    print(f"calibrated >= hand-written in {wins} of {len(scores['calibrated'])} runs")


if __name__ == "__main__":
    main()
