"""Arrival rate: a time-decayed Poisson estimate with a CUSUM change detector."""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
from scipy.special import xlogy

from thinkcap.estimators._decay import check_half_life, check_time

#: Default time constants, seconds (the config's ``[estimators]`` defaults are these).
HALF_LIFE_S = 30.0
FAST_HALF_LIFE_S = 2.5
REFERENCE_HALF_LIFE_S = 300.0


@dataclass(frozen=True)
class RateEstimate:
    """The arrival rate at one instant, with its standard error."""

    rate: float
    stderr: float
    events: float


#: A fall is scored on a window this many times longer than the fast one (a fall removes
#: arrivals, so it needs a longer window to show).
FALL_WINDOW_FACTOR = 4.0
#: Share of its exposure the reference keeps after a flagged change.
REFERENCE_KEEP = 0.1
#: Recent arrivals kept to locate a flagged change (a few seconds' worth at high rates).
RECENT_EVENTS = 512
#: Arrivals a located segment must hold (fewer would let noise place the change).
MIN_SEGMENT_EVENTS = 5
#: Log-likelihood ratio at which :meth:`ArrivalRate.check` flags a fall (a silence included):
#: a stationary stream crosses it about once in ``e^15`` (3 million) checks.
FALL_LLR = 15.0


class _Decayed:
    """Decayed event count and exposure (the integral of the decay weight over time)."""

    __slots__ = ("count", "exposure", "exposure2", "inv_tau", "tau")

    def __init__(self, half_life_s: float) -> None:
        self.inv_tau = math.log(2.0) / half_life_s  # 0 for an infinite half-life
        self.tau = half_life_s / math.log(2.0)
        self.count = 0.0
        self.exposure = 0.0
        self.exposure2 = 0.0

    def advance(self, dt: float, add: float = 0.0) -> None:
        """Let ``dt`` seconds pass, then add ``add`` events."""
        if dt > 0.0:
            if self.inv_tau == 0.0:
                self.exposure += dt
                self.exposure2 += dt
            else:
                f = math.exp(-dt * self.inv_tau)
                g = self.tau * (1.0 - f)  # tau (1 - f); and tau (1 - f^2) / 2 = g (1 + f) / 2
                self.exposure = self.exposure * f + g
                self.exposure2 = (self.exposure2 * f + 0.5 * g) * f + 0.5 * g
                self.count = self.count * f + add
                return
        self.count += add

    def rate(self) -> float:
        return self.count / self.exposure if self.exposure > 0.0 else 0.0

    def estimate(self) -> RateEstimate:
        if self.exposure <= 0.0:
            return RateEstimate(0.0, math.inf, self.count)
        rate = self.count / self.exposure
        # Var(sum of decayed Poisson counts) = rate * integral(w^2); floor the rate at one
        # event per exposure so that an empty window still reports its uncertainty.
        var = max(rate, 1.0 / self.exposure) * self.exposure2 / self.exposure**2
        return RateEstimate(rate, math.sqrt(var), self.count)


class ArrivalRate:
    """Time-decayed Poisson arrival rate with a two-timescale change detector.

    Parameters
    ----------
    half_life_s
        Memory of the reported estimate, seconds.
    fast_half_life_s
        Memory of the fast window that the detector watches and that the estimates restart
        from after a detected change.
    reference_half_life_s
        Memory of the detector's reference rate (long, so that its noise does not cause
        false alarms).
    threshold
        Alarm when the fast window's count is this many standard deviations above what the
        reference rate predicts (higher: fewer false alarms, slower detection).
    threshold_down
        The same below the prediction, for a fall in load.
    warmup_events
        Events after the start, or after a flagged change, before the detector runs.

    Notes
    -----
    rate(t) = N(t) / E(t), with N the decayed event count and E the decayed exposure
    ``integral_0^t w(t - u) du``, ``w(a) = 2^(-a / half_life)``; the standard error uses
    ``Var N = rate * integral w^2``. Between events the count decays and the exposure grows,
    so the rate falls during a silence instead of freezing. The detector compares two
    timescales: at each arrival a window's decayed count ``N`` is scored against what the
    reference rate ``r`` predicts over the same window, on Anscombe's square-root scale for
    the equivalent Poisson count (scale ``s = E / E2``):
    ``z = 2 (sqrt(N s + 3/8) - sqrt(r E s + 3/8)) / sqrt(1 + E^2 E2_r / (E2 E_r^2))``, the
    divisor accounting for the reference's own uncertainty. A change is flagged when the fast
    window's ``z > threshold`` or the fall window's ``z < -threshold_down``. A fall is scored on
    a window ``FALL_WINDOW_FACTOR`` times longer than the fast one. An alarm locates the change
    among the last ``RECENT_EVENTS`` arrivals, at the arrival ``tau`` that best splits them
    into two Poisson segments of their own rates (the largest ``n1 ln(n1 / T1) + n2 ln(n2 /
    T2)``, ``n`` arrivals over ``T`` seconds), and restarts the reported estimate from the
    arrivals after ``tau`` alone: after a step it holds none from before the step. The
    reference keeps its level but forgets most of its exposure (``REFERENCE_KEEP``).

    Arrivals are scored only when they come, and a fall removes them: after 36/s turns into
    1.5/s, a reference that rests on a few seconds (after repeated alarms during a ramp)
    falls as fast as the windows and nothing is flagged. :meth:`check`, run at any instant
    (the estimators run it at every snapshot), tests the arrivals since the last located
    change, and the silence up to ``now``, for a fall: the likelihood ratio of two Poisson
    segments, the later slower, against one, maximised over the split; above ``FALL_LLR`` it
    restarts the estimate and the reference from the arrivals after the split.

    Examples
    --------
    >>> est = ArrivalRate(half_life_s=10.0)
    >>> for i in range(200):
    ...     est.update(now=i * 0.5)
    >>> round(est.get(now=99.5).rate, 1)
    2.0
    """

    def __init__(
        self,
        *,
        half_life_s: float = HALF_LIFE_S,
        fast_half_life_s: float = FAST_HALF_LIFE_S,
        reference_half_life_s: float = REFERENCE_HALF_LIFE_S,
        threshold: float = 2.95,
        threshold_down: float = 3.0,
        warmup_events: int = 20,
    ) -> None:
        self.half_life_s = check_half_life("half_life_s", half_life_s)
        self.fast_half_life_s = check_half_life("fast_half_life_s", fast_half_life_s)
        self.reference_half_life_s = check_half_life("reference_half_life_s", reference_half_life_s)
        for name, value in (("threshold", threshold), ("threshold_down", threshold_down)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
        if isinstance(warmup_events, bool) or not isinstance(warmup_events, int) or warmup_events < 0:
            raise ValueError(f"warmup_events: must be an integer >= 0, got {warmup_events!r}")
        self.threshold = float(threshold)
        self.threshold_down = float(threshold_down)
        self.warmup_events = warmup_events
        self._main = _Decayed(self.half_life_s)
        self._fast = _Decayed(self.fast_half_life_s)
        self._slow_fall = _Decayed(FALL_WINDOW_FACTOR * self.fast_half_life_s)
        self._ref = _Decayed(self.reference_half_life_s)
        self._windows = (self._main, self._fast, self._slow_fall, self._ref)
        self._last: float | None = None
        self._recent: deque[tuple[float, int]] = deque(maxlen=RECENT_EVENTS)
        self._changes = 0
        self._since_change = 0
        self._last_change: float | None = None
        self._origin = -math.inf  # the last located change: the fall test looks after it

    def update(self, *, now: float, count: int = 1) -> None:
        """Record ``count`` arrivals at time ``now`` (seconds, non-decreasing)."""
        now = check_time(now, self._last)
        if type(count) is not int or count < 0:
            raise ValueError(f"count: must be an integer >= 0, got {count!r}")
        slow = self._ref
        ref = slow.rate()
        windows = self._windows
        dt = 0.0 if self._last is None else now - self._last
        self._last = now
        for window in windows:
            window.advance(dt, count)
        if count == 0:
            return
        self._recent.append((now, count))
        self._since_change += count
        if ref > 0.0 and self._since_change > self.warmup_events and self._ref.exposure > 0.0:
            self._detect(ref, now)

    def _score(self, window: _Decayed, ref: float) -> float:
        """How many standard deviations ``window``'s count lies from the reference's prediction.

        The decayed count is scaled to an equivalent Poisson count (variance = mean) and
        compared on Anscombe's square-root scale, which keeps the score calibrated when the
        window holds only a few arrivals; the result is shrunk by the uncertainty of the
        reference itself (large while it rests on little exposure).
        """
        slow = self._ref
        scale = window.exposure / window.exposure2
        z = 2.0 * (math.sqrt(window.count * scale + 0.375) - math.sqrt(ref * window.exposure * scale + 0.375))
        ref_share = window.exposure**2 * slow.exposure2 / (window.exposure2 * slow.exposure**2)
        return z / math.sqrt(1.0 + ref_share)

    def _detect(self, ref: float, now: float) -> None:
        """Score the fast windows against the reference rate; restart on a change."""
        fast = self._fast
        # The score has the sign of the fast window's excess over its prediction: a rise can
        # only show when it is positive, and a fall (which shows in the fast window too) only
        # when it is negative, so one score per arrival suffices.
        if fast.count >= ref * fast.exposure:
            changed = self._score(fast, ref) > self.threshold
        else:
            changed = self._score(self._slow_fall, ref) < -self.threshold_down
        if changed:
            self._changes += 1
            self._last_change = now
            self._since_change = 0
            # The reported rate restarts from the arrivals since the located change. The
            # reference keeps its level (the window that raised a false alarm is biased) but
            # forgets most of its exposure, so that after a true change it relearns within a
            # few dozen arrivals.
            self._origin = self._change_point(now)
            self._main = self._since(self._origin, now)
            self._windows = (self._main, self._fast, self._slow_fall, self._ref)
            slow = self._ref
            slow.count *= REFERENCE_KEEP
            slow.exposure *= REFERENCE_KEEP
            slow.exposure2 *= REFERENCE_KEEP

    def check(self, now: float) -> bool:
        """Test for a fall in the rate at ``now`` (no earlier than the last arrival): among
        the kept arrivals since the last located change, and the silence after them, the
        split ``tau`` that best fits two Poisson segments, the later slower. If their
        log-likelihood exceeds one segment's by ``FALL_LLR``, the change is flagged: the
        reported estimate and the reference restart from the arrivals after ``tau``. Returns
        whether it was flagged."""
        if self._last is None:
            return False
        now = check_time(now, self._last)
        kept = [(t, c) for t, c in self._recent if t >= self._origin]
        if sum(c for _, c in kept) < 2 * MIN_SEGMENT_EVENTS:
            return False
        times = np.array([t for t, _ in kept])
        counts = np.array([c for _, c in kept], dtype=float)
        origin, total = times[0], counts[1:].sum()  # the oldest arrival marks the origin (as _change_point)
        n1 = np.cumsum(counts[1:])
        n2 = total - n1
        t1 = times[1:] - origin
        t2 = now - times[1:]
        ok = (n1 >= MIN_SEGMENT_EVENTS) & (t1 > 0.0) & (t2 > 0.0)
        ok &= n2 * t1 < n1 * t2  # the later segment slower
        if not ok.any():
            return False
        with np.errstate(divide="ignore", invalid="ignore"):
            ll = xlogy(n1, n1 / t1) + xlogy(n2, n2 / t2) - total * math.log(total / (now - origin))
        ll = np.where(ok, ll, -np.inf)
        best = int(np.argmax(ll))
        if not ll[best] > FALL_LLR:
            return False
        tau = float(times[1 + best])
        self._changes += 1
        self._last_change = now
        self._since_change = 0
        self._origin = tau
        # the windows stand at the last arrival (a read decays them to its instant)
        self._main = self._since(tau, self._last)
        self._ref = self._since(tau, self._last, self.reference_half_life_s)
        self._windows = (self._main, self._fast, self._slow_fall, self._ref)
        return True

    def _change_point(self, now: float) -> float:
        """The most likely time of one rate change among the kept arrivals.

        Two Poisson segments, before and after a kept arrival ``tau`` (from the oldest kept
        arrival to ``now``), each at its own best rate; ``tau`` maximises their log-likelihood
        ``n1 ln(n1 / T1) + n2 ln(n2 / T2)``. Each segment holds at least ``MIN_SEGMENT_EVENTS``
        arrivals, except a later segment slower than the earlier one (after a fall to almost
        nothing it may hold none). Falls back to the oldest kept arrival.
        """
        recent = self._recent
        origin = recent[0][0]
        total = sum(count for _, count in recent) - recent[0][1]
        best, best_ll = origin, -math.inf
        n1 = 0
        for t, count in itertools.islice(recent, 1, None):
            n1 += count
            n2 = total - n1
            t1, t2 = t - origin, now - t
            if n1 < MIN_SEGMENT_EVENTS or t1 <= 0.0 or t2 <= 0.0:
                continue
            if n2 < MIN_SEGMENT_EVENTS and n2 * t1 >= n1 * t2:
                continue
            ll = n1 * math.log(n1 / t1) + (n2 * math.log(n2 / t2) if n2 else 0.0)
            if ll > best_ll:
                best, best_ll = t, ll
        return best

    def _since(self, start: float, now: float, half_life_s: float | None = None) -> _Decayed:
        """A fresh estimate (half-life ``half_life_s``, default the reported one's) that has
        seen only the kept arrivals after ``start``."""
        out = _Decayed(self.half_life_s if half_life_s is None else half_life_s)
        last = start
        for t, count in self._recent:
            if t > start:
                out.advance(t - last, count)
                last = t
        out.advance(now - last)
        return out

    def get(self, now: float | None = None) -> RateEstimate:
        """The rate (1/s) and its standard error at ``now`` (default: the last update)."""
        return self._read(self._main, self.half_life_s, now)

    def recent(self, now: float | None = None) -> RateEstimate:
        """The fast window's rate (half-life ``fast_half_life_s``) and its standard error at
        ``now``: what the load is now, noisier than :meth:`get` but with no lag after a fall."""
        return self._read(self._fast, self.fast_half_life_s, now)

    def _read(self, window: _Decayed, half_life_s: float, now: float | None) -> RateEstimate:
        if now is None or self._last is None:
            return window.estimate()
        now = check_time(now, self._last)
        probe = _Decayed(half_life_s)
        probe.count, probe.exposure, probe.exposure2 = window.count, window.exposure, window.exposure2
        probe.advance(now - self._last)
        return probe.estimate()

    @property
    def changes(self) -> int:
        """How many load changes the detector has flagged."""
        return self._changes

    @property
    def last_change(self) -> float | None:
        """Time of the last flagged change, or ``None``."""
        return self._last_change
