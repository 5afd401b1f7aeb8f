"""``thinkcap calibrate``: measure a backend on a labelled dataset and write the config.

    thinkcap calibrate --backend URL --dialect D --dataset FILE.jsonl [--caps 16,32,64,...]
        [--repeats R] [--concurrency 1,2,4] --out calibrated.toml [--resume]

Every item runs at every cap (the dialect's cap field), ``--repeats`` times, streamed; its
answer (the content, not the reasoning) is graded. Each type's accuracy curve
p(l) = base + gain (1 - exp(-rate l)) is fitted by maximum likelihood on the graded outcomes
with bootstrap intervals over the items (``estimators.calibration``). The same run measures
the service model: per type, time alone = overhead + per-token time x tokens from the
requests run one at a time; with several ``--concurrency`` levels the jobs are shared out
between them and the engine's step tau(j) = a + b j is fitted on the token gaps against the
number of this run's requests in flight (only gaps while none of them was reading its
prompt, which pauses the others' decoding), with the mean gap at each number in flight from
one up as its measured levels (``levels_s``), and the types get a prefill (their mean time to the
first token alone) for the batching model. The TOML it writes is a whole ``thinkcap serve``
config; a plot of each type's points and curve goes next to it (with matplotlib).

Dataset lines: ``{"type", "prompt" or "messages", "answer", "grader"}``; ``grader`` is
``exact``, ``numeric``, ``regex`` or ``choice``, or an object ``{"kind": "numeric",
"tolerance": 0.5}``. A bad line is reported with its number and skipped. Results are
appended to ``OUT.partial.jsonl`` as they come; ``--resume`` keeps them and runs the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np

from thinkcap.cli.calibration.dataset import read_dataset
from thinkcap.cli.calibration.output import config_text, fit_all, plot
from thinkcap.cli.calibration.runner import Progress, Runner, job_key, load_partial, run_jobs
from thinkcap.proxy.dialects import DIALECTS

DEFAULT_CAPS = (16, 32, 64, 128)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def add_parser(sub: Any) -> None:
    """Register ``calibrate``."""
    sp = sub.add_parser("calibrate", help="measure a backend on a labelled dataset and write the config")
    sp.add_argument("--backend", required=True, help="the model server's base URL")
    sp.add_argument("--dialect", required=True, choices=DIALECTS, help="how the cap is written")
    sp.add_argument("--dataset", required=True, help="JSON-lines labelled questions")
    sp.add_argument("--caps", type=_ints, default=DEFAULT_CAPS, help="caps to run every item at (default 16,32,64,128)")
    sp.add_argument("--repeats", type=int, default=1, help="runs of every item at every cap (default 1)")
    sp.add_argument("--concurrency", type=_ints, default=(1,), help="requests at once, e.g. 1,2,4 (default 1)")
    sp.add_argument("--out", required=True, help="the TOML to write")
    sp.add_argument("--resume", action="store_true", help="keep OUT.partial.jsonl's results and run the rest")
    sp.add_argument("--model", help="model name sent with each request")
    sp.add_argument("--thinks", action=argparse.BooleanOptionalAction, default=True,
                    help="llama-server: the model reasons, the cap is thinking_budget_tokens (the default); "
                    "--no-thinks: it does not, the cap is max_tokens")  # fmt: skip
    sp.add_argument("--latency-penalty", type=float, default=0.02, help="[objective] latency_penalty written")
    sp.add_argument(
        "--arrival-rate", type=float, help="[workload] arrival_rate written (until the estimate takes over)"
    )
    sp.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per type (default 200)")
    sp.set_defaults(run=run)


def run(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Execute ``thinkcap calibrate``."""
    err = out or sys.stderr
    if args.repeats < 1:
        raise ValueError("--repeats: must be >= 1")
    try:
        items, bad = read_dataset(args.dataset)
    except OSError as exc:
        raise ValueError(f"{args.dataset}: cannot be read: {exc.strerror}") from None
    for line, why in bad:
        err.write(f"{args.dataset}:{line}: skipped: {why}\n")
    if not items:
        raise ValueError(f"{args.dataset}: no usable item")
    caps = sorted(set(args.caps))
    target = Path(args.out)
    partial = target.with_name(target.name + ".partial.jsonl")
    kept = load_partial(partial) if args.resume else []
    if not args.resume and partial.exists():
        partial.unlink()
    done = {r.key for r in kept}
    rng = np.random.default_rng(0)
    jobs = [(it, cap, r) for it in items for cap in caps for r in range(args.repeats)]
    jobs = [jobs[i] for i in rng.permutation(len(jobs))]
    todo = [j for j in jobs if job_key(*j) not in done]
    if kept:
        err.write(f"calibrate: {len(kept)} results kept from {partial}, {len(todo)} to run\n")
    runner = Runner(args.backend, args.dialect, args.model, args.thinks)
    progress = Progress(len(jobs), len(jobs) - len(todo), err)
    fresh = asyncio.run(run_jobs(runner, todo, args.concurrency, partial, progress)) if todo else []
    keys = {job_key(*j) for j in jobs}
    results = [r for r in kept if r.key in keys] + fresh
    failed = [r for r in results if r.error is not None]
    if len(failed) == len(results):
        raise ValueError(f"every request failed; the first: {failed[0].error}")
    cal = fit_all(items, results, args.concurrency, args.bootstrap)
    target.write_text(config_text(cal, items, args, caps), encoding="utf-8")
    picture = plot(cal, target.with_suffix(".png"))
    print(f"calibrate: {len(results)} requests ({len(failed)} failed), {len(cal.curves)} types")
    for t, c in cal.curves.items():
        pts = ", ".join(f"{cap}: {k}/{n}" for cap, n, k in cal.points[t])
        print(f"  {t}: accuracy {c.base:.3f} + {c.gain:.3f} (1 - exp(-{c.rate:.4g} l)); correct {pts}")
    if cal.step is not None:
        print(f"  step: tau(j) = {cal.step[0] * 1e3:.2f} + {cal.step[1] * 1e3:.2f} ms x j")
    elif len(set(args.concurrency)) > 1:
        err.write("calibrate: the step could not be fitted (too few token gaps with all requests decoding "
                  "at two or more levels): the config plans for one request at a time\n")  # fmt: skip
    print(f"config: {target}")
    print(f"plot:   {picture}" if picture else "plot:   not drawn (pip install 'thinkcap[report]' for matplotlib)")
    if not math.isfinite(sum(c.rate for c in cal.curves.values())):
        return 1
    return 0
