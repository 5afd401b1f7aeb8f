"""Pool benchmark: a pool of batching replicas read as one engine, against the step-level
simulation of the pool.

Run: .venv/bin/python bench/pool.py [--requests N] [--quick]

Poisson arrivals are served by ``sim.engine.run_pool``: replicas with their own slots and step
time a + b j (a = 15 ms, b = 6.5 ms), stepping independently, behind one FIFO queue and the
proxy's least-loaded router. The simulated mean system time (95 % batch-means interval, 20
batches after a 10 % warm-up) is compared with the pooled chain
(``controller.queue.BatchingEngine`` with ``pool``: the n in service spread as the router
spreads them) and with the naive reading, one engine with the summed slots and the replicas'
step (``tau(n) = a + b n`` over all n in service), which over-states the slowdown. A last
block adds a prefill of 20 % of a request's time alone that pauses its replica, given to the
model as its ``prefill_s``; its last column is then the pooled model that reads the prefill
as work shared with the batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.batching import GOAL, MEAN_STEPS, STEP_BASE_S, STEP_PER_SEQ_S, tokens  # the same workload
from thinkcap.controller.queue import BatchingEngine
from thinkcap.sim.engine import batch_means, run_pool

POOLS = [(4, 4), (4, 4, 4), (4, 4, 4, 4), (1, 1), (1, 1, 1, 1), (2, 4), (16, 16)]
#: The pools run with a pausing prefill, geometric tokens.
PREFILL_POOLS = [(4, 4), (4, 4, 4, 4), (8, 8)]
#: The prefill's share of a request's time alone in that block (as in bench/batching.py).
PREFILL_SHARE = 0.2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200_000, help="requests per simulated run")
    ap.add_argument("--quick", action="store_true", help="20,000 requests a run")
    args = ap.parse_args()
    n = 20_000 if args.quick else args.requests
    print(f"{n:,} requests a run; step {STEP_BASE_S * 1e3:g} + {STEP_PER_SEQ_S * 1e3:g} ms x j on each replica; "
          f"mean {MEAN_STEPS:g} steps")  # fmt: skip
    print()
    print("| replicas (slots) | rho | tokens | simulated E[T] (95 %) | pooled model | pooled / simulated |"
          " within 10 % | one engine, summed slots / simulated | run |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    ratios, naive_ratios, paused = [], [], []
    loads = (0.3, 0.6, 0.85)
    blocks = [(pool, dist, rho, 0.0) for pool in POOLS for dist in ("geometric", "lognormal:4") for rho in loads]
    blocks += [(pool, "geometric", rho, PREFILL_SHARE) for pool in PREFILL_POOLS for rho in loads]
    for k, (pool, dist, rho, share) in enumerate(blocks):
        rng = np.random.default_rng(k)
        steps = tokens(rng, dist, n)
        tau1 = STEP_BASE_S + STEP_PER_SEQ_S
        prefill = share / (1 - share) * float(steps.mean()) * tau1
        q = BatchingEngine(sum(pool), STEP_BASE_S, STEP_PER_SEQ_S, pool, prefill_s=prefill)
        # Without a prefill: one engine with the summed slots; with one: the pooled model reading it as shared work.
        other = BatchingEngine(sum(pool), STEP_BASE_S, STEP_PER_SEQ_S, pool if share else ())
        work = steps * tau1 + prefill
        m1, m2 = float(work.mean()), float((work**2).mean())
        lam = rho / (m1 * q.load_factor() + q.load_offset(1.0))
        arrival = np.cumsum(rng.exponential(1.0 / lam, n))
        started = time.perf_counter()
        run = run_pool(arrival, steps, pool=pool, step_base_s=STEP_BASE_S, step_per_seq_s=STEP_PER_SEQ_S,
                       prefill_s=np.full(n, prefill) if share else None)  # fmt: skip
        elapsed = time.perf_counter() - started
        mean, half = batch_means(run.system)
        pred = q.terms(lam, m1).system_time(m2)
        ratio = pred / mean
        (paused if share else ratios).append(ratio)
        if lam * m1 * other.load_factor() < 1:
            other_ratio = other.terms(lam, m1).system_time(m2) / mean
            other_text = f"{other_ratio:.3f}"
            if not share:
                naive_ratios.append(other_ratio)
        else:
            other_text = "unstable"
        within = abs(pred - mean) <= GOAL * mean + half
        label = dist + (f" + prefill {share:.0%}" if share else "")
        print(f"| {len(pool)} ({', '.join(map(str, pool))}) | {rho} | {label} | {mean:.3f} ± {half:.3f} s | "
              f"{pred:.3f} s | {ratio:.3f} | {'yes' if within else '**no**'} | {other_text} | "
              f"{elapsed:.1f} s |")  # fmt: skip
        sys.stdout.flush()
    print()
    print(f"pooled model: predicted / simulated from {min(ratios):.3f} to {max(ratios):.3f} over {len(ratios)} rows; "
          f"one engine with the summed slots: {min(naive_ratios):.3f} to {max(naive_ratios):.3f} where stable "
          f"({len(ratios) - len(naive_ratios)} rows unstable)")  # fmt: skip
    print(f"with a pausing prefill: pooled model / simulated from {min(paused):.3f} to {max(paused):.3f} "
          f"over {len(paused)} rows")  # fmt: skip


if __name__ == "__main__":
    main()
