"""The control loop: estimators -> problem -> solve -> integer caps -> publish, every interval.

:meth:`ControlLoop.step` is one decision at a given time (tests drive it with a fake clock);
:meth:`ControlLoop.run` is the supervised background task that calls it every
``interval_s`` seconds, or at once when the arrival-rate change detector fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from thinkcap.controller import (
    Problem,
    Status,
    TaskType,
    admit_fraction,
    decide,
    load_at_min_caps,
    problem_record,
    should_publish,
)
from thinkcap.controller.queue import EXPONENTIAL_OVERLAP, BatchingEngine
from thinkcap.estimators import Snapshot, StepEstimate
from thinkcap.proxy.logs import finite, logger
from thinkcap.proxy.model_file import ModelConfig
from thinkcap.proxy.serve_file import ControllerSettings
from thinkcap.proxy.state import ProxyState, refit_curves, step_record

#: Standard errors of the arrival-rate estimate below its point value at which an overload
#: must still hold to count (a one-sided bound at about 98 %): a rate restarted from a short,
#: noisy segment after a detected change does not start shedding, nor does the long memory of
#: the estimate after a fall (the fast window's bound is taken too).
OVERLOAD_Z = 2.0
#: Each failed decision while shedding halves the share of arrivals shed.
FAILED_SHED_DECAY = 0.5
#: Shedding ends once it would shed less than this share of the arrivals.
MIN_SHED_SHARE = 0.05


def _rate_band(rate: float, stderr: float, z: float) -> tuple[float, float] | None:
    """The arrival rate ``z`` standard errors either side (``None`` where it is unknown or
    ``z`` is 0: the configured rate, a first estimate)."""
    if z <= 0.0 or not math.isfinite(stderr):
        return None
    return max(rate - z * stderr, 0.0), rate + z * stderr


def _lower_bound(snap: Snapshot) -> float:
    """The arrival rate's lower confidence bound: the lower of the estimate's and the fast
    window's, each ``OVERLOAD_Z`` standard errors below its value (0 where unknown)."""
    bounds = [snap.arrival_rate - OVERLOAD_Z * snap.arrival_rate_stderr]
    if math.isfinite(snap.recent_rate) and math.isfinite(snap.recent_rate_stderr):
        bounds.append(snap.recent_rate - OVERLOAD_Z * snap.recent_rate_stderr)
    low = min(bounds)
    return max(low, 0.0) if math.isfinite(low) else 0.0


def build_problem(
    model: ModelConfig,
    snap: Snapshot,
    answer_tokens: Mapping[str, float],
    arrival_rate: float,
    used_share: Mapping[str, float] | None = None,
    *,
    accuracy: Mapping[str, tuple[float, float, float]] | None = None,
    step: StepEstimate | None = None,
    prompt_tokens: Mapping[str, float] | None = None,
    replicas: tuple[int, ...] | None = None,
    pins: Mapping[str, int] | None = None,
    caps: Mapping[str, int] | None = None,
) -> Problem:
    """The allocation problem from the configured curves and weights and the estimates.

    ``pins`` are caps fixed by an operator (``/admin/caps``): a pinned type enters the problem
    with its cap as both bounds, so the other types' caps and the overload check see the load
    it really brings.

    ``accuracy`` replaces the configured (base, gain, rate) of the types it names (the
    curves fitted from graded feedback, see :meth:`ControlLoop.curves`).

    Priors and service parameters come from the snapshot (which holds the configured values
    until enough samples exist). In front of a batching engine (``[backend] slots > 1``) the
    per-type service fit is not used: it measures a request's time under the batch it shared,
    not its time alone on the engine that the queue model needs. There a fitted ``step``
    (``fitted`` true) replaces the configured step: the queue model's ``tau(j)`` (the
    measured levels, and the line ``a + b j`` above them), the per-token time ``tau(1)``,
    and each type's prefill ``o + p P`` at its mean evaluated
    prompt tokens ``P`` (``prompt_tokens``; a type not seen yet keeps its configured time).
    The fit's own wait before a first token (``first_token_base_s``: the hops, the step in
    progress) is left out: it holds no slot and no one up, and a constant delay moves no cap
    (read as service, it was stretched by the batch's slowdown, and the prediction came out
    40 % high in a 600-s steady run of ``bench/robustness.py --e2e``).
    The prefill holds up the batch: the queue model's ``prefill_s`` is the types' mean
    prefill (the fitted one where the step fit is in use, which reads it as the time the
    others wait too: see :class:`StepFit`; else the configured ``service.prefill_s``), and
    the model stretches the others' decode by it (:class:`BatchingEngine`). ``caps`` (those
    in force) give the decode work's squared coefficient of variation C^2 over the types,
    and the queue model's ``overlap`` is ``1 / (1 + C^2)`` (without them, 1/2).
    ``replicas`` are the slots of the backend replicas in use (one is ejected: the pool that is
    left; see :class:`BatchingEngine`'s ``pool``).
    The service time of the answer that follows the reasoning
    (``answer_tokens`` per type, for the reasoning-budget dialects) joins the overhead. When
    a type's answers stop before their cap (they use a share ``u < 1`` of it on average),
    a cap token costs ``u x per_token_s``.
    """
    used_share = used_share or {}
    accuracy = accuracy or {}
    pins = pins or {}
    prompt_tokens = prompt_tokens or {}
    queue = model.queue
    live = isinstance(queue, BatchingEngine) and step is not None and step.fitted
    if isinstance(queue, BatchingEngine):
        pool = (queue.pool or (queue.slots,)) if replicas is None else replicas
        if live and step is not None:
            a, b, levels = step.base_s, step.per_seq_s, step.levels
        else:
            a, b, levels = queue.step_base_s, queue.step_per_seq_s, queue.step_levels_s
    tasks = []
    prefill = []  # each type's prefill, which holds up the batch
    for cfg, fit in zip(model.types, snap.types, strict=True):
        est = fit
        pre = cfg.prefill_s
        if isinstance(model.queue, BatchingEngine):
            est = fit._replace(overhead_s=cfg.task.overhead_s, per_token_s=cfg.task.per_token_s,
                               variance_s2=cfg.task.variance_s2)  # fmt: skip
            if live:
                assert step is not None
                prompt = prompt_tokens.get(est.name)
                if prompt is not None:
                    pre = step.prefill_s(prompt)
                    est = est._replace(overhead_s=pre)
                est = est._replace(per_token_s=step.step_time(1))
        prefill.append(max(pre, 0.0))
        values = (est.prior, est.overhead_s, est.per_token_s, est.variance_s2)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"type {est.name!r}: non-finite estimate {values}")
        raw = max(est.per_token_s, 0.0)
        per_token = raw * used_share.get(est.name, 1.0)
        overhead = max(est.overhead_s + raw * answer_tokens.get(est.name, 0.0), 0.0)
        task = cfg.task
        if est.name in accuracy:
            base, gain, rate = accuracy[est.name]
            task = replace(task, accuracy_base=base, accuracy_gain=gain, accuracy_rate=rate)
        if est.name in pins:
            task = replace(task, min_tokens=int(pins[est.name]), max_tokens=int(pins[est.name]))
        tasks.append(
            replace(
                task,
                prior=est.prior,
                overhead_s=overhead,
                per_token_s=per_token,
                variance_s2=max(est.variance_s2, 0.0),
            )
        )
    total = sum(t.prior for t in tasks)
    tasks = [replace(t, prior=t.prior / total) for t in tasks]
    if isinstance(queue, BatchingEngine):
        pause = sum(t.prior * pre for t, pre in zip(tasks, prefill, strict=True))
        overlap = decode_overlap(tasks, prefill, caps) if caps else EXPONENTIAL_OVERLAP
        queue = BatchingEngine(sum(pool), a, b, pool if len(pool) > 1 else (), levels, pause, overlap)
    return Problem(tuple(tasks), arrival_rate, model.latency_penalty, model.rho_max, queue)


def decode_overlap(tasks: Sequence[TaskType], prefill: Sequence[float], caps: Mapping[str, int]) -> float:
    """``E[D]^2 / E[D^2] = 1 / (1 + C^2)`` of the decode work D (a request's time alone less
    its prefill) at ``caps`` (a type without one: at its largest cap), over the types' mix;
    1/2 where there is no decode work."""
    total = first = second = 0.0
    for t, pre in zip(tasks, prefill, strict=True):
        cap = min(max(caps.get(t.name, t.max_tokens), t.min_tokens), t.max_tokens)
        d = max(t.overhead_s - pre + t.per_token_s * cap, 0.0)
        total += t.prior
        first += t.prior * d
        second += t.prior * (d * d + t.variance_s2)
    return first * first / (second * total) if second > 0.0 else EXPONENTIAL_OVERLAP


@dataclass(frozen=True)
class Inputs:
    """What one decision reads: the estimates (this proxy's, or merged from every replica of
    it in a cluster) and the backend replicas in use."""

    snap: Snapshot
    arrivals: int  # requests classified so far (the estimate replaces the configured rate past min_arrivals)
    curves: dict[str, tuple[float, float, float]]  # accuracy curves pinned down by feedback
    accuracy: dict[str, Any]  # per type, what was decided about its curve and why
    curve_samples: dict[str, int]  # graded samples behind each curve
    step: StepEstimate | None
    answer: dict[str, float]  # answer tokens added to the overhead, per type
    used: dict[str, float]  # share of its limit an answer uses, per type
    prompt_tokens: dict[str, float]
    replicas: tuple[int, ...]  # slots of the backend replicas in use
    cluster: dict[str, Any] | None = field(default=None)  # the replicas merged (None: this proxy alone)


def accuracy_curves(state: ProxyState) -> tuple[dict[str, tuple[float, float, float]], dict[str, Any]]:
    """The accuracy curves fitted from graded feedback that are pinned down well enough to
    replace the configured ones (``[estimators] accuracy_*``), and per type what was
    decided and why (for the ``decision`` event).

    A fit that fails, or gives a curve the problem cannot take, leaves that type on its
    configured curve (the record says why); the other types are not affected.
    """
    e = state.settings.estimators
    used: dict[str, tuple[float, float, float]] = {}
    record: dict[str, Any] = {}
    for name, curve in state.accuracy.items():
        if curve.samples == 0:
            record[name] = {"source": "configured", "samples": 0}
            continue
        try:
            ev = curve.evidence()
            valid = all(math.isfinite(v) for v in (ev.base, ev.gain, ev.rate)) and (
                ev.base >= 0 and ev.gain > 0 and ev.rate > 0 and ev.base + ev.gain <= 1
            )
            if not valid:
                raise ValueError(f"fitted curve out of range: {(ev.base, ev.gain, ev.rate)}")
        except (ArithmeticError, ValueError, np.linalg.LinAlgError) as exc:
            record[name] = {"source": "configured", "samples": curve.samples,
                            "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
            continue
        pinned = (
            ev.samples >= e.accuracy_min_samples
            and ev.levels >= e.accuracy_min_levels
            and ev.stderr <= e.accuracy_max_stderr
        )
        if pinned:
            used[name] = (ev.base, ev.gain, ev.rate)
        record[name] = {
            "source": "feedback" if pinned else "configured",
            "samples": ev.samples,
            "levels": ev.levels,
            "stderr": finite(ev.stderr),
            "fitted": {"base": ev.base, "gain": ev.gain, "rate": ev.rate},
        }
    return used, record


def local_inputs(state: ProxyState, now: float) -> Inputs:
    """This proxy's own estimates at ``now``."""
    st = state
    curves, accuracy = accuracy_curves(st)
    return Inputs(
        snap=st.estimators.snapshot(now),
        arrivals=st.arrivals,
        curves=curves,
        accuracy=accuracy,
        curve_samples={n: c.samples for n, c in st.accuracy.items()},
        step=None if st.step is None else st.step.get(),
        answer=st.answer_offsets(),
        used=st.used.get(),
        prompt_tokens=st.estimators.service.prompt_tokens(),
        replicas=st.pool.healthy_slots(),
    )


def engine_waiting(st: ProxyState) -> float:
    """Requests waiting in the engines by their own gauges, over the healthy replicas whose
    gauges are fresh (read within three polling intervals); 0 without gauges."""
    interval = st.settings.backend.engine_gauges_s
    if interval is None:
        return 0.0
    now, total = st.clock(), 0.0
    for r in st.pool.replicas:
        if r.healthy and r.engine is not None and r.engine_at is not None and now - r.engine_at <= 3 * interval:
            total += r.engine.get("waiting", 0.0)
    return total


def decay_shedding(state: ProxyState, decision_id: str, now: float, *, evidence: str = "decisions_failing",
                   end: bool = False) -> None:  # fmt: skip
    """A failed decision keeps the caps but not the shedding: its share halves, and ends
    once below ``MIN_SHED_SHARE`` (or at once with ``end``): a controller that cannot
    decide must not keep rejecting traffic on an old reading."""
    st = state
    if not st.shedding:
        return
    st.admit_fraction = 1.0 - (1.0 - st.admit_fraction) * FAILED_SHED_DECAY
    if end or st.admit_fraction >= 1.0 - MIN_SHED_SHARE:
        st.shedding = False
        st.admit_fraction = 1.0
        st.shed_changed_at = now
        logger().warning("overload", decision_id=decision_id, time=now, on=False, admit_fraction=1.0,
                         evidence=evidence)  # fmt: skip


class ControlLoop:
    """Re-solves the allocation from the proxy's estimators and publishes integer caps.

    Its strategy comes in at construction: ``source`` gives the inputs (this proxy's own by
    default; a cluster's merged ones, :mod:`thinkcap.proxy.cluster`), ``deciding`` tells
    whether this replica decides now (in a cluster, it holds the lease), and each decision's
    event goes to every ``on_decision`` listener. ``wake`` (shared with a cluster that takes
    the lease) makes it decide at once.
    """

    def __init__(
        self,
        state: ProxyState,
        settings: ControllerSettings,
        *,
        clock: Callable[[], float] | None = None,
        source: Callable[[float], Inputs] | None = None,
        deciding: Callable[[], bool] | None = None,
        on_decision: Sequence[Callable[[dict[str, Any]], None]] = (),
        wake: asyncio.Event | None = None,
    ) -> None:
        self.state = state
        self.settings = settings
        self.clock = clock or state.clock
        self.source: Callable[[float], Inputs] = source or self.local_inputs
        self.deciding: Callable[[], bool] = deciding or (lambda: True)
        self.on_decision: list[Callable[[dict[str, Any]], None]] = list(on_decision)
        self.x0: np.ndarray[Any, Any] | None = None
        self.decisions = 0
        self.failures = 0
        self.wake = wake or asyncio.Event()
        self._seen_changes = 0
        self._queued = 0  # the admission queue's length at the decision before
        self._unconfirmed = False  # an overload without evidence has been logged
        self._last_step: float | None = None
        state.listeners.append(self.notice)

    def notice(self, what: str) -> None:
        """The state's news (:meth:`ProxyState.notify`): a rate change the detector flagged, or
        a replica ejected or taken back, wakes the loop."""
        if what != "arrival" or self.changed():
            self.wake.set()

    def changed(self) -> bool:
        """Whether the change detector flagged since the last decision (then wake the loop)."""
        return self.state.estimators.arrival.changes != self._seen_changes

    def curves(self) -> tuple[dict[str, tuple[float, float, float]], dict[str, Any]]:
        """:func:`accuracy_curves` of this loop's state."""
        return accuracy_curves(self.state)

    async def refresh_curves(self) -> None:
        """Fit the accuracy curves that new feedback changed, off the event loop (see :func:`refit_curves`)."""
        await refit_curves(self.state.accuracy)

    def local_inputs(self, now: float) -> Inputs:
        """:func:`local_inputs` of this loop's state."""
        return local_inputs(self.state, now)

    def step(self, now: float | None = None) -> dict[str, Any] | None:
        """One decision at ``now``; returns its event (``None`` if it failed: caps kept, and
        shedding decays)."""
        st, s = self.state, self.settings
        now = self.clock() if now is None else now
        self._last_step = now
        self.decisions += 1
        decision_id = f"{self.decisions:06d}-{uuid.uuid4().hex[:8]}"
        self._seen_changes = st.estimators.arrival.changes
        log = logger()
        try:
            inputs = self.source(now)
            self._seen_changes = st.estimators.arrival.changes  # a fall its snapshot flagged is seen
            snap = inputs.snap
            use_estimate = inputs.arrivals >= s.min_arrivals
            rate = snap.arrival_rate if use_estimate else st.settings.model.arrival_rate
            # The configured rate is a guess with no error bar: it never starts shedding. The
            # bound is the lower of the estimate's and the fast window's (no lag after a fall).
            rate_low = _lower_bound(snap) if use_estimate else 0.0
            # While shedding, the admit fraction follows the load now: the fast window after a fall.
            recent = snap.recent_rate if use_estimate and math.isfinite(snap.recent_rate) else rate
            rate_now = min(rate, recent)
            rate_stderr = snap.arrival_rate_stderr if use_estimate else math.inf
            accuracy = inputs.accuracy
            step = inputs.step
            problem = build_problem(
                st.settings.model,
                snap,
                inputs.answer,
                rate,
                inputs.used,
                accuracy=inputs.curves,
                step=step,
                prompt_tokens=inputs.prompt_tokens,
                replicas=inputs.replicas,
                pins=st.caps.pins,
                caps=st.caps.effective(),
            )
            if step is not None:
                st.pool.set_prefill_guess(max(t.overhead_s for t in problem.types))
            if isinstance(problem.queue, BatchingEngine):  # whole answers' steps read with the step in use
                st.pool.set_step(problem.queue.taus)
            x0 = self.x0
            started = time.perf_counter()
            decision = decide(problem, method=s.method, x0=x0)
            solve_time = time.perf_counter() - started
            result = decision.result
            if not decision.usable:
                raise RuntimeError(f"solver {s.method} failed: {result.message}")
            caps = decision.caps(problem.names)
        except Exception as exc:  # fail-static: any failure keeps the last good caps
            self.failures += 1
            log.error(
                "decision_failed",
                decision_id=decision_id,
                time=now,
                error=f"{type(exc).__name__}: {exc}",
                caps_kept=st.caps.effective(),
            )
            decay_shedding(st, decision_id, now)
            return None
        overload = result.status == Status.OVERLOAD
        waiting = self._waiting()
        evidence = self._shedding(problem, rate_low, rate_now, decision_id, now, waiting=waiting)
        if not overload:
            self.x0 = result.x
        # A backlog (more requests waiting than the slots hold: the end of a burst) is served
        # at the caps it was admitted under: caps rise only once it has drained, or longer
        # answers would stretch every wait behind them.
        backlog = waiting if waiting > sum(st.pool.healthy_slots()) and not overload else None
        chosen = caps
        if backlog is not None:
            before = st.caps.table.caps
            chosen = {n: min(c, before[n]) if n in before else c for n, c in caps.items()}
        publish = should_publish(
            problem,
            chosen,
            st.caps.table.caps,
            overload=overload,
            hysteresis_tokens=s.hysteresis_tokens,
            hysteresis_relative=s.hysteresis_relative,
            hysteresis_latency=s.hysteresis_latency,
            rate_band=_rate_band(rate, rate_stderr, s.hysteresis_rate_z),
        )
        if publish:
            table = st.caps.publish(chosen, "controller", decision_id=decision_id, now=now)
            st.metrics.set_caps(st.caps.effective())
            log.info(
                "caps_published",
                decision_id=decision_id,
                time=now,
                version=table.version,
                caps=chosen,
                in_force=st.caps.effective(),
            )
        # the prediction is the caps' in force (held, kept by the hysteresis or pinned): the
        # requests that come next get those
        in_force = st.caps.effective()
        q = problem.metrics(np.array([in_force[n] for n in problem.names], dtype=float))
        st.metrics.rho.set(q.rho if math.isfinite(q.rho) else -1)
        st.metrics.predicted_system_time.set(q.mean_system_time if math.isfinite(q.mean_system_time) else -1)
        st.metrics.solve_time.set(solve_time)
        event = {
            "decision_id": decision_id,
            "time": now,
            "method": s.method,
            "x0": None if x0 is None else [float(v) for v in x0],
            "inputs": problem_record(problem),
            "arrival_source": "estimate" if use_estimate else "config",
            "arrival_rate_stderr": finite(rate_stderr),
            "status": result.status.name.lower(),
            "message": result.message,
            "iterations": result.nit,
            "function_evaluations": result.nfev,
            "residual": finite(result.residual),
            "caps_continuous": {n: float(x) for n, x in zip(problem.names, result.x, strict=True)},
            "caps": caps,
            "predicted_rho": finite(q.rho),
            "predicted_mean_system_time": finite(q.mean_system_time),
            "published": publish,
            "held_by_backlog": None if chosen == caps else backlog,
            "caps_in_force": in_force,
            "pinned": dict(st.caps.pins),
            "load_at_min_caps": load_at_min_caps(problem),
            "shedding": st.shedding,
            "admit_fraction": st.admit_fraction,
            "overload_evidence": evidence,
            "accuracy": accuracy,
            "step": None if step is None else step_record(step),
            "solve_time_s": solve_time,
        }
        if inputs.cluster is not None:
            event["cluster"] = inputs.cluster
        st.last_decision = event
        log.info("decision", **event)
        for listener in self.on_decision:
            listener(event)
        return event

    def _queue_confirms(self, waiting: int) -> bool:
        """Whether a queue confirms an overload: requests wait for a slot (``waiting``, see
        :meth:`_waiting`), and no fewer than at the decision before (a queue that drains is a
        burst being served)."""
        before, self._queued = self._queued, waiting
        return waiting > 0 and waiting >= before

    def _waiting(self) -> int:
        """The requests waiting for a slot: the admission queue's (``serve``) and the requests
        in service upstream beyond the healthy replicas' slots, the engine's own queue, the
        only one behind a gateway (``extproc``, which holds no request of its own); where the
        engines' own gauges are read (``[backend] engine_gauges_s``), their waiting requests
        when more, since they also count traffic that did not come through this thinkcap."""
        st = self.state
        engine = max(st.pool.in_service - sum(st.pool.healthy_slots()), 0, round(engine_waiting(st)))
        return st.admission.queued + engine

    def _shedding(
        self, p: Problem, rate_low: float, rate_now: float, decision_id: str, now: float, *, waiting: int
    ) -> str | None:
        """Start, follow or stop shedding; returns the evidence of an overload that started it.

        The load the server would see at the minimum caps, ``L``, reads the arrival rate of
        every request, admitted or shed. Shedding starts when ``L`` stays above ``rho_max``
        at the rate's lower confidence bound ``rate_low`` (:func:`_lower_bound`) *and* the
        queue confirms it (:meth:`_queue_confirms` of ``waiting``). While shedding, the admit
        fraction follows the load now, ``L_now`` (``L`` at ``rate_now``, the lower of the
        estimate and its fast window: no lag after a fall), at every decision
        (``shed_release x rho_max / L_now``, at most 1), and shedding ends once ``L_now <=
        rho_max`` or it would shed less than ``MIN_SHED_SHARE``. Neither start nor end
        happens within ``shed_min_dwell_s`` of the last change (the admit fraction follows
        the load meanwhile).
        """
        st, s = self.state, self.settings
        load = load_at_min_caps(p)
        rate = p.arrival_rate
        lower = load * min(rate_low, rate) / rate if rate > 0 else 0.0
        confirmed = self._queue_confirms(waiting)
        was = st.shedding
        settled = st.shed_changed_at is None or now - st.shed_changed_at >= s.shed_min_dwell_s
        evidence: str | None = None
        if was:
            load_now = load * min(rate_now, rate) / rate if rate > 0 else 0.0
            st.admit_fraction = admit_fraction(p, s.shed_release, rate=min(rate_now, rate))
            if settled and (load_now <= p.rho_max or st.admit_fraction >= 1.0 - MIN_SHED_SHARE):
                st.shedding = False
                st.admit_fraction = 1.0
        elif load > p.rho_max:
            if lower > p.rho_max and confirmed and settled:
                st.shedding = True
                st.admit_fraction = admit_fraction(p, s.shed_release)
                evidence = "queue"
                self._unconfirmed = False
            elif not self._unconfirmed:
                self._unconfirmed = True
                why = "the queue does not confirm it" if lower > p.rho_max else "it does not survive the rate's noise"
                logger().warning(
                    "overload_unconfirmed",
                    decision_id=decision_id,
                    time=now,
                    load_at_min_caps=load,
                    load_lower_bound=lower,
                    queued=st.admission.queued,
                    detail=f"an overload is predicted but {why}; admitting everything",
                )
        else:
            self._unconfirmed = False
        if st.shedding != was:
            st.shed_changed_at = now
            logger().warning(
                "overload",
                decision_id=decision_id,
                time=now,
                on=st.shedding,
                load_at_min_caps=load,
                load_lower_bound=lower,
                admit_fraction=st.admit_fraction,
                evidence=evidence,
            )
        return evidence

    async def run(self) -> None:
        """Decide every ``interval_s`` (or at once when the change detector fires) until cancelled."""
        log = logger()
        log.info("control_loop", settings=asdict(self.settings))
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.settings.interval_s)
            if self._last_step is not None:  # an early wake waits out the minimum gap between decisions
                gap = self.settings.min_resolve_interval_s - (self.clock() - self._last_step)
                if gap > 0:
                    await asyncio.sleep(gap)
            self.wake.clear()
            if not self.deciding():
                continue
            try:
                await self.refresh_curves()
                self.step()
            except Exception as exc:  # a crash is logged at once and the loop goes on
                log.error("control_loop_crash", error=f"{type(exc).__name__}: {exc}")
