"""Batching benchmark: the batching engine's queue model against the step-level simulator.

Run: .venv/bin/python bench/batching.py [--requests N] [--quick]

For every slots c in {1, 4, 16, 64}, load rho in {0.3, 0.6, 0.85} and token-count
distribution (geometric, C^2 about 1; lognormal with C^2 0.5, 2 and 4), Poisson arrivals
are served by ``sim.engine.run_engine`` (step time a + b j with a = 15 ms, b = 6.5 ms, the
shape measured on llama-server; mean 200 decode steps a request) and the simulated mean
system time, with its 95 % batch-means interval (20 batches after a 10 % warm-up), is
compared with the chain's prediction (``controller.queue.BatchingEngine``). A last block
adds a prefill (20 % of a request's time alone) that pauses the engine, given to the model
as its ``prefill_s`` (rho is then the load with the prefills' pauses, lambda (P + kappa
(m1 - P))); the prediction that reads the prefill as work shared with the batch
(``prefill_s = 0``) is printed beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinkcap.controller.queue import BatchingEngine
from thinkcap.sim.engine import batch_means, run_engine

STEP_BASE_S = 0.015
STEP_PER_SEQ_S = 0.0065
MEAN_STEPS = 200.0
GOAL = 0.10


def tokens(rng: np.random.Generator, dist: str, n: int) -> np.ndarray:
    """Decode steps per request: geometric, or lognormal with the named C^2 (``lognormal:C2``)."""
    if dist == "geometric":
        return rng.geometric(1.0 / MEAN_STEPS, n)
    c2 = float(dist.split(":")[1])
    s2 = np.log1p(c2)
    draw = rng.lognormal(np.log(MEAN_STEPS) - s2 / 2, np.sqrt(s2), n)
    return np.maximum(1, np.rint(draw)).astype(np.int64)


def row(slots: int, rho: float, dist: str, n: int, *, prefill_share: float, seed: int) -> tuple[float, ...]:
    rng = np.random.default_rng(seed)
    shared = BatchingEngine(slots, STEP_BASE_S, STEP_PER_SEQ_S)
    steps = tokens(rng, dist, n)
    tau1 = shared.step_time(1.0)
    prefill = prefill_share / (1 - prefill_share) * steps.mean() * tau1 * np.ones(n) if prefill_share else None
    work = steps * tau1 + (0.0 if prefill is None else prefill)
    m1, m2 = float(work.mean()), float((work**2).mean())
    q = BatchingEngine(slots, STEP_BASE_S, STEP_PER_SEQ_S, prefill_s=0.0 if prefill is None else float(prefill[0]))
    lam = rho / (m1 * q.load_factor() + q.load_offset(1.0))
    arrival = np.cumsum(rng.exponential(1.0 / lam, n))
    started = time.perf_counter()
    run = run_engine(arrival, steps, prefill, slots=slots, step_base_s=STEP_BASE_S, step_per_seq_s=STEP_PER_SEQ_S)
    elapsed = time.perf_counter() - started
    mean, half = batch_means(run.system)
    predicted = q.terms(lam, m1).system_time(m2)
    read_shared = shared.terms(lam, m1).system_time(m2) if m1 * lam * shared.load_factor() < 1 else float("inf")
    return m2 / m1**2 - 1, mean, half, predicted, run.occupancy, q.occupancy(lam, m1), elapsed, read_shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200_000, help="requests per simulated run")
    ap.add_argument("--quick", action="store_true", help="20,000 requests a run and fewer rows")
    args = ap.parse_args()
    n = 20_000 if args.quick else args.requests
    dists = ["geometric", "lognormal:0.5", "lognormal:2", "lognormal:4"]
    print(f"{n:,} requests a run; step {STEP_BASE_S * 1e3:g} + {STEP_PER_SEQ_S * 1e3:g} ms x j; mean "
          f"{MEAN_STEPS:g} steps")  # fmt: skip
    print()
    print("| slots | rho | tokens | C^2 | simulated E[T] (95 %) | predicted | predicted / simulated | within 10 % |"
          " occupancy sim / model | run |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratios: list[float] = []
    paused: list[float] = []
    shared_ratios: list[float] = []
    blocks = [(c, r, d, 0.0) for c in (1, 4, 16, 64) for d in dists for r in (0.3, 0.6, 0.85)]
    blocks += [(c, r, "geometric", 0.2) for c in (4, 16) for r in (0.3, 0.6, 0.85)]
    if args.quick:
        blocks = [b for b in blocks if b[0] in (1, 16) and b[2] in ("geometric", "lognormal:4")]
    for k, (slots, rho, dist, pre) in enumerate(blocks):
        c2, mean, half, pred, occ_sim, occ_model, elapsed, read_shared = row(
            slots, rho, dist, n, prefill_share=pre, seed=k
        )
        ratio = pred / mean
        within = abs(pred - mean) <= GOAL * mean + half
        (ratios if pre == 0.0 else paused).append(ratio)
        if pre:
            shared_ratios.append(read_shared / mean)
        label = dist + (f" + prefill {pre:.0%} (read as shared: {read_shared / mean:.3f})" if pre else "")
        print(f"| {slots} | {rho} | {label} | {c2:.2f} | {mean:.3f} ± {half:.3f} s | {pred:.3f} s | {ratio:.3f} | "
              f"{'yes' if within else '**no**'} | {occ_sim:.2f} / {occ_model:.2f} | {elapsed:.1f} s |")  # fmt: skip
        sys.stdout.flush()
    print()
    print(f"without prefill: predicted / simulated from {min(ratios):.3f} to {max(ratios):.3f} over {len(ratios)} rows")
    if paused:
        print(f"with a pausing prefill: {min(paused):.3f} to {max(paused):.3f} over {len(paused)} rows "
              f"(read as shared work: {min(shared_ratios):.3f} to {max(shared_ratios):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
