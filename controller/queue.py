"""Queue models: the paper's M/G/1 and a continuous-batching engine with ``slots`` (DESIGN.md 1).

A queue model turns the first two moments (m1, m2) of the service time into the mean system
time E[T]. Both models here are affine in m2,

    E[T] = Ta(m1) + m2 Tb(m1),

so the structured solver's reduction to two scalars carries over. A model gives, at an
arrival rate lambda and a mean m1, ``Ta``, ``Tb`` and their first two derivatives in m1
(:class:`QueueTerms`), its load ``rho = kappa m1 + rho0`` (stable while below one; the
margin ``rho_max`` applies to it; ``rho0`` is 0 but for a batching engine whose prefills
pause the batch) and the mean number in service.

Service times are measured as the time a request would take alone on the engine (for a
batching engine: its prefill plus its decode steps at one sequence, ``tau(1)`` each).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple, Protocol

import numpy as np
from scipy.special import gammaln

#: Engines with at most this many slots sum their chain in Python floats, term by term
#: (faster than numpy's per-call overhead there; the terms u^n prod g / n! stay below e^u,
#: u < slots, far from overflow); larger ones in log space with numpy.
SCALAR_MAX_SLOTS = 24
#: The term-by-term sum stops once a term falls below this share of the sum while the terms
#: shrink at least twofold each (what is left, the queue's tail included, is below it too).
NEGLIGIBLE = 1e-20

#: Below this u = lambda m1 the second derivatives of the batching chain are taken at this u
#: (their closed form cancels there); the error it leaves is below 1e-9 relative.
SMALL_LOAD = 1e-6


class QueueTerms(NamedTuple):
    """``E[T] = ta + m2 tb`` at one (lambda, m1), with the derivatives of both in m1.

    A named tuple (immutable): the solvers make one per iteration, and a frozen dataclass
    costs several times as much to build.
    """

    ta: float
    ta1: float
    ta2: float
    tb: float
    tb1: float
    tb2: float

    def system_time(self, m2: float) -> float:
        """E[T] for second moment ``m2``."""
        return self.ta + m2 * self.tb

    def d_m1(self, m2: float) -> float:
        """dE[T]/dm1."""
        return self.ta1 + m2 * self.tb1

    def d_m1_m1(self, m2: float) -> float:
        """d2E[T]/dm1^2 (d2E[T]/dm1 dm2 is ``tb1`` and d2E[T]/dm2^2 is 0)."""
        return self.ta2 + m2 * self.tb2


class QueueModel(Protocol):
    """What the solvers need of a queue."""

    @property
    def slots(self) -> int: ...

    def load_factor(self) -> float:
        """``rho / (lambda m1)``: 1 for M/G/1, ``tau(c) / (c tau(1))`` for a batching engine."""
        ...

    def load_offset(self, lam: float) -> float:
        """The part of the load that does not scale with m1: ``rho = lambda m1 load_factor +
        load_offset(lambda)`` (0 but for a batching engine whose prefills pause the batch)."""
        ...

    def terms(self, lam: float, m1: float) -> QueueTerms:
        """Ta, Tb and their derivatives at (lambda, m1); only called while ``rho < 1``."""
        ...

    def occupancy(self, lam: float, m1: float) -> float:
        """Mean number of requests in service, E[min(N, c)] (while ``rho < 1``)."""
        ...

    def record(self) -> dict[str, Any]:
        """A JSON-able description that :func:`queue_from_record` reads back."""
        ...


@dataclass(frozen=True)
class MG1:
    """The paper's single FIFO server: Pollaczek-Khinchine, E[T] = m1 + lambda m2 / (2 (1 - rho))."""

    @property
    def slots(self) -> int:
        return 1

    def load_factor(self) -> float:
        return 1.0

    def load_offset(self, lam: float) -> float:
        return 0.0

    def terms(self, lam: float, m1: float) -> QueueTerms:
        if lam == 0.0:
            return QueueTerms(m1, 1.0, 0.0, 0.0, 0.0, 0.0)
        s = 1.0 - lam * m1
        tb = lam / (2.0 * s)
        return QueueTerms(m1, 1.0, 0.0, tb, tb * lam / s, 2.0 * tb * (lam / s) ** 2)

    def occupancy(self, lam: float, m1: float) -> float:
        return lam * m1

    def record(self) -> dict[str, Any]:
        return {"model": "mg1", "slots": 1}


#: ``BatchingEngine.overlap`` where nothing says otherwise: the share of its decode that a
#: request prefilled with another runs beside it, for exponential work (as the chain reads it).
EXPONENTIAL_OVERLAP = 0.5


class _Chain:
    """The birth-death chain of a batching engine (:class:`BatchingEngine`'s notes) for the
    slowdowns ``g(1..c)``: its moments at u = lambda m1, and the terms at (lambda, m1).
    ``stretch``: the factor on the work it is fed (1 but for a shifted chain)."""

    __slots__ = ("coef", "g", "load_factor", "n", "powers", "ratios", "slots", "stretch")

    def __init__(self, g: Any, stretch: float = 1.0) -> None:
        c = int(g.size)
        n = np.arange(c, dtype=float)
        self.slots = c
        self.g = g
        self.stretch = stretch
        # ln of prod_{i<=n} g(i) / n! for n = 0..c
        self.coef = np.concatenate([[0.0], np.cumsum(np.log(g))]) - gammaln(np.arange(c + 1) + 1.0)
        self.n = np.arange(c + 1, dtype=float)
        self.powers = np.stack([np.ones(c), n, n * n, n * n * n], axis=1)
        self.load_factor = float(g[-1]) / c
        self.ratios = (g / np.arange(1, c + 1)).tolist()  # w_n / w_{n-1} = u g(n) / n

    def moments(self, u: float) -> tuple[float, ...]:
        """E of 1-normalised statistics: N, N^2, m, mN, mN^2, q, qN, qN^2 (m = min(N, c), q = (N - c)+)."""
        c = self.slots
        sigma = u * self.load_factor
        if c <= SCALAR_MAX_SLOTS:
            # w_n / w_{n-1} = u g(n) / n falls with n: past the mode the terms only shrink.
            w = 1.0
            p0, p1, p2, p3 = 1.0, 0.0, 0.0, 0.0
            cut = False
            for n, r in enumerate(self.ratios[:-1], start=1):
                ratio = u * r
                w *= ratio
                wn = w * n
                p0 += w
                p1 += wn
                wn *= n
                p2 += wn
                p3 += wn * n
                if ratio < 0.5 and w < NEGLIGIBLE * p0:
                    cut = True
                    break
            wc = 0.0 if cut else w * u * self.ratios[-1]
        else:
            log_w = self.coef + self.n * math.log(u)
            ws = np.exp(log_w - log_w.max())
            p0, p1, p2, p3 = (ws[:c] @ self.powers).tolist()
            wc = float(ws[c])
        s0 = 1.0 / (1.0 - sigma)
        s1 = sigma * s0 * s0
        s2 = sigma * (1.0 + sigma) * s0**3
        s3 = sigma * (1.0 + 4.0 * sigma + sigma * sigma) * s0**4
        tail0, tail1, tail2 = s0, c * s0 + s1, c * c * s0 + 2 * c * s1 + s2  # sum sigma^j N^k, N = c + j
        z = p0 + wc * tail0
        e_n = (p1 + wc * tail1) / z
        e_n2 = (p2 + wc * tail2) / z
        e_m = (p1 + c * wc * tail0) / z
        e_mn = (p2 + c * wc * tail1) / z
        e_mn2 = (p3 + c * wc * tail2) / z
        e_q = wc * s1 / z
        e_qn = wc * (c * s1 + s2) / z
        e_qn2 = wc * (c * c * s1 + 2 * c * s2 + s3) / z
        return e_n, e_n2, e_m, e_mn, e_mn2, e_q, e_qn, e_qn2

    def derivs(self, u: float) -> tuple[float, float, float, float, float, float]:
        """A(u) = E[min(N, c)], H(u) = E[(N - c)+] / (2 u^2), and their first two u-derivatives."""
        e_n, e_n2, e_m, e_mn, e_mn2, e_q, e_qn, e_qn2 = self.moments(u)
        var_n = e_n2 - e_n * e_n
        # D = u d/du: D E[X] = Cov(X, N), so D^2 E[X] = D E[XN] - D E[X] E[N] - E[X] Var N.
        da = e_mn - e_m * e_n
        d2a = (e_mn2 - e_mn * e_n) - da * e_n - e_m * var_n
        # With <X> = E[X] / u^2: D<X> = <X (N - 2)> - <X> E[N] (no cancellation at small u).
        h0, h1, h2 = e_q, e_qn - 2.0 * e_q, e_qn2 - 4.0 * e_qn + 4.0 * e_q
        dh = h1 - h0 * e_n
        d2h = h2 - h1 * e_n - dh * e_n - h0 * var_n
        uu = u * u
        return e_m, da / u, (d2a - da) / uu, h0 / (2 * uu), dh / (2 * uu * u), (d2h - dh) / (2 * uu * uu)

    def terms(self, lam: float, m1: float) -> QueueTerms:
        if lam == 0.0 or m1 == 0.0:
            # Alone on the engine: E[T] = m1, and the chain's slopes at u = 0.
            if self.slots == 1:
                return MG1().terms(lam, m1)
            return QueueTerms(m1, 1.0, lam * 2.0 * (float(self.g[1]) - 1.0), 0.0, 0.0, 0.0)
        u = lam * m1
        a, a1, a2, h, h1, h2 = self.derivs(u)
        if u < SMALL_LOAD:  # the second derivatives' closed form cancels: take them a bit higher
            higher = self.derivs(SMALL_LOAD)
            a2, h2 = higher[2], higher[5]
        return QueueTerms(a / lam, a1, lam * a2, lam * h, lam * lam * h1, lam**3 * h2)


@dataclass(frozen=True)
class BatchingEngine:
    """A continuous-batching engine: ``slots`` sequences at once, step time ``a + b j``.

    Parameters
    ----------
    slots
        c: sequences in service at once (vLLM ``max_num_seqs``, SGLang
        ``max_running_requests``, ``llama-server --parallel``); later arrivals wait in FIFO.
    step_base_s, step_per_seq_s
        a and b of the step time ``tau(j) = a + b j`` with j sequences in service.
    step_levels_s
        The step measured at occupancies 1, 2, ..., k (seconds), where it is known: a real
        engine's step is not a line (llama-server's rises 6.5, 17.3, 25.2, 27.9 ms at 1-4
        sequences, and a line through them misses tau(1) by 29 %). ``tau(j)`` is the level for
        ``j <= k`` and the line above, but not below the last level (:func:`step_times`).
        Empty: the line alone.
    prefill_s
        The mean prefill, seconds (part of m1): the time the engine takes to read a prompt,
        during which the other sequences on its replica get no token (the engine pauses the
        batch for it, or runs it in a step that takes as long). 0: the prefill is read as work
        shared with the batch like the decode steps.
    overlap
        With a prefill that pauses the batch: the share of a request's decode during which one
        of the requests prefilled with it decodes too, ``E[min(D, D')] / E[D]``, 1/2 for
        exponential work (as the chain reads it) and 1 for equal work. Its two-moment reading
        ``1 / (1 + C^2)`` of the decode work is what ``thinkcap serve`` passes (the caps in
        force give C^2); read as 1/2 there, the model fell 7 % short on the demo's engine.

    Notes
    -----
    A request whose service takes ``t`` seconds alone takes ``t g(j)`` at a constant
    occupancy j, ``g(j) = tau(j) / tau(1)``. The number in system N is a birth-death chain
    with birth rate lambda and death rate ``min(n, c) / (m1 g(min(n, c)))``: its distribution
    is ``P(n) ~ u^n prod_{i<=n} g(i) / n!`` up to c and geometric above, with ratio
    ``sigma = u g(c) / c``, ``u = lambda m1``. Then

        E[T] = E[min(N, c)] / lambda + ((1 + C^2) / 2) E[(N - c)+] / lambda,

    Allen-Cunneen's correction of the waiting part for the squared coefficient of variation
    ``C^2 = m2 / m1^2 - 1`` of the work (the chain is exact for exponential work). It is
    affine in m2: ``Ta = A(u) / lambda``, ``Tb = lambda B(u) / (2 u^2)``, with
    ``A = E[min(N, c)]`` and ``B = E[(N - c)+]``. The load is ``rho = sigma``. The derivatives
    come from the chain being an exponential family in ``ln u``: ``u dE[X]/du = Cov(X, N)``.
    With one slot it is Pollaczek-Khinchine exactly, whatever the step.

    A ``pool`` of replicas (their slots, summing to ``slots``; each with the same step) is
    read as one engine whose n requests in service are spread as a least-loaded router
    spreads them (:func:`spread`): a sequence on replica r advances at ``1 / tau(n_r)``, so
    ``g(n) = n / (tau(1) sum_r n_r / tau(n_r))``. With equal replicas of one slot each it is
    M/G/c with Allen-Cunneen's correction.

    A prefill P that pauses the batch (``prefill_s``) is time a request spends alone, and it
    holds up the others. The prefills on a replica queue as M/D/1 at the load ``s = lambda P
    f`` (f: the largest replica's share of the slots, 1 for one engine): a request waits
    ``W = s P / (2 (1 - s))`` for the prefills ahead, reads its prompt, and starts decoding
    once the prefills of those that arrived meanwhile are done, ``(P + W) / (1 - s)`` after
    it arrived. Its decode work ``D = m1 - P`` is stretched by the prefills that pause it:
    ``D / (1 - s)``. And the requests prefilled in one run start decoding together: a
    request shares its run with ``C = s (2 - s) / (1 - s)^2`` others on average (the
    size-biased Borel count, less itself), whose decode runs beside its own for the share
    ``h`` (``overlap``) of it. The chain reads them as ``g(min(n + h C, c))`` in place of
    g(n): on the slowdowns ``g(n + h C) / g(1 + h C)`` with the work stretched by
    ``phi = g(1 + h C)``, so the load is unchanged. Then ``E[T] = (P + W) / (1 - s) +
    Ta(m') + m2' Tb(m')``, ``m' = phi D / (1 - s)``, ``m2' = phi^2 (m2 - 2 P m1 + P^2) /
    (1 - s)^2``: still affine in m2, its slopes by the chain rule. The load is ``lambda (P f
    + kappa (m1 - P))`` (kappa the load factor), the chain's stability bound: its part that
    does not scale with m1 is :meth:`load_offset`.
    With one slot per replica nothing else is in service during a prefill, and the pause
    changes nothing.

    Examples
    --------
    >>> q = BatchingEngine(slots=4, step_base_s=0.015, step_per_seq_s=0.0065)
    >>> round(q.load_factor(), 4)  # tau(4) / (4 tau(1)) = 0.041 / 0.086
    0.4767
    """

    slots: int
    step_base_s: float
    step_per_seq_s: float
    pool: tuple[int, ...] = ()
    step_levels_s: tuple[float, ...] = ()
    prefill_s: float = 0.0
    overlap: float = EXPONENTIAL_OVERLAP
    _g: Any = field(init=False, repr=False, compare=False)
    _chain: _Chain = field(init=False, repr=False, compare=False)
    _taus: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        c = self.slots
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"slots: must be an integer >= 1, got {c!r}")
        if self.pool and (sum(self.pool) != c or min(self.pool) < 1):
            raise ValueError(f"pool: replica slots must be >= 1 and sum to slots = {c}, got {self.pool!r}")
        for key, value in (("step.base_s", self.step_base_s), ("step.per_seq_s", self.step_per_seq_s)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{key}: must be a finite number >= 0, got {value!r}")
        if self.step_base_s + self.step_per_seq_s <= 0 and not self.step_levels_s:
            raise ValueError("step: base_s + per_seq_s must be > 0 (a step takes time)")
        p = self.prefill_s
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p < math.inf:
            raise ValueError(f"prefill_s: must be a finite number >= 0, got {p!r}")
        h = self.overlap
        if isinstance(h, bool) or not isinstance(h, int | float) or not 0 < h <= 1:
            raise ValueError(f"overlap: must be a number in (0, 1], got {h!r}")
        for value in self.step_levels_s:
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ValueError(f"step.levels_s: each must be a finite number > 0, got {value!r}")
        j = np.arange(1, c + 1, dtype=float)
        taus = step_times(c, self.step_base_s, self.step_per_seq_s, self.step_levels_s)
        object.__setattr__(self, "_taus", taus)
        g = j / (taus[0] * pool_rate(self.pool, taus)) if len(self.pool) > 1 else taus / taus[0]
        object.__setattr__(self, "_g", g)
        object.__setattr__(self, "_chain", _Chain(g))

    @property
    def batches(self) -> bool:
        """Whether a replica runs more than one sequence at once (else each is a FIFO server)."""
        return max(self.pool, default=self.slots) > 1

    def slowdown(self, j: Any) -> Any:
        """g(j): how much slower a sequence advances with j in service (``tau(j) / tau(1)`` on one engine)."""
        if len(self.pool) > 1:
            return self._g[np.asarray(j, dtype=int) - 1]
        if self.step_levels_s:
            return np.interp(j, np.arange(1, self.slots + 1), self._taus) / self._taus[0]
        a, b = self.step_base_s, self.step_per_seq_s
        return (a + b * j) / (a + b)

    @property
    def taus(self) -> Any:
        """tau(1..slots), seconds, as the model reads them (:func:`step_times`)."""
        return self._taus

    def step_time(self, j: float) -> float:
        """tau(j), seconds: the measured level, or the line a + b j (see ``step_levels_s``)."""
        if self.step_levels_s:
            return float(np.interp(j, np.arange(1, self.slots + 1), self._taus))
        return self.step_base_s + self.step_per_seq_s * j

    def load_factor(self) -> float:
        return self._chain.load_factor

    def _pause(self) -> tuple[float, float]:
        """(P, f): the prefill that pauses a replica's batch, and the largest replica's share of
        the slots (P = 0 where a replica runs one sequence)."""
        if not self.batches or self.prefill_s == 0.0:
            return 0.0, 1.0
        return float(self.prefill_s), max(self.pool) / self.slots if self.pool else 1.0

    def load_offset(self, lam: float) -> float:
        p, f = self._pause()
        return lam * p * (f - self._chain.load_factor)

    def _paused(self, lam: float, m1: float) -> tuple[float, float, float, float, _Chain] | None:
        """A prefill that pauses the batch, at rate ``lam`` (the class notes): P, the wait W
        for the prefills ahead, the time ``(P + W) / (1 - s)`` from arrival to the end of the
        prefills that hold up the decode's start, the stretch k of the decode work and the
        chain the decode runs in. ``None`` where nothing pauses (no prefill, or no arrivals)."""
        p, f = self._pause()
        p = min(p, m1)
        if p == 0.0 or lam == 0.0:
            return None
        s = lam * p * f
        r = 1.0 - s
        shift = self.overlap * s * (2.0 - s) / (r * r)  # the companions, for the share they overlap
        chain = _shifted_chain(self, shift)
        wait = s * p / (2.0 * r)
        return p, wait, (p + wait) / r, chain.stretch / r, chain

    def terms(self, lam: float, m1: float) -> QueueTerms:
        paused = self._paused(lam, m1)
        if paused is None:
            return self._chain.terms(lam, m1)
        # The chain on the stretched decode work m' = k (m1 - P), m2' = k^2 (m2 - 2 P m1 + P^2).
        p, _, before, k, chain = paused
        t = chain.terms(lam, k * (m1 - p))
        kk = k * k
        c = (p * p - 2.0 * p * m1) * kk
        return QueueTerms(
            before + t.ta + c * t.tb,
            k * (t.ta1 + c * t.tb1) - 2.0 * p * kk * t.tb,
            kk * (t.ta2 + c * t.tb2) - 4.0 * p * kk * k * t.tb1,
            kk * t.tb,
            kk * k * t.tb1,
            kk * kk * t.tb2,
        )

    def occupancy(self, lam: float, m1: float) -> float:
        if lam == 0.0 or m1 == 0.0:
            return 0.0
        paused = self._paused(lam, m1)
        if paused is None:
            return self._chain.moments(lam * m1)[2]
        # The chain's sequences in decode, and (Little) those from their slot to their decode:
        # their own prefill and the prefills behind it.
        p, wait, before, k, chain = paused
        decode = k * (m1 - p)
        return (chain.moments(lam * decode)[2] if decode > 0.0 else 0.0) + lam * (before - wait)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": "batching",
            "slots": self.slots,
            "step_base_s": self.step_base_s,
            "step_per_seq_s": self.step_per_seq_s,
        }
        if self.pool:
            out["pool"] = list(self.pool)
        if self.step_levels_s:
            out["step_levels_s"] = list(self.step_levels_s)
        if self.prefill_s:
            out["prefill_s"] = self.prefill_s
        if self.overlap != EXPONENTIAL_OVERLAP:
            out["overlap"] = self.overlap
        return out


@lru_cache(maxsize=64)
def _shifted_chain(engine: BatchingEngine, shift: float) -> _Chain:
    """The chain a request decodes in when ``shift`` more sequences run beside it than the
    time average says (those whose prefills ran with its own): ``g(min(n + shift, c))``,
    read as the work stretched by ``g(1 + shift)`` on the slowdowns ``g(n + shift) / g(1 +
    shift)``; the load ``u g(c) / c`` is unchanged."""
    c = engine.slots
    j = np.arange(1, c + 1, dtype=float)
    g = np.interp(np.minimum(j + shift, c), j, engine._g)
    first = float(g[0])
    return _Chain(g / first, first)


@lru_cache(maxsize=64)
def _fill_order(pool: tuple[int, ...]) -> tuple[tuple[int, ...], Any]:
    """The replica each of the ``sum(pool)`` requests goes to as a least-loaded router fills
    ``pool`` one request at a time, and that replica's count after it (one heap, O(c log R))."""
    heap = [(0.0, i) for i in range(len(pool))]
    counts = [0] * len(pool)
    order: list[int] = []
    after: list[int] = []
    for _ in range(sum(pool)):
        _, r = heapq.heappop(heap)
        counts[r] += 1
        order.append(r)
        after.append(counts[r])
        if counts[r] < pool[r]:
            heapq.heappush(heap, (counts[r] / pool[r], r))
    counts_after = np.asarray(after, dtype=float)
    counts_after.flags.writeable = False
    return tuple(order), counts_after


def step_times(c: int, a: float, b: float, levels: tuple[float, ...] = ()) -> Any:
    """tau(1..c): the measured ``levels`` where there are some, above them the line ``a + b j``
    but not below the last level (a step does not shrink as the batch grows).

    >>> [round(float(v), 4) for v in step_times(5, 0.001, 0.007, (0.0065, 0.0173, 0.0252))]
    [0.0065, 0.0173, 0.0252, 0.029, 0.036]
    """
    j = np.arange(1, c + 1, dtype=float)
    taus = a + b * j
    k = min(len(levels), c)
    if k:
        taus[:k] = levels[:k]
        taus[k:] = np.maximum(taus[k:], levels[k - 1])
    return taus


def pool_rate(pool: tuple[int, ...], taus: Any) -> Any:
    """For n = 1..sum(pool) requests spread over ``pool`` (:func:`spread`), the pool's token
    rate ``sum_r n_r / tau(n_r)``, ``taus[k - 1] = tau(k)``: built incrementally, O(c) after
    the fill order (cached per pool); a replica with no request adds nothing.

    >>> [round(float(v), 6) for v in pool_rate((2, 2), step_times(2, 0.0, 0.01))]
    [100.0, 200.0, 200.0, 200.0]
    """
    _, n = _fill_order(pool)
    tau = np.asarray(taus, dtype=float)
    k = n.astype(int)
    before = tau[np.maximum(k - 2, 0)]
    # The increment of the chosen replica's term when its count goes from n - 1 to n.
    gained = n / tau[k - 1] - np.where(k > 1, (n - 1.0) / before, 0.0)
    return np.cumsum(gained)


def spread(n: int, pool: tuple[int, ...]) -> list[int]:
    """How a least-loaded router spreads ``n`` requests over replicas with ``pool`` slots: each
    goes to the replica with the fewest in service relative to its slots (the first on ties).

    >>> spread(5, (4, 4)), spread(3, (2, 4))
    ([3, 2], [1, 2])
    """
    order, _ = _fill_order(tuple(pool))
    out = [0] * len(pool)
    for r in order[: max(0, min(n, len(order)))]:
        out[r] += 1
    return out


def queue_from_record(record: dict[str, Any] | None) -> QueueModel:
    """The queue model a :meth:`QueueModel.record` describes (``None``: M/G/1, as old logs)."""
    if record is None or record.get("model", "mg1") == "mg1":
        return MG1()
    if record["model"] == "batching":
        return BatchingEngine(
            int(record["slots"]),
            float(record["step_base_s"]),
            float(record["step_per_seq_s"]),
            tuple(int(c) for c in record.get("pool", ())),
            tuple(float(v) for v in record.get("step_levels_s", ())),
            float(record.get("prefill_s", 0.0)),
            float(record.get("overlap", EXPONENTIAL_OVERLAP)),
        )
    raise ValueError(f"queue: unknown model {record['model']!r}")
