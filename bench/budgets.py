"""Caps that bind on a real engine that thinks: the native budget against budget forcing.

Run: .venv/bin/python bench/budgets.py [--caps 16,32,64,128,256] [--prompts 12]

llama-server (SmolLM2-135M under ``sim/smollm2_thinking.jinja``, reasoning parsed into
``reasoning_content``, one slot, one thread) and, in this process, ``thinkcap serve`` twice in
front of it: ``budget = "native"`` (the cap goes out as ``thinking_budget_tokens`` and the
server ends the reasoning) and ``budget = "forced"`` (no budget field: thinkcap cuts the
streamed reasoning at the cap and sends the continuation). For each cap, the same prompts
(``examples/calibration.jsonl``, greedy, ``max_tokens`` = cap + 64, streamed) go one at a
time through native and forced in turn, each prompt once per mode. Per cap and mode: the
reasoning tokens the client got (the server's ``/tokenize`` of ``reasoning_content``: mean,
max), the system time the client saw (mean, p99), the share of answers forced, and the error
of thinkcap's count (one streamed delta = one token) against the server's tokenizer.

Goals: max reasoning <= cap + 2 in both modes; forced mean system time <= 1.3x native's at
the same cap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import structlog
from structlog.testing import capture_logs

from thinkcap.proxy.app import create_app
from thinkcap.proxy.serve_file import load_settings
from thinkcap.proxy.state import build_state
from thinkcap.sim.llamacpp import Server, start_llama_server
from thinkcap.sim.sse import StreamedAnswer

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"over_cap_tokens": 2, "forced_over_native": 1.3}

CONFIG = """
[objective]
latency_penalty = 0.01

[workload]
arrival_rate = 0.2

[backend]
url = "{url}"
dialect = "llama-server"
slots = 1
probe = false
budget = "{budget}"

[proxy]
default_type = "bench"

[controller]
enabled = false

[[types]]
name = "bench"
prior = 1.0
max_tokens = 1024
accuracy = {{ base = 0.2, gain = 0.6, rate = 0.02 }}
service = {{ overhead_s = 0.05, per_token_s = 0.012 }}
"""


async def one(session: aiohttp.ClientSession, url: str, prompt: str, cap: int) -> tuple[str, float]:
    """One streamed request: its reasoning as the client got it, and its system time."""
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0.0, "max_tokens": cap + 64,
            "stream": True}  # fmt: skip
    answer = StreamedAnswer()
    t0 = time.perf_counter()
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            answer.feed(line)
    return answer.reasoning, time.perf_counter() - t0


async def run(server: Server, caps: list[int], prompts: list[str], tmp: Path) -> list[dict[str, Any]]:
    fronts, urls, states = [], {}, {}
    for budget in ("native", "forced"):
        path = tmp / f"{budget}.toml"
        path.write_text(CONFIG.format(url=server.url, budget=budget))
        state = build_state(load_settings(path))
        state.log_requests = True
        front = create_app(state)
        await front.start("127.0.0.1", 0)
        fronts.append(front)
        urls[budget], states[budget] = str(front.make_url("/v1/chat/completions")), state
    rows = []
    try:
        async with aiohttp.ClientSession() as session:
            for cap in caps:
                for budget in urls:
                    states[budget].caps.pin({"bench": cap})
                keys = ("spent", "time", "forced", "err", "out")
                cell: dict[str, dict[str, list[Any]]] = {b: {k: [] for k in keys} for b in urls}
                for prompt in prompts:
                    for budget, url in urls.items():  # native and forced in turn, the same prompt
                        with capture_logs() as logs:
                            reasoning, seconds = await one(session, url, prompt, cap)
                            await asyncio.sleep(0.01)  # the request event is logged just after the answer
                        (event,) = [e for e in logs if e["event"] == "request"]
                        spent = server.tokenize(reasoning) if reasoning else 0
                        c = cell[budget]
                        c["spent"].append(spent)
                        c["time"].append(seconds)
                        c["forced"].append(bool((event.get("forcing") or {}).get("forced")))
                        c["out"].append(event.get("completion_tokens") or 0)
                        if event.get("reasoning_tokens") is not None:
                            c["err"].append(event["reasoning_tokens"] - spent)
                for budget, c in cell.items():
                    t = np.array(c["time"])
                    rows.append({
                        "cap": cap, "budget": budget, "n": len(t),
                        "spent_mean": float(np.mean(c["spent"])), "spent_max": int(np.max(c["spent"])),
                        "time_mean_s": float(t.mean()), "time_p99_s": float(np.percentile(t, 99)),
                        "forced_share": float(np.mean(c["forced"])), "completion_mean": float(np.mean(c["out"])),
                        "count_error_max": int(np.max(np.abs(c["err"]))) if c["err"] else None,
                    })  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        for front in fronts:
            await front.close()
    return rows


def report(rows: list[dict[str, Any]]) -> list[str]:
    """The tables and the verdicts, as Markdown lines."""
    out = ["| cap | budget | reasoning mean / max | over cap | completion tokens, mean | system time mean / p99 (s) "
           "| forced | count error, max |", "|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        out.append(f"| {r['cap']} | {r['budget']} | {r['spent_mean']:.1f} / {r['spent_max']} | "
                   f"{r['spent_max'] - r['cap']:+d} | {r['completion_mean']:.1f} | {r['time_mean_s']:.2f} / "
                   f"{r['time_p99_s']:.2f} | {r['forced_share']:.0%} | {r['count_error_max']} |")  # fmt: skip
    out += ["", "| cap | forced / native, mean system time | forced - native, p99 (s) |", "|---:|---:|---:|"]
    by = {(r["cap"], r["budget"]): r for r in rows}
    worst_ratio, worst_over = 0.0, -(10**9)
    for cap in sorted({r["cap"] for r in rows}):
        n, f = by[(cap, "native")], by[(cap, "forced")]
        ratio = f["time_mean_s"] / n["time_mean_s"]
        worst_ratio = max(worst_ratio, ratio)
        worst_over = max(worst_over, n["spent_max"] - cap, f["spent_max"] - cap)
        out.append(f"| {cap} | {ratio:.2f} | {f['time_p99_s'] - n['time_p99_s']:+.2f} |")
    out += ["", f"max reasoning over the cap: {worst_over:+d} tokens (goal <= +{GOALS['over_cap_tokens']}): "
            f"{'met' if worst_over <= GOALS['over_cap_tokens'] else 'missed'}",
            f"forced / native mean system time, worst cap: {worst_ratio:.2f} (goal <= {GOALS['forced_over_native']}): "
            f"{'met' if worst_ratio <= GOALS['forced_over_native'] else 'missed'}"]  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caps", default="16,32,64,128,256", help="reasoning caps, comma-separated")
    ap.add_argument("--prompts", type=int, default=12, help="prompts per cap (from examples/calibration.jsonl)")
    ap.add_argument("--out", type=Path, help="append the tables to this Markdown file (docs/benchmarks/budgets.md)")
    args = ap.parse_args()
    caps = [int(c) for c in args.caps.split(",")]
    lines = (ROOT / "examples" / "calibration.jsonl").read_text().splitlines()
    rows_in = [json.loads(line) for line in lines]
    step = max(1, len(rows_in) // args.prompts)
    prompts = [r["prompt"] for r in rows_in[::step]][: args.prompts]
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(open("/dev/null", "w")))  # noqa: SIM115
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        server = start_llama_server(tmp, slots=1, threads=1, ctx_per_slot=2048, thinking=True)
        try:
            rows = asyncio.run(run(server, caps, prompts, tmp))
        finally:
            server.stop()
    lines = report(rows)
    print("\n" + "\n".join(lines))
    if args.out is not None:
        head = f"\n## {time.strftime('%Y-%m-%d')}: caps {args.caps}, {len(prompts)} prompts\n\n"
        with args.out.open("a") as f:
            f.write(head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
