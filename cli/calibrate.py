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
prompt, which pauses the others' decoding), and the types get a prefill (their mean time to the
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
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import numpy as np

from thinkcap.cli.toml_out import dumps
from thinkcap.estimators.calibration import CurveFit, ServiceFit, fit_curve, fit_service, fit_step
from thinkcap.proxy.dialects import DIALECTS, apply_cap, reasoning_cap
from thinkcap.proxy.transport.client import base_url
from thinkcap.sim.sse import sse_data

GRADERS = ("exact", "numeric", "regex", "choice")
DEFAULT_CAPS = (16, 32, 64, 128)
#: Seconds a calibration request may take.
REQUEST_TIMEOUT_S = 300.0
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
CHOICE = re.compile(r"\b([A-J])\b")


@dataclass(frozen=True)
class Item:
    """One labelled question."""

    line: int
    type: str
    messages: tuple[dict[str, str], ...]
    answer: str
    grader: str
    tolerance: float = 1e-6


def parse_item(line: int, text: str) -> Item:
    """One dataset line (raises ``ValueError`` saying what is wrong)."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg}") from None
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    kind = row.get("type")
    if not isinstance(kind, str) or not kind.strip():
        raise ValueError('"type" must be a non-empty string')
    if "messages" in row:
        msgs = row["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )  # fmt: skip
        if not ok:
            raise ValueError('"messages" must be a non-empty list of {"role", "content"} strings')
        messages = tuple({"role": m["role"], "content": m["content"]} for m in msgs)
    elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
        messages = ({"role": "user", "content": row["prompt"]},)
    else:
        raise ValueError('give "prompt" (a string) or "messages"')
    answer = row.get("answer")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError('"answer" must be a non-empty string or a number')
    grader = row.get("grader", "exact")
    tolerance = 1e-6
    if isinstance(grader, dict):
        spec = grader
        grader = spec.get("kind")
        if "tolerance" in spec:
            tol = spec["tolerance"]
            if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol >= 0:
                raise ValueError('"grader.tolerance" must be a number >= 0')
            tolerance = float(tol)
    if grader not in GRADERS:
        raise ValueError(f'"grader" must be one of {list(GRADERS)}, got {grader!r}')
    if grader == "numeric" and _number(answer) is None:
        raise ValueError(f"a numeric grader needs a numeric answer, got {answer!r}")
    if grader == "regex":
        try:
            re.compile(answer)
        except re.error as exc:
            raise ValueError(f'"answer" is not a regular expression: {exc}') from None
    return Item(line, kind.strip(), messages, answer, str(grader), tolerance)


def read_dataset(path: str | Path) -> tuple[list[Item], list[tuple[int, str]]]:
    """The usable items and ``(line, why)`` for each bad line."""
    items, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, text in enumerate(fh, 1):
            if not text.strip():
                continue
            try:
                items.append(parse_item(number, text))
            except ValueError as exc:
                bad.append((number, str(exc)))
    return items, bad


def _number(text: str) -> float | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _normal(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" .!?;:\"'")


def grade(item: Item, response: str) -> bool:
    """Whether ``response`` answers ``item``: ``exact`` (the normalised answer is the response
    or its last line), ``numeric`` (the last number in it, within ``tolerance``), ``regex``
    (the answer, a regular expression, matches somewhere, case-insensitively) or ``choice``
    (the first option letter A-J in it is the answer's).

    >>> it = Item(1, "t", (), "42", "numeric", 0.5)
    >>> grade(it, "so the total is 42.3."), grade(it, "about 40")
    (True, False)
    """
    if item.grader == "numeric":
        got, want = _number(response), _number(item.answer)
        return got is not None and want is not None and abs(got - want) <= item.tolerance
    if item.grader == "regex":
        return re.search(item.answer, response, re.IGNORECASE | re.DOTALL) is not None
    if item.grader == "choice":
        m = CHOICE.search(response.upper())
        return m is not None and m.group(1) == item.answer.strip().upper()[:1]
    text = _normal(item.answer)
    lines = [ln for ln in response.splitlines() if ln.strip()]
    return _normal(response) == text or (bool(lines) and _normal(lines[-1]) == text)


@dataclass
class Result:
    """One request of the run."""

    key: str
    line: int
    type: str
    cap: int
    concurrency: int
    correct: bool
    tokens: int
    seconds: float
    first_token_s: float | None
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (mean in flight, mean gap) while all decode
    error: str | None = None

    def record(self) -> dict[str, Any]:
        return self.__dict__.copy()


def job_key(item: Item, cap: int, repeat: int) -> str:
    return f"{item.line}:{cap}:{repeat}"


class Runner:
    """Sends the jobs, counts this run's requests in flight, keeps the results."""

    def __init__(self, url: str, dialect: str, model: str | None, thinks: bool) -> None:
        self.url = base_url(url) + "/v1/chat/completions"
        self.dialect = dialect
        self.model = model
        self.thinks = thinks
        self.in_flight = 0
        self.prefilling = 0  # sent, no token yet: reading its prompt, which pauses the others' decoding

    async def run_one(self, session: aiohttp.ClientSession, item: Item, cap: int, repeat: int, level: int) -> Result:
        body: dict[str, Any] = {"messages": list(item.messages), "stream": True, "temperature": 0.0,
                                "stream_options": {"include_usage": True}}  # fmt: skip
        if self.model:
            body["model"] = self.model
        caps_reasoning = reasoning_cap(self.dialect, self.thinks)
        if caps_reasoning:
            body["max_tokens"] = cap + 256  # room for the answer after the capped reasoning
        apply_cap(body, cap, self.dialect, thinks=self.thinks)
        if repeat:
            body["seed"] = repeat
        clock = time.perf_counter
        start = clock()
        self.in_flight += 1
        self.prefilling += 1
        waiting = True
        content: list[str] = []
        stamps: list[float] = []
        flight: list[float] = []
        clean: list[bool] = []  # no request of the run was reading its prompt at this token
        usage_tokens: int | None = None
        error = None
        try:
            async with session.post(self.url, json=body) as resp:
                if resp.status != 200:
                    error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                else:
                    async for raw in resp.content:
                        try:
                            chunk = sse_data(raw)
                        except ValueError:
                            continue
                        if not isinstance(chunk, dict):
                            continue
                        if isinstance(chunk.get("usage"), dict):
                            usage_tokens = chunk["usage"].get("completion_tokens")
                        for choice in chunk.get("choices") or []:
                            delta = choice.get("delta") or {}
                            piece = delta.get("content")
                            if piece or delta.get("reasoning_content") or delta.get("reasoning"):
                                if waiting:
                                    waiting = False
                                    self.prefilling -= 1
                                stamps.append(clock())
                                flight.append(float(self.in_flight))
                                clean.append(self.prefilling == 0)
                            if piece:
                                content.append(piece)
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self.in_flight -= 1
            if waiting:
                self.prefilling -= 1
        end = clock()
        tokens = usage_tokens if isinstance(usage_tokens, int) else len(stamps)
        gaps = []
        # the step: token gaps while every request of the run in flight was decoding
        steady = [i for i in range(1, len(stamps)) if clean[i] and clean[i - 1]]
        if len(steady) >= 2:
            gaps.append((float(np.mean([flight[i] for i in steady])),
                         float(np.mean([stamps[i] - stamps[i - 1] for i in steady]))))  # fmt: skip
        return Result(
            key=job_key(item, cap, repeat), line=item.line, type=item.type, cap=cap, concurrency=level,
            correct=error is None and grade(item, "".join(content)), tokens=int(tokens), seconds=end - start,
            first_token_s=(stamps[0] - start) if stamps else None, gaps=gaps, error=error,
        )  # fmt: skip


class Progress:
    """Items done, elapsed and remaining, on one line of a terminal (else every tenth)."""

    def __init__(self, total: int, done: int, out: IO[str]) -> None:
        self.total, self.done, self.out = total, done, out
        self.started = time.monotonic()
        self.fresh = 0
        self.tty = out.isatty()
        self._last_tenth = -1

    def tick(self) -> None:
        self.done += 1
        self.fresh += 1
        elapsed = time.monotonic() - self.started
        left = elapsed / self.fresh * (self.total - self.done)
        text = f"calibrate: {self.done}/{self.total} done, {elapsed:.0f} s elapsed, about {left:.0f} s left"
        if self.tty:
            self.out.write("\r" + text + (" " * 8) + ("\n" if self.done == self.total else ""))
        elif (tenth := self.done * 10 // self.total) != self._last_tenth:
            self._last_tenth = tenth
            self.out.write(text + "\n")
        self.out.flush()


async def run_jobs(
    runner: Runner, jobs: list[tuple[Item, int, int]], levels: Sequence[int], partial: Path, progress: Progress
) -> list[Result]:
    """Share the jobs out between the concurrency levels (in order), run each share with that
    many at once, append every result to ``partial`` as it comes."""
    out: list[Result] = []
    shares = np.array_split(np.arange(len(jobs)), len(levels))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    # a new connection per request: llama-server drops idle keep-alive connections (see KEEP_ALIVE)
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        with partial.open("a", encoding="utf-8") as fh:
            for level, share in zip(levels, shares, strict=True):
                queue = [jobs[i] for i in share]

                async def worker(queue: list[tuple[Item, int, int]] = queue, level: int = level) -> None:
                    while queue:
                        item, cap, repeat = queue.pop(0)
                        res = await runner.run_one(session, item, cap, repeat, level)
                        out.append(res)
                        fh.write(json.dumps(res.record()) + "\n")
                        fh.flush()
                        progress.tick()

                await asyncio.gather(*(worker() for _ in range(level)))
    return out


def load_partial(partial: Path) -> list[Result]:
    """The results a previous run kept; the file is rewritten with those alone, so that a line
    torn by a crash is dropped, not glued to the next result."""
    out: list[Result] = []
    if not partial.exists():
        return out
    kept = []
    for text in partial.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(text)
            row["gaps"] = [tuple(g) for g in row.get("gaps", [])]
            out.append(Result(**row))
            kept.append(text)
        except (json.JSONDecodeError, TypeError):
            continue
    partial.write_text("".join(t + "\n" for t in kept), encoding="utf-8")
    return out


@dataclass
class Calibration:
    """What the run measured and fitted."""

    curves: dict[str, CurveFit]
    service: dict[str, ServiceFit]
    prefill: dict[str, float]
    step: tuple[float, float] | None
    priors: dict[str, float]
    points: dict[str, list[tuple[int, int, int]]]  # per type: (cap, n, correct)
    requests: int
    errors: int


def fit_all(items: list[Item], results: list[Result], levels: Sequence[int], boot: int) -> Calibration:
    by_type: dict[str, dict[int, list[tuple[float, bool]]]] = {}
    ok = [r for r in results if r.error is None]
    for r in ok:
        by_type.setdefault(r.type, {}).setdefault(r.line, []).append((float(r.cap), r.correct))
    curves = {t: fit_curve(list(per.values()), boot=boot) for t, per in by_type.items()}
    alone = [r for r in ok if r.concurrency == min(levels)]
    service, prefill = {}, {}
    for t in by_type:
        rs = [r for r in alone if r.type == t] or [r for r in ok if r.type == t]
        service[t] = fit_service([r.tokens for r in rs], [r.seconds for r in rs])
        firsts = [r.first_token_s for r in rs if r.first_token_s is not None]
        prefill[t] = float(np.mean(firsts)) if firsts else 0.0
    step = None
    if len(set(levels)) > 1:
        pairs = [g for r in ok for g in r.gaps]
        if len({round(j) for j, _ in pairs}) > 1:
            step = fit_step([j for j, _ in pairs], [g for _, g in pairs])
    counts: dict[str, int] = {}
    for it in items:
        counts[it.type] = counts.get(it.type, 0) + 1
    total = sum(counts.values())
    points: dict[str, list[tuple[int, int, int]]] = {}
    for t, per in by_type.items():
        tally: dict[int, list[int]] = {}
        for outcomes in per.values():
            for cap, good in outcomes:
                c = tally.setdefault(int(cap), [0, 0])
                c[0] += 1
                c[1] += int(good)
        points[t] = [(cap, n, k) for cap, (n, k) in sorted(tally.items())]
    return Calibration(curves, service, prefill, step, {t: c / total for t, c in counts.items()}, points,
                       len(results), len(results) - len(ok))  # fmt: skip


def config_text(cal: Calibration, items: list[Item], args: argparse.Namespace, caps: Sequence[int]) -> str:
    """A whole ``thinkcap serve`` config, with what was measured in its comments."""
    slots = max(args.concurrency)
    backend: dict[str, Any] = {"url": args.backend, "dialect": args.dialect}
    if args.dialect == "llama-server":
        backend["thinks"] = args.thinks
    if slots > 1 and cal.step is not None:
        backend["slots"] = slots
        backend["step"] = {"base_s": round(cal.step[0], 6), "per_seq_s": round(cal.step[1], 6)}
    batching = "step" in backend
    types = []
    names = sorted(cal.curves, key=lambda t: -cal.priors.get(t, 0))
    for t in names:
        c = cal.curves[t]
        gain = max(c.gain, 1e-6)
        entry: dict[str, Any] = {
            "name": t,
            "prior": round(cal.priors[t], 6),
            "min_tokens": min(caps),
            "max_tokens": max(caps),
            "examples": [it.messages[-1]["content"] for it in items if it.type == t][:5],
            "accuracy": {"base": round(min(c.base, 1 - gain), 6), "gain": round(gain, 6), "rate": round(c.rate, 8)},
        }
        s = cal.service[t]
        if batching:
            entry["service"] = {"prefill_s": round(cal.prefill[t], 6)}
        else:
            entry["service"] = {"overhead_s": round(s.overhead_s, 6), "per_token_s": round(s.per_token_s, 8),
                                "variance_s2": round(s.variance_s2, 8)}  # fmt: skip
        types.append(entry)
    doc: dict[str, Any] = {
        "objective": {"latency_penalty": args.latency_penalty},
        "backend": backend,
        "proxy": {"default_type": names[0]},
        "types": types,
    }
    if args.arrival_rate is not None:
        doc["workload"] = {"arrival_rate": args.arrival_rate}
    head = [
        f"# Written by thinkcap calibrate from {Path(args.dataset).name} against {args.backend}",
        f"# ({cal.requests} requests, {cal.errors} failed; caps {', '.join(map(str, caps))}; "
        f"{args.repeats} repeat(s); concurrency {', '.join(map(str, args.concurrency))}).",
    ]
    for t in names:
        c = cal.curves[t]
        iv = "; ".join(f"{k} {lo:.4g} to {hi:.4g}" for k, (lo, hi) in c.intervals.items())
        pts = ", ".join(f"{cap}: {k}/{n}" for cap, n, k in cal.points[t])
        head.append(f"# {t}: correct at each cap {pts}; {int(c.level * 100)} % bootstrap intervals: {iv}")
    if cal.step is not None:
        head.append(f"# step tau(j) = {cal.step[0] * 1e3:.2f} + {cal.step[1] * 1e3:.2f} ms x j from the token gaps")
    return "\n".join(head) + "\n\n" + dumps(doc)


def plot(cal: Calibration, path: Path) -> Path | None:
    """Each type's share correct at each cap (with 90 % binomial intervals), its fitted curve
    and the bootstrap's band around it."""
    try:
        import matplotlib  # noqa: PLC0415 - the report extra, imported only to draw

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(cap for pts in cal.points.values() for cap, _, _ in pts)
    xs = np.linspace(0, top * 1.05, 200)
    for t, pts in cal.points.items():
        caps = np.array([c for c, _, _ in pts], dtype=float)
        n = np.array([n for _, n, _ in pts], dtype=float)
        p = np.array([k for _, _, k in pts], dtype=float) / n
        err = 1.645 * np.sqrt(np.maximum(p * (1 - p), 1e-9) / n)
        line = ax.errorbar(caps, p, yerr=err, fmt="o", capsize=3, label=f"{t} (graded)")
        c = cal.curves[t]
        colour = line[0].get_color()
        ax.plot(xs, [c.accuracy(x) for x in xs], color=colour,
                label=f"{t}: {c.base:.2f} + {c.gain:.2f}(1 - e^(-{c.rate:.3g} l))")  # fmt: skip
        lo, hi = c.band(xs)
        ax.fill_between(xs, lo, hi, color=colour, alpha=0.15, lw=0,
                        label=f"{t}: {int(c.level * 100)} % bootstrap band")  # fmt: skip
    ax.set_xlabel("cap (tokens)")
    ax.set_ylabel("share correct")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


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
    sp.add_argument("--no-thinks", dest="thinks", action="store_false",
                    help="llama-server: the model does not reason (the cap is max_tokens)")  # fmt: skip
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
