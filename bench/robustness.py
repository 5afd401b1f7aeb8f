"""Robustness of the control loop: decision time by pool size, the event loop's worst stall
while the loop decides, and the admit fraction after a spike.

Run: .venv/bin/python bench/robustness.py [--decisions N]

- *Decision time*: ``ControlLoop.step`` (estimates -> problem -> solve -> caps -> event) on a
  proxy configured with R replicas of c slots each (the pooled queue model), fed Poisson
  arrivals at 60 % of the capacity at the minimum caps; median and maximum over N decisions
  (perf_counter). Goal: <= 20 ms at 8 x 256 slots.
- *Event-loop stall*: the control loop's task (``ControlLoop.run``, interval 0.05 s, accuracy
  curves refitted in a worker thread after each batch of graded feedback) on the event loop
  beside a ticker that sleeps 1 ms and records how late it wakes; the worst lateness over the
  run, at 8 x 256 slots. Goal: <= 50 ms.
- *Spike then settle*: one slot, 0.1 s per request at the minimum caps (capacity 10/s); a
  spike at 100/s for 20 s with requests waiting in the admission queue, then 9/s (90 % of the
  capacity); a decision every 2 s on a fake clock. Reported: seconds after the spike until the
  admit fraction is >= 0.95, and until shedding ends. Goal: admit fraction >= 0.95 within 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.proxy.conftest import write_config
from tests.proxy.test_control import feed
from thinkcap.proxy.control import ControlLoop
from thinkcap.proxy.settings import ControllerSettings, load_settings
from thinkcap.proxy.state import ProxyState, build_state

STEP = "step = { base_s = 0.007, per_seq_s = 0.008 }"


def pool_state(tmp: Path, replicas: int, slots: int) -> ProxyState:
    urls = ", ".join(f'"http://127.0.0.1:{9000 + i}/v1"' for i in range(replicas))
    path = write_config(tmp, "http://127.0.0.1:9000/v1", backend=f"slots = {slots}\n{STEP}")
    text = path.read_text().replace("overhead_s = 0.1, per_token_s = 0.001", "prefill_s = 0.05")
    if replicas > 1:
        text = text.replace('url = "http://127.0.0.1:9000/v1"', f"url = [{urls}]")
    path.write_text(text)
    return build_state(load_settings(path))


def capacity(state: ProxyState) -> float:
    q = state.settings.model.queue
    return 1.0 / (0.05 * q.load_factor())


def decision_times(replicas: int, slots: int, n: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        state = pool_state(Path(tmp), replicas, slots)
        ctl = ControlLoop(state, ControllerSettings())
        rate = 0.6 * capacity(state)
        t = feed(state, rate, 0.0, 5.0)
        times = []
        for k in range(n):
            t = feed(state, rate, t, 0.2, seed=k + 1)
            started = time.perf_counter()
            assert ctl.step(t) is not None
            times.append(time.perf_counter() - started)
        return statistics.median(times), max(times)


async def worst_stall(seconds: float) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        state = pool_state(Path(tmp), 8, 256)
        ctl = ControlLoop(state, ControllerSettings(interval_s=0.05, min_resolve_interval_s=0.0))
        loop = asyncio.get_running_loop()
        rng = np.random.default_rng(2)
        worst = 0.0
        task = asyncio.create_task(ctl.run())
        end = loop.time() + seconds
        k = 0
        while loop.time() < end:
            now = state.clock()
            state.arrived("hard" if rng.random() < 0.5 else "easy", now)
            if k % 50 == 0:  # a batch of graded answers: the curves need a refit
                for _ in range(20):
                    state.accuracy["hard"].update(float(rng.integers(1, 4000)), bool(rng.random() < 0.7), now=now)
            k += 1
            due = loop.time() + 0.001
            await asyncio.sleep(0.001)
            worst = max(worst, loop.time() - due)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return worst, ctl.decisions


async def spike_then_settle() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        state = build_state(load_settings(write_config(Path(tmp), "http://127.0.0.1:9/v1")))
        ctl = ControlLoop(state, ControllerSettings())
        t = feed(state, 4.0, 0.0, 120.0)
        ctl.step(t)
        await state.admission.enter()
        waiting = [asyncio.create_task(state.admission.enter()) for _ in range(8)]
        await asyncio.sleep(0)
        for k in range(10):
            t = feed(state, 100.0, t, 2.0, seed=10 + k)
            ctl.step(t)
        for w in waiting:
            w.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        state.admission.leave()
        assert state.shedding
        settle = t
        back = ended = float("nan")
        k = 100
        while t < settle + 600:
            k += 1
            t = feed(state, 9.0, t, 2.0, seed=k)
            ctl.step(t)
            if math.isnan(back) and state.admit_fraction >= 0.95:
                back = t - settle
            if not state.shedding:
                ended = t - settle
                break
        return back, ended


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decisions", type=int, default=50)
    ap.add_argument("--stall-s", type=float, default=10.0)
    args = ap.parse_args()
    print("decision time (ControlLoop.step), Poisson at 60 % of the capacity")
    print(f"{'pool':>10} {'median ms':>10} {'max ms':>8}")
    for replicas, slots in ((1, 4), (4, 256), (8, 128), (8, 256)):
        med, top = decision_times(replicas, slots, args.decisions)
        print(f"{replicas:>4} x {slots:<4} {1e3 * med:>10.2f} {1e3 * top:>8.2f}")
    worst, decisions = asyncio.run(worst_stall(args.stall_s))
    print(f"\nevent loop, 8 x 256 slots, decisions every 50 ms for {args.stall_s:g} s ({decisions} decisions, "
          f"curves refitted in a worker thread): worst stall {1e3 * worst:.1f} ms")  # fmt: skip
    back, ended = asyncio.run(spike_then_settle())
    print(f"\nspike (100/s, 20 s) then 9/s on a 10/s server: admit fraction >= 0.95 after {back:.0f} s, "
          f"shedding ended after {ended:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
