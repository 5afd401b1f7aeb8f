"""Everything one running proxy holds: settings, classifier, caps, admission, estimators."""

from __future__ import annotations

import asyncio
import copy
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np
from aiohttp import web

from thinkcap.controller import decide
from thinkcap.controller.queue import BatchingEngine
from thinkcap.estimators import AccuracyCurve, AnswerLength, ArrivalRate, Estimators, StepEstimate, StepFit, UsedShare
from thinkcap.proxy.admission import Admission
from thinkcap.proxy.caps import CapStore, CapTable
from thinkcap.proxy.classify import Classifier
from thinkcap.proxy.logs import finite
from thinkcap.proxy.metrics import Metrics
from thinkcap.proxy.pool import Pool, Replica
from thinkcap.proxy.serve_file import Settings

if TYPE_CHECKING:  # the rooms above, named for the fields' types only
    from thinkcap.proxy.cluster import Cluster
    from thinkcap.proxy.control import ControlLoop

#: How many finished requests are remembered for graded feedback.
RECENT_REQUESTS = 10_000


@dataclass(frozen=True)
class Finished:
    """What feedback on a request needs to know."""

    type: str
    reasoning_tokens: int | None
    graded: bool = False  # feedback on it was taken (one request, one grade)


@dataclass
class ProxyState:
    """The mutable heart of a proxy; created by :func:`build_state`, shared by both listeners."""

    settings: Settings
    classifier: Classifier
    caps: CapStore
    admission: Admission
    estimators: Estimators
    accuracy: dict[str, AccuracyCurve]
    answer: AnswerLength  # tokens after the reasoning, per type
    used: UsedShare  # share of its limit an answer uses, per type
    metrics: Metrics
    pool: Pool  # the backend's replicas, each with its requests in service upstream
    step: StepFit | None = None  # one replica's step time, fitted live (batching engines only)
    clock: Callable[[], float] = time.monotonic  # every measurement; the wall clock only stamps log lines
    session: aiohttp.ClientSession | None = None
    shedding: bool = False
    admit_fraction: float = 1.0
    shed_changed_at: float | None = None  # when shedding last started or stopped
    draining: bool = False  # a stop was asked for: /readyz answers 503 while requests are still taken
    controller: ControlLoop | None = None  # with [controller] enabled
    cluster: Cluster | None = None  # with [cluster] redis_url
    listeners: list[Callable[[str], None]] = field(default_factory=list)  # see notify
    probe: dict[str, Any] = field(default_factory=lambda: {"status": "pending"})
    cap_rejected: bool = False  # the probe saw the backend reject the cap field: requests go without it
    budget: str = "native"  # the budget mode in use, native or forced (see BackendSettings.budget)
    budget_reason: str = "configured"
    can_force: bool = True  # False behind a gateway (extproc): one request per answer, none of thinkcap's own
    last_decision: dict[str, Any] | None = None
    recent: OrderedDict[str, Finished] = field(default_factory=OrderedDict)
    feedback: int = 0
    log_requests: bool = True
    arrivals: int = 0
    _last_arrival: float = -math.inf

    def remember(self, request_id: str, item: Finished) -> None:
        """Keep a finished request for feedback, forgetting the oldest beyond the bound."""
        self.recent[request_id] = item
        if len(self.recent) > RECENT_REQUESTS:
            self.recent.popitem(last=False)

    def arrived(self, name: str, now: float) -> None:
        """Count an arrival, feed the estimators, and wake the control loop on a rate change.

        Arrivals are stamped when their request starts and counted once its body is read, so
        a later stamp can be counted first: the estimators see the latest stamp so far.
        """
        self.arrivals += 1
        self._last_arrival = now = max(now, self._last_arrival)
        self.estimators.arrived(name, now=now)
        self.notify("arrival")

    def notify(self, what: str) -> None:
        """Tell the listeners (the control loop) what changed: ``"arrival"`` after each
        arrival, ``"pool"`` when a replica is ejected or taken back."""
        for listener in self.listeners:
            listener(what)

    def answer_offsets(self) -> dict[str, float]:
        """Answer tokens to add to the overhead: only where the cap bounds the reasoning alone."""
        return self.answer.get() if self.reasoning_cap else {}

    @property
    def reasoning_cap(self) -> bool:
        """Whether the cap bounds the reasoning alone: the dialect's field does, or thinkcap
        forces the budget itself."""
        return self.budget == "forced" or self.settings.backend.reasoning_cap

    def pool_changed(self, replica: Replica) -> None:
        """A replica was ejected or taken back: the admission limit follows the slots in use
        (``max_concurrency`` scaled by their share of all slots), and the control loop re-plans."""
        p = self.settings.proxy
        total = sum(r.slots for r in self.pool.replicas)
        used = sum(self.pool.healthy_slots())
        self.admission.resize(max(1, round(p.max_concurrency * used / total)))
        self.notify("pool")

    def http(self) -> aiohttp.ClientSession:
        """The upstream client session (open while the app runs)."""
        if self.session is None:
            raise RuntimeError("the upstream session is not open")
        return self.session


async def refit_curves(curves: dict[str, AccuracyCurve]) -> None:
    """Fit the accuracy curves that new feedback changed, in a worker thread (a fit is a few
    hundred likelihood evaluations: too long for the event loop). Each fit runs on a copy and
    is taken back only if no feedback arrived meanwhile; a fit that fails is left to the
    reader (the control loop then keeps that type's configured curve)."""
    for curve in [c for c in curves.values() if c.samples and not c.cached]:
        work = copy.deepcopy(curve)
        try:
            await asyncio.to_thread(work.evidence)
        except (ArithmeticError, ValueError, np.linalg.LinAlgError):
            continue
        curve.adopt(work)


def step_record(step: StepEstimate) -> dict[str, Any]:
    """The live step fit, JSON-able: used by the control loop (``fitted``) or not, and its evidence."""
    return {
        "source": "fitted" if step.fitted else "configured",
        "base_s": step.base_s,
        "per_seq_s": step.per_seq_s,
        "levels_s": list(step.levels),
        "prefill_base_s": step.prefill_base_s,
        "prefill_per_token_s": step.prefill_per_token_s,
        "first_token_base_s": step.first_token_base_s,
        "base_stderr_s": finite(step.base_stderr_s),
        "per_seq_stderr_s": finite(step.per_seq_stderr_s),
        "requests": step.requests,
        "gaps": step.gaps,
    }


def initial_caps(settings: Settings) -> CapTable:
    """The caps before the control loop speaks: the solve at ``[workload] arrival_rate``."""
    p = settings.model.problem()
    d = decide(p)
    return CapTable(
        d.caps(p.names), f"solve at arrival_rate {settings.model.arrival_rate:g} ({d.result.status.name.lower()})"
    )


def build_state(settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> ProxyState:
    """A fresh state for ``settings`` (nothing started yet)."""
    types = settings.model.types
    defaults = {t.task.name: (t.task.prior, t.task.overhead_s, t.task.per_token_s, t.task.variance_s2) for t in types}
    accuracy = {
        t.task.name: AccuracyCurve(
            t.task.accuracy_base,
            t.task.accuracy_gain,
            t.task.accuracy_rate,
            max_tokens=max(t.task.max_tokens, 1),
            prior_strength=settings.estimators.accuracy_prior_strength,
        )
        for t in types
    }
    e = settings.estimators
    names = [t.task.name for t in types]
    table = initial_caps(settings)
    metrics = Metrics(table.caps)
    metrics.set_caps(table.caps)
    admission = Admission(settings.proxy.max_concurrency, settings.proxy.max_queue)
    pool = Pool(settings.backend.replicas, settings.backend.eject_after)
    metrics.watch(admission, pool)
    queue = settings.model.queue
    step = None
    prefill = max(t.task.overhead_s for t in types)
    if isinstance(queue, BatchingEngine):
        step = StepFit(
            queue.step_base_s,
            queue.step_per_seq_s,
            prefill,
            forgetting=e.service_forgetting,
            min_samples=e.service_min_samples,
        )
    state = ProxyState(
        settings=settings,
        classifier=Classifier(types, settings.proxy.default_type),
        caps=CapStore(table),
        admission=admission,
        estimators=Estimators(
            defaults,
            arrival=ArrivalRate(
                half_life_s=e.arrival_half_life_s,
                fast_half_life_s=e.detector_window_s,
                reference_half_life_s=e.detector_reference_s,
            ),
            mix_half_life_s=e.mix_half_life_s,
            mix_concentration=e.mix_concentration,
            min_samples=e.service_min_samples,
            forgetting=e.service_forgetting,
        ),
        accuracy=accuracy,
        answer=AnswerLength(names),
        used=UsedShare(names),
        metrics=metrics,
        pool=pool,
        step=step,
        clock=clock,
    )
    if settings.backend.budget != "auto":
        state.budget = settings.backend.budget
    else:
        state.budget_reason = "auto: native until the start-up probe decides"
    pool.set_prefill_guess(prefill)
    if isinstance(queue, BatchingEngine):
        pool.set_step(queue.taus)
    state.pool.on_change.append(state.pool_changed)
    return state


STATE_KEY = web.AppKey("thinkcap_state", ProxyState)
