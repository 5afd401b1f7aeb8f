"""A batching engine's step time, fitted online: tau(j) = a + b j, and its prefill o + p P.

An engine that runs ``j`` sequences at once takes ``tau(j)`` seconds per decode step, one
token for each of them. Two kinds of finished request inform the fit:

- a streamed answer gives one sample per gap between token events, ``gap = n tau(j)`` for
  ``n`` tokens arriving together while ``j`` requests were in service, plus its time to the
  first token: ``c + o + p P`` for ``P`` evaluated prompt tokens, held up by the prompts of
  the ``k`` requests sent meanwhile, and the steps of the tokens its first event brought
  beyond the first (:meth:`StepFit.update`). The first token's wait is never read as a step:
  it is the prefill sample. ``o + p P`` is the prefill, the pause every request in service
  waits for; ``c`` is the request's own wait (the hops, the step in progress), told apart by
  the ``k`` other prompts, which add their prefills and never a ``c``. Gaps during which
  another request was in its prefill, or left, are left out by the caller (that step carried
  the other's prompt; those steps ran at two occupancies);
- a whole (non-streamed) answer of ``T`` tokens gives ``service = c + o + p P + T (a + b n)``,
  with ``n`` the time-averaged number in service while it ran: a regression in
  ``(1, P, T, T n)``.

Token gaps are kept per occupancy ``j``: each level's mean step ``tau(j)`` and its variance.
The line ``a + b j`` is fitted to the levels with enough gaps, each level weighing the same,
as a calibration that runs each occupancy in turn does: a real engine's step is not a line
(llama-server: 11.7, 22.7, 35.8, 36.9 ms at 1..4), and a line weighted by how often each
occupancy occurs moves with the traffic's mix (on llama-server its intercept went below 0).
The levels themselves are the estimate where they are pinned down, from one sequence up
(``StepEstimate.levels``): a line through a concave step misses ``tau(1)`` (by 29 % on
llama-server's 6.5, 17.3, 25.2, 27.9 ms), and the queue model reads the step per occupancy
(:class:`~thinkcap.controller.queue.BatchingEngine`'s ``step_levels_s``); the line stands above
the last of them.
Whole answers and prefill samples feed one weighted least-squares fit of
``theta = (c, o, p, a, b)`` in information form; its ``(a, b)`` stand where the gaps cover
fewer than two occupancies. Where the gaps give the step, a first token's first-event steps
are read off them (a known offset ``(n - 1) tau(j)``) rather than fitted beside the prefill:
fitted beside it on the simulated server, they took a share of the prefill (``a`` and ``b``
came out 0.47 ms each against the engine's 0.25 and 0.35). Both forget per request as :class:`ServiceRLS` does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from thinkcap.estimators._decay import check_time
from thinkcap.estimators.service import FORGETTING, TOKEN_SCALE

#: Default finished requests before the fit can replace the configured step.
MIN_SAMPLES = 30
#: Default largest relative standard error of tau(1) and of b (as a share of tau(1)) for the fit to count.
MAX_REL_STDERR = 0.1
#: Largest condition number of the (a, b) information (scaled to unit diagonal) for the fit to
#: count: occupancies 1..4 seen evenly give about 30; every gap at one occupancy, infinity.
MAX_CONDITION = 1e3
#: Information of the ridge prior, per coefficient (scaled features): about one sample's worth of a stray token.
PRIOR_INFORMATION = 1e-4
#: Information of the prior that a request's own wait before its first token, beyond the
#: prefills, is 0 (``c``): ten first tokens' worth. Only the prompts sent while a request waits
#: (``k``) tell ``c`` from the prefill ``o``; where ``k`` hardly varies (a light load), the
#: time before the first token stays the prefill, as the queue model read it before ``c``.
OWN_WAIT_PRIOR_INFORMATION = 10.0


#: Standard errors within which a negative intercept (or slope) of the level line reads as 0.
NOISE_Z = 2.0
#: Gaps (decayed) an occupancy level needs before its mean step enters the line.
MIN_LEVEL_GAPS = 5.0
#: Largest standard error of a level's mean step, as a share of it, for the level to enter the
#: line: a rare occupancy seen in a few noisy gaps would otherwise swing the intercept.
LEVEL_MAX_REL_STDERR = 0.05
#: Occupancies tracked one by one; a larger one is counted at this level.
MAX_LEVEL = 4096


class GapTally:
    """The sufficient statistics of one streamed answer's token gaps, per occupancy (pure, O(1)
    per gap).

    Each :meth:`add` is one sample ``gap_s = tokens tau(in_service)`` of unit weight; per
    occupancy ``levels`` holds the sums of ``tokens^2``, ``tokens gap_s``, ``gap_s^2`` and
    the count.

    Examples
    --------
    >>> g = GapTally()
    >>> g.add(0.030, 1, 2)
    >>> g.add(0.050, 1, 4)
    >>> g.samples, round(g.seconds, 3), sorted(g.levels)
    (2, 0.08, [2, 4])
    """

    __slots__ = ("levels", "samples", "seconds", "text", "tokens")

    def __init__(self) -> None:
        self.levels: dict[int, list[float]] = {}
        self.samples = 0
        self.seconds = 0.0
        self.tokens = 0.0
        self.text: dict[int, list[float]] = {}  # per occupancy: sums of text^2, text gap_s and text

    def rescale(self, factor: float) -> None:
        """Read every gap as having brought ``factor`` times the tokens counted: a server that
        sends several tokens per event is seen to send one per event, and its usage says how
        many there were in all."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor: must be a finite number > 0, got {factor!r}")
        for row in self.levels.values():
            row[0] *= factor * factor
            row[1] *= factor
        self.tokens *= factor

    def by_text(self, factor: float) -> None:
        """Read every gap as having brought ``factor`` tokens per unit of the text it brought
        (:meth:`add`'s ``text``), in place of its events: a server that sends several tokens
        per event sends a short last event (and one where the reasoning ends), and one
        per-request factor over the events reads those gaps as too many tokens (the step
        6 % short at a full batch on the simulated engine, 16 tokens per event)."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor: must be a finite number > 0, got {factor!r}")
        self.tokens = 0.0
        for j, row in self.levels.items():
            text = self.text.get(j, [0.0, 0.0, 0.0])
            row[0] = text[0] * factor * factor
            row[1] = text[1] * factor
            self.tokens += text[2] * factor

    def add(self, gap_s: float, tokens: int, in_service: float, text: float = 0.0) -> None:
        """One gap of ``gap_s`` seconds that brought ``tokens`` tokens (events, until
        :meth:`rescale` or :meth:`by_text`) and ``text`` characters of text with
        ``in_service`` requests running."""
        j = min(max(round(in_service), 1), MAX_LEVEL)
        row = self.levels.get(j)
        if row is None:
            row = self.levels[j] = [0.0, 0.0, 0.0, 0.0]
        n = float(tokens)
        row[0] += n * n
        row[1] += n * gap_s
        row[2] += gap_s * gap_s
        row[3] += 1.0
        if text:
            sums = self.text.get(j)
            if sums is None:
                sums = self.text[j] = [0.0, 0.0, 0.0]
            sums[0] += text * text
            sums[1] += text * gap_s
            sums[2] += text
        self.samples += 1
        self.seconds += gap_s
        self.tokens += n


class StepEstimate(NamedTuple):
    """The fitted step and prefill, with standard errors and the evidence behind them (immutable)."""

    base_s: float  # a: seconds per step, whatever the batch
    per_seq_s: float  # b: seconds per step per sequence in the batch
    prefill_base_s: float  # o: seconds per request of its prefill (it holds up the batch)
    prefill_per_token_s: float  # p: seconds per evaluated prompt token
    base_stderr_s: float
    per_seq_stderr_s: float
    requests: int
    gaps: int
    fitted: bool  # enough requests, and the levels or a, b and tau(1) pinned down (see StepFit)
    levels: tuple[float, ...] = ()  # tau(1), tau(2), ... measured, as far as each is pinned down
    first_token_base_s: float = 0.0  # c: seconds of a request's own before its first token, holding up no other

    def step_time(self, j: float) -> float:
        """tau(j): the measured level (between whole occupancies, on the straight line from one
        to the next) up to the last one, the line ``a + b j`` above it but never below it."""
        return float(_step_times(self.base_s, self.per_seq_s, self.levels, np.asarray(j, dtype=float)))

    def prefill_s(self, prompt_tokens: float) -> float:
        """The prefill of ``prompt_tokens`` evaluated prompt tokens (the own wait
        ``first_token_base_s`` apart)."""
        return max(0.0, self.prefill_base_s + self.prefill_per_token_s * prompt_tokens)


def _step_times(a: float, b: float, levels: tuple[float, ...], j: NDArray[np.float64]) -> NDArray[np.float64]:
    """tau at the occupancies ``j`` (:meth:`StepEstimate.step_time`, element by element)."""
    line = a + b * j
    if not levels:
        return line
    at = np.interp(j, np.arange(1.0, len(levels) + 1.0), levels)
    return np.where(j <= len(levels), at, np.maximum(line, levels[-1]))


class _Sums:
    """One kind of sample's information form: sums of ``w x x'``, ``w y x``, ``w y^2`` and the
    (decayed) count."""

    __slots__ = ("info", "samples", "syy", "vec")

    def __init__(self) -> None:
        self.info = np.zeros((5, 5))
        self.vec = np.zeros(5)
        self.syy = 0.0
        self.samples = 0.0

    def scale(self, f: float) -> None:
        self.info *= f
        self.vec *= f
        self.syy *= f
        self.samples *= f

    def add(self, x: NDArray[np.float64], y: float, w: float) -> None:
        self.info += w * np.outer(x, x)
        self.vec += w * y * x
        self.syy += w * y * y
        self.samples += 1.0


class StepFit:
    """Online weighted least squares of an engine's step time and prefill.

    Parameters
    ----------
    base_s, per_seq_s
        The configured step ``tau(j) = base_s + per_seq_s j``: the ridge prior, and the
        estimate until the fit counts.
    prefill_s
        The configured prefill (seconds per request): the prior of the prefill intercept.
    forgetting
        Per-request forgetting factor in (0, 1] (as :class:`ServiceRLS`).
    min_samples
        Finished requests before the fit may count.
    max_rel_stderr
        The fit counts when the standard errors of ``tau(1)``, of ``b`` and of the intercept
        ``a`` are each at most this share of ``tau(1)``, both coefficients are >= 0 (a negative
        intercept within ``NOISE_Z`` standard errors or this share of ``tau(1)`` of 0 reads as
        0), and the
        occupancies seen tell ``a`` from ``b`` (the condition number of their information is
        at most :data:`MAX_CONDITION`). Where the step is read per occupancy from one sequence
        up (two levels or more), the levels carry it: a negative intercept of any size reads
        as 0 (the line only reaches above the last level), and only ``b``'s standard error and
        signs are checked.

    Notes
    -----
    Coefficients ``theta = (c, o, p, a, b)`` with the prompt feature per 1000 tokens. The
    information matrix ``I`` and vector ``v`` are sums of ``w x x'`` and ``w x y``; each
    finished request first multiplies them by ``forgetting``. Weights: 1 per token gap and
    per time to the first token, ``1 / T`` for a whole answer of ``T`` tokens (its variance
    grows with its steps). ``theta = (I + I0)^-1 (v + I0 theta0)`` with the weak prior
    ``I0 = PRIOR_INFORMATION x identity`` (``OWN_WAIT_PRIOR_INFORMATION`` for ``c``, whose
    prior is 0); ``sigma^2``, the weighted residual sum of squares
    over the (decayed) number of samples less 5, is the noise of one unit-weight sample, and
    ``sigma^2 (I + I0)^-1`` the covariance.

    Examples
    --------
    >>> fit = StepFit(base_s=0.02, per_seq_s=0.01, min_samples=5)
    >>> for i in range(40):
    ...     gaps = GapTally()
    ...     for k in range(60):
    ...         j = 1 + (i + k) % 4
    ...         gaps.add(0.015 + 0.006 * j, 1, j)
    ...     fit.update(prompt_tokens=30, tokens=61, service_s=0.5, mean_in_service=2.5, gaps=gaps,
    ...                first_token_s=0.05 + 0.004 * 30, now=float(i))
    >>> e = fit.get()
    >>> round(e.base_s, 4), round(e.per_seq_s, 4), e.fitted
    (0.015, 0.006, True)
    """

    def __init__(
        self,
        base_s: float = 0.0,
        per_seq_s: float = 0.0,
        prefill_s: float = 0.0,
        *,
        forgetting: float = FORGETTING,
        min_samples: int = MIN_SAMPLES,
        max_rel_stderr: float = MAX_REL_STDERR,
    ) -> None:
        for name, value in (("base_s", base_s), ("per_seq_s", per_seq_s), ("prefill_s", prefill_s)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        if not (isinstance(forgetting, int | float) and not isinstance(forgetting, bool) and 0 < forgetting <= 1):
            raise ValueError(f"forgetting: must be in (0, 1], got {forgetting!r}")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
            raise ValueError(f"min_samples: must be an integer >= 1, got {min_samples!r}")
        if isinstance(max_rel_stderr, bool) or not isinstance(max_rel_stderr, int | float) or not max_rel_stderr > 0:
            raise ValueError(f"max_rel_stderr: must be > 0, got {max_rel_stderr!r}")
        self.base_s = float(base_s)
        self.per_seq_s = float(per_seq_s)
        self.prefill_s = float(prefill_s)
        self.forgetting = float(forgetting)
        self.min_samples = min_samples
        self.max_rel_stderr = float(max_rel_stderr)
        self._prior = np.array([0.0, self.prefill_s, 0.0, self.base_s, self.per_seq_s])
        self._whole = _Sums()  # whole answers (and answers without tokens)
        self._first = _Sums()  # first tokens, their first event's steps as (n - 1, (n - 1) j) in (a, b)
        # Per occupancy j of a first token (row j - 1), its first event's steps as a known offset
        # (n - 1) tau(j): sums of (n - 1)^2, y (n - 1) and x (n - 1) for x = (c, o, p)'s features.
        self._offsets = np.zeros((0, 5))
        self._levels = np.zeros((0, 4))  # per occupancy j (row j - 1): sums of n^2, n gap, gap^2, count (decayed)
        self._pt_sum = 0.0  # decayed sum of the evaluated prompts (per TOKEN_SCALE): others' prefills
        self._pt_count = 0.0
        self._requests = 0
        self._gaps = 0
        self._last: float | None = None
        self._cached: StepEstimate | None = None

    def update(
        self,
        *,
        prompt_tokens: float,
        tokens: float,
        service_s: float,
        mean_in_service: float,
        others_started: float = 0.0,
        gaps: GapTally | None = None,
        first_token_s: float | None = None,
        first_token_in_service: float = 1.0,
        first_token_held_by: float = 0.0,
        first_event_tokens: float = 1.0,
        now: float,
    ) -> None:
        """One finished request: streamed (``gaps`` and ``first_token_s``) or whole.

        ``prompt_tokens`` are the evaluated (not cached) prompt tokens, ``tokens`` the
        completion tokens, ``service_s`` the time from sending it to its end, and
        ``mean_in_service`` the mean number of requests in service meanwhile (itself
        included, so at least 1): for a whole answer, over its steps (the time at each
        occupancy over that occupancy's step), since its time is its tokens times its mean
        step. ``others_started`` counts the requests started on the same engine while it
        was in service: a whole answer's time holds their prompts' prefills too (each read
        at the mean evaluated prompt seen), since the engine reads a new prompt before (or
        with) the running sequences' next tokens; left in the steps, they made the step read
        11 % steeper than it is on the simulated engine at half its capacity.
        A streamed answer's time to its first token is its prompt's prefill, alone (the
        engine pauses the batch for it, as the queue model reads it), held up by the
        ``first_token_held_by`` other prompts read before its first token (those of the
        requests sent while it waited; the few still waiting for their prefill when it was
        sent are left out: the proxy cannot tell them from those decoding their first
        event's tokens), and the decode steps of the ``first_event_tokens`` its first event
        brought beyond the one the prefill gives (a server that packs several tokens per
        event), at the ``first_token_in_service`` requests in service then:
        ``first_token_s = c + (1 + k) o + (P + k P_mean) p + (n - 1) tau(j)``, with ``c`` the
        request's own wait beside the prefills (see the module's notes). Read as slowed
        by the batch instead, the simulated engine's prefill (which sends 16 tokens per
        event) came out 62 % long at 65 % of its capacity.
        """
        now = check_time(now, self._last)
        for name, value in (
            ("prompt_tokens", prompt_tokens),
            ("tokens", tokens),
            ("service_s", service_s),
            ("mean_in_service", mean_in_service),
            ("others_started", others_started),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        bad = isinstance(first_token_s, bool) or not isinstance(first_token_s, int | float)
        if first_token_s is not None and (bad or not 0 <= first_token_s < math.inf):
            raise ValueError(f"first_token_s: must be a finite number >= 0, got {first_token_s!r}")
        for name, value, low in (
            ("first_token_in_service", first_token_in_service, 1),
            ("first_token_held_by", first_token_held_by, 0),
            ("first_event_tokens", first_event_tokens, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value < math.inf:
                raise ValueError(f"{name}: must be a finite number >= {low}, got {value!r}")
        f = self.forgetting
        self._whole.scale(f)
        self._first.scale(f)
        self._levels *= f
        self._offsets *= f
        self._last = now
        self._requests += 1
        self._cached = None
        pt = prompt_tokens / TOKEN_SCALE
        self._pt_sum = f * self._pt_sum + pt
        self._pt_count = f * self._pt_count + 1.0
        if gaps is not None:
            if gaps.samples:
                top = max(gaps.levels)
                if top > len(self._levels):
                    self._levels = np.vstack([self._levels, np.zeros((top - len(self._levels), 4))])
                for j, row in gaps.levels.items():
                    self._levels[j - 1] += row
                self._gaps += gaps.samples
            if first_token_s is not None:
                n = first_event_tokens - 1.0
                held = self._held(pt, first_token_held_by)
                self._first.add(np.array([*held, n, n * first_token_in_service]), first_token_s, 1.0)
                j = min(max(round(first_token_in_service), 1), MAX_LEVEL)
                if j > len(self._offsets):
                    self._offsets = np.vstack([self._offsets, np.zeros((j - len(self._offsets), 5))])
                self._offsets[j - 1] += (n * n, n * first_token_s, *(n * v for v in held))
            return
        if tokens <= 0:
            self._whole.add(np.array([1.0, 1.0, pt, 0.0, 0.0]), service_s, 1.0)
            return
        x = np.array([*self._held(pt, others_started), tokens, tokens * max(mean_in_service, 1.0)])
        self._whole.add(x, service_s, 1.0 / tokens)

    def _held(self, pt: float, k: float) -> tuple[float, float, float]:
        """The features (c's, o's, p's) of a prompt of ``pt`` (per 1000 tokens) read with
        ``k`` others, each at the mean prompt seen: its own wait once, the prefills 1 + k times."""
        return 1.0, 1.0 + k, pt + k * self._pt_sum / self._pt_count

    def _solve(self, steps: NDArray[np.float64] | None) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
        """Weighted least squares with the weak ridge prior: theta, (I + I0)^-1 and sigma^2.

        With ``steps`` (tau(j) for j = 1.. as far as first tokens were seen at), a first
        token's first-event steps are that known offset, and its row tells (c, o, p) alone;
        without, they are (n - 1)(a + b j) in the joint fit.
        No coefficient is clamped: a step that comes out shrinking with the batch, or taking
        less than no time, is reported as fitted and kept out of use by :meth:`get`'s gate (a
        clamped intercept would read as "no batching gain" and mislead the queue model).
        """
        w, ft = self._whole, self._first
        data, vec, syy = w.info + ft.info, w.vec + ft.vec, w.syy + ft.syy
        if steps is not None and len(self._offsets):
            nn, ny, nx = self._offsets[:, 0], self._offsets[:, 1], self._offsets[:, 2:]
            data = w.info.copy()
            data[:3, :3] += ft.info[:3, :3]
            vec = w.vec.copy()
            vec[:3] += ft.vec[:3] - steps @ nx
            syy = w.syy + ft.syy - 2.0 * float(steps @ ny) + float((steps * steps) @ nn)
        prior = np.diag([OWN_WAIT_PRIOR_INFORMATION, *[PRIOR_INFORMATION] * 4])
        cov = np.asarray(np.linalg.inv(data + prior), dtype=np.float64)
        theta = cov @ (vec + prior @ self._prior)
        # Weighted residual sum of squares: y'Wy - 2 theta'v + theta' I theta (data part only).
        rss = syy - 2.0 * float(theta @ vec) + float(theta @ data @ theta)
        dof = w.samples + ft.samples - 5
        sigma2 = max(rss, 0.0) / dof if dof > 0 else math.inf
        return theta, cov, sigma2

    def _condition(self) -> float:
        """Condition number of the data's information on (a, b): large when the occupancies
        seen do not tell the intercept from the slope (every gap at one occupancy, say),
        however small the jitter."""
        block = (self._whole.info + self._first.info)[3:, 3:]
        if not np.all(np.isfinite(block)) or block[0, 0] <= 0 or block[1, 1] <= 0:
            return math.inf
        scale = np.sqrt(np.diag(block))
        eig = np.linalg.eigvalsh(block / np.outer(scale, scale))
        return float(eig[-1] / eig[0]) if eig[0] > 0 else math.inf

    def _level_line(self) -> tuple[float, float, NDArray[np.float64], float, tuple[float, ...]] | None:
        """The line a + b j through the mean step of each occupancy with at least
        ``MIN_LEVEL_GAPS`` gaps and a mean known within ``LEVEL_MAX_REL_STDERR``, every level
        weighing the same: (a, b, their covariance from
        each level's own variance, the condition number of the levels' design). A negative
        intercept within ``NOISE_Z`` standard errors of 0, or within ``max_rel_stderr`` of the
        first level's step, is the constrained fit's 0 (the line refitted through the origin);
        so is a negative slope within its noise; a coefficient more negative than that stays,
        and keeps the fit out of use. With one such
        level, the configured line scaled through it (the slope unidentified: infinite
        covariance and condition); ``None`` with none. Last, the mean steps of the levels
        used from one sequence up without a gap (empty when occupancy 1 is not one of them)."""
        lv = self._levels
        use = (lv[:, 3] >= MIN_LEVEL_GAPS) & (lv[:, 0] > 0) if len(lv) else np.zeros(0, dtype=bool)
        if use.any():  # and each level's mean pinned down: a few stray gaps at a rare occupancy wait
            sxx, sxy, syy, count = lv.T
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = sxy / sxx
                se = np.sqrt(np.maximum(syy - sxy * mean, 0.0) / np.maximum(count - 1.0, 1.0) / sxx)
                use &= se <= LEVEL_MAX_REL_STDERR * mean
        if not use.any():
            return None
        sxx, sxy, syy, count = lv[use].T
        j = np.nonzero(use)[0] + 1.0
        tau = sxy / sxx
        run = int(np.argmin(np.append(use, False)))  # levels 1..run all used
        levels = tuple(float(v) for v in tau[:run])
        if len(j) == 1:
            at = self.base_s + self.per_seq_s * j[0]
            a, b = (self.base_s * tau[0] / at, self.per_seq_s * tau[0] / at) if at > 0 else (0.0, tau[0] / j[0])
            return float(a), float(b), np.full((2, 2), math.inf), math.inf, levels
        var = np.maximum(syy - sxy * tau, 0.0) / np.maximum(count - 1.0, 1.0) / sxx
        x = np.column_stack([np.ones_like(j), j])
        gram = x.T @ x
        weights = np.linalg.solve(gram, x.T)  # theta = weights @ tau
        a, b = (float(v) for v in weights @ tau)
        cov = np.asarray((weights * var) @ weights.T, dtype=np.float64)
        slack = max(NOISE_Z * math.sqrt(max(cov[0, 0], 0.0)), self.max_rel_stderr * float(tau[0]))
        if a < 0 and (len(levels) >= 2 or a + slack >= 0):
            # Within noise of 0, or a tenth of tau(1) (an engine whose step is about
            # proportional to the batch, which a line through the levels misses by that much),
            # or whatever its size where the levels from one sequence up carry the step (a
            # concave step's line through its busy levels; the line only reaches above them):
            # the least squares line under a >= 0, through the origin; a's own uncertainty stays.
            a, b = 0.0, float(j @ tau / (j @ j))
            cov = np.diag([cov[0, 0], float((j * j) @ var / (j @ j) ** 2)])
        elif b < 0 <= b + NOISE_Z * math.sqrt(max(cov[1, 1], 0.0)):
            a, b = float(tau.mean()), 0.0  # a step that does not grow with the batch
            cov = np.diag([float(var.sum() / len(var) ** 2), cov[1, 1]])
        scale = np.sqrt(np.diag(gram))
        eig = np.linalg.eigvalsh(gram / np.outer(scale, scale))
        return a, b, cov, float(eig[-1] / eig[0]) if eig[0] > 0 else math.inf, levels

    def get(self, now: float | None = None) -> StepEstimate:
        """The estimate at ``now`` (default: the last update); it forgets per request, so it
        reads the same at any later time. Before the fit counts, the coefficients are still
        the fitted ones (the configured values where the data say nothing), with ``fitted``
        false."""
        if now is not None:
            check_time(now, self._last)
        if self._cached is not None:
            return self._cached
        line = self._level_line()
        steps = None
        if line is not None and len(self._offsets):  # the first events' steps read off the gaps
            steps = _step_times(line[0], line[1], line[4], np.arange(1.0, len(self._offsets) + 1.0))
        theta, cov, sigma2 = self._solve(steps)
        c, o, p, a, b = (float(v) for v in theta)
        p /= TOKEN_SCALE
        levels: tuple[float, ...] = ()
        if line is not None:  # the token gaps set the step
            a, b, cov_ab, condition, levels = line
        elif math.isfinite(sigma2):
            cov_ab = sigma2 * cov[3:, 3:]
            condition = self._condition()
        else:
            cov_ab = np.full((2, 2), math.inf)
            condition = math.inf
        se_a = math.sqrt(max(cov_ab[0, 0], 0.0))
        se_b = math.sqrt(max(cov_ab[1, 1], 0.0))
        se_tau1 = math.sqrt(max(cov_ab[0, 0] + 2 * cov_ab[0, 1] + cov_ab[1, 1], 0.0))
        tau1 = a + b
        limit = self.max_rel_stderr * tau1
        # Read per occupancy from one sequence up, the step needs no line below its last level:
        # each level is pinned down by its own gate, and the line (its slope) only reaches above.
        by_levels = len(levels) >= 2
        fitted = (
            self._requests >= self.min_samples
            and a >= 0
            and b >= 0
            and tau1 > 0
            and se_b <= limit
            and (
                by_levels
                or (
                    se_tau1 <= limit
                    and se_a <= limit  # the batching gain rests on the intercept
                    and condition <= MAX_CONDITION
                )
            )
        )
        est = StepEstimate(a, b, o, p, se_a, se_b, self._requests, self._gaps, fitted, levels, c)
        self._cached = est
        return est

    @property
    def last_update(self) -> float | None:
        """Time of the last finished request (``None`` before any)."""
        return self._last

    @property
    def count(self) -> int:
        """Finished requests seen."""
        return self._requests
