"""The per-type pass of the structured solver's joint Newton method, in two kernels.

One pass takes every type's projected Newton step at the current prices (DESIGN.md 1,
solver 3) and returns the sums that the 2x2 price system needs; a second call moves the
caps along their linearisation in the price step. :class:`ArraySweep` does this with numpy
and suits any N; :class:`ScalarSweep` does it with Python floats, which is several times
faster for a handful of types, where numpy's cost per call dominates. Both compute the same
quantities, up to rounding.

With ``gs = gamma sigma``, type k's step is the Newton step of
``f(l) = b l + ln(theta + gs (t0 + c l)) - ln K`` projected onto its box, and
``dl/dtheta = -1 / (b (theta + gs t) + gs c)`` inside the box (zero on a bound). A type with
no gain (``w A b = 0``) is fixed at its minimum, one with free tokens (``c = 0``) at its
maximum.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from thinkcap.controller.problem import Array, Problem

#: Up to this many types the solver uses :class:`ScalarSweep`; measured in
#: ``bench/solver.py --kernels``.
SCALAR_MAX_TYPES = 20

#: Which kernel to use: ``"auto"`` picks by size, the others force one (for tests and benches).
Kernel = Literal["auto", "scalar", "array"]
KERNELS: tuple[Kernel, ...] = ("auto", "scalar", "array")

#: ``(m1, m2, j, jt, jtt, step)`` after a pass: ``m1 = pi . t`` and ``m2 = pi . t^2`` at the
#: new caps (``m2`` without the variance term), ``j``, ``jt`` and ``jtt`` the dot products of
#: ``pi c``, ``pi c t`` and ``pi c t^2`` with ``dl/dtheta``, and ``step`` the largest change
#: of a cap in the pass, in tokens.
Sums = tuple[float, float, float, float, float, float]


def fixed_caps(p: Problem) -> tuple[NDArray[np.bool_], Array, Array]:
    """``(fixed, fixed_to, log_k)`` per type: which caps are fixed in closed form, where, and
    ``ln K = ln(w A b / c)`` (0 where fixed)."""
    wab = p.weight * p.gain * p.rate
    no_gain = wab <= 0
    fixed = no_gain | ((p.c <= 0) & ~no_gain)
    log_k = np.zeros(p.size)
    ok = ~fixed
    log_k[ok] = np.log(wab[ok] / p.c[ok])
    fixed_to: Array = np.where(no_gain, p.lo, p.hi)
    return fixed, fixed_to, log_k


class ArraySweep:
    """The pass over numpy arrays."""

    def __init__(self, p: Problem, x: Array) -> None:
        fixed, fixed_to, self.log_k = fixed_caps(p)
        if fixed.any():
            self.lower, self.upper = np.where(fixed, fixed_to, p.lo), np.where(fixed, fixed_to, p.hi)
        else:
            self.lower, self.upper = p.lo, p.hi
        self.p = p
        self.pc = p.prior * p.c
        self.pv = float(p.prior.dot(p.v))
        #: ``m1`` with every cap at its minimum and at its maximum (the boxes before fixing).
        self.m1_lo, self.m1_hi = float(p.prior.dot(p.t0 + p.c * p.lo)), float(p.prior.dot(p.t0 + p.c * p.hi))
        self.x = np.clip(x, self.lower, self.upper)
        self.xn = self.d_th = self.t = self.x

    def moments(self) -> tuple[float, float]:
        """``(m1, m2)`` of the current caps, ``m2`` with the variance term."""
        return self.p.moments(self.x)

    def newton(self, theta: float, gs: float, *, full: bool = True) -> Sums:
        """One projected Newton step of every type at the prices; ``full=False`` skips ``m2``,
        ``jt`` and ``jtt`` (returned as 0)."""
        p, x = self.p, self.x
        beta = gs * p.c
        arg = theta + gs * p.t0 + beta * x
        den = p.rate * arg + beta
        f = p.rate * x + np.log(arg) - self.log_k
        xn = np.minimum(np.maximum(x - f * arg / den, self.lower), self.upper)
        d_th = ((xn > self.lower) & (xn < self.upper)) / -den
        t = p.t0 + p.c * xn
        self.xn, self.d_th, self.t = xn, d_th, t
        m1 = float(p.prior.dot(t))
        j = float(self.pc.dot(d_th))
        step = float(np.maximum.reduce(np.abs(xn - x)))
        if not full:
            return m1, 0.0, j, 0.0, 0.0, step
        tt = t * t
        return m1, float(p.prior.dot(tt)), j, float((self.pc * t).dot(d_th)), float((self.pc * tt).dot(d_th)), step

    def advance(self, d_theta: float, d_t: float) -> None:
        """Caps after the price step: ``x = clip(xn + dl/dtheta (d_theta + d_t t))``."""
        move = d_theta if d_t == 0.0 else d_theta + d_t * self.t
        self.x = np.minimum(np.maximum(self.xn + self.d_th * move, self.lower), self.upper)

    def accept(self) -> None:
        """Keep the caps of the last pass."""
        self.x = self.xn

    def margin_price(self, time_budget: float) -> float:
        """A first guess of the price at which the caps fill the margin.

        With a small latency penalty (the margin binds) each cap's condition is nearly
        ``b l + ln(theta) = ln K``; returns the ``theta`` at which these caps, clipped to
        their boxes, give ``sum pi c l = time_budget`` (``nan`` if none). The same iteration
        as the scalar kernel's, over arrays.
        """
        p = self.p
        free = self.lower < self.upper
        a, b, pc = self.log_k[free], p.rate[free], self.pc[free]
        lo, hi = self.lower[free], self.upper[free]
        if a.size == 0:
            return math.nan
        budget = time_budget - float(self.pc[~free].dot(self.lower[~free]))
        u_lo, u_hi = float(np.min(a - b * hi)), float(np.max(a - b * lo))
        u = _interior_start(float(pc.dot(a / b)), float(pc.dot(1.0 / b)), budget, u_lo, u_hi)
        for _ in range(MARGIN_PRICE_MAXITER):
            raw = (a - u) / b
            inside = (raw > lo) & (raw < hi)
            gap = float(pc.dot(np.minimum(np.maximum(raw, lo), hi))) - budget
            slope = -float(pc.dot(inside / b))
            u, u_lo, u_hi, done = _margin_step(u, u_lo, u_hi, gap, slope, budget=budget)
            if done:
                break
        return math.exp(u) if -700.0 < u < 700.0 else math.nan

    def caps(self) -> Array:
        return self.x


class ScalarSweep:
    """The same pass over Python floats, for small N.

    :meth:`advance` only records the price step; the next pass (or :meth:`caps`) moves each
    cap along its linearisation as it reaches it, which saves a loop over the types.
    """

    def __init__(self, p: Problem, x: Array) -> None:
        self.prior, self.t0, self.c, self.rate = p.prior.tolist(), p.t0.tolist(), p.c.tolist(), p.rate.tolist()
        self.pv = math.fsum(a * b for a, b in zip(self.prior, p.v.tolist(), strict=True))
        lower: list[float] = []
        upper: list[float] = []
        fixed: list[bool] = []
        log_k: list[float] = []
        pc: list[float] = []
        last: list[tuple[float, float, float]] = []
        m1_lo = m1_hi = 0.0
        rows = zip(p.weight.tolist(), p.gain.tolist(), self.rate, self.c, self.prior, self.t0, p.lo.tolist(),
                   p.hi.tolist(), x.tolist(), strict=True)  # fmt: skip
        for w, a, b, c, pk, t0, box_lo, box_hi, x0 in rows:
            m1_lo += pk * (t0 + c * box_lo)
            m1_hi += pk * (t0 + c * box_hi)
            wab = w * a * b
            lo, hi, k = box_lo, box_hi, 0.0
            if wab <= 0.0:  # no gain: fixed at the minimum
                hi = lo
            elif c <= 0.0:  # free tokens: fixed at the maximum
                lo = hi
            else:
                k = math.log(wab / c)
            fixed.append(wab <= 0.0 or c <= 0.0)
            log_k.append(k)
            lower.append(lo)
            upper.append(hi)
            pc.append(pk * c)
            last.append((lo if x0 < lo else hi if x0 > hi else x0, 0.0, 0.0))
        self.fixed, self.log_k, self.pc, self.lower, self.upper = fixed, log_k, pc, lower, upper
        #: ``m1`` with every cap at its minimum and at its maximum (the boxes before fixing).
        self.m1_lo, self.m1_hi = m1_lo, m1_hi
        #: The constants of each type, in the order :meth:`newton` unpacks them.
        self.rows = list(zip(lower, upper, log_k, fixed, self.t0, self.c, self.rate, self.prior, pc, strict=True))
        #: Per type after the last pass: ``(xn, dl/dtheta, t)``. The caps are
        #: ``xn + dl/dtheta (d_theta + d_t t)``, clipped, with ``(d_theta, d_t) = self.move``.
        self.last = last
        self.move = (0.0, 0.0)

    def _caps(self) -> list[float]:
        a, b = self.move
        x = []
        for (xn, d, t), lo, hi in zip(self.last, self.lower, self.upper, strict=True):
            new = xn + d * (a + b * t)
            x.append(lo if new < lo else hi if new > hi else new)
        return x

    def moments(self) -> tuple[float, float]:
        """``(m1, m2)`` of the current caps, ``m2`` with the variance term."""
        m1 = m2 = 0.0
        for pk, t0, c, x in zip(self.prior, self.t0, self.c, self._caps(), strict=True):
            t = t0 + c * x
            m1 += pk * t
            m2 += pk * t * t
        return m1, m2 + self.pv

    def newton(self, theta: float, gs: float, *, full: bool = True) -> Sums:
        """See :meth:`ArraySweep.newton`; every sum is computed whatever ``full`` says."""
        log = math.log
        move_th, move_t = self.move
        out: list[tuple[float, float, float]] = []
        m1 = m2 = j = jt = jtt = step = 0.0
        for (x0, d0, t_0), (lo, hi, log_k, fixed, t0, c, b, pk, pc) in zip(self.last, self.rows, strict=True):
            xk = x0 + d0 * (move_th + move_t * t_0)  # the cap after the last price step
            if xk < lo:
                xk = lo
            elif xk > hi:
                xk = hi
            if fixed:
                new, d = lo, 0.0
            else:
                beta = gs * c
                arg = theta + gs * t0 + beta * xk
                den = b * arg + beta
                new = xk - (b * xk + log(arg) - log_k) * arg / den
                if new <= lo:
                    new, d = lo, 0.0
                elif new >= hi:
                    new, d = hi, 0.0
                else:
                    d = -1.0 / den
            t = t0 + c * new
            out.append((new, d, t))
            tt = t * t
            m1 += pk * t
            m2 += pk * tt
            q = pc * d
            j += q
            jt += q * t
            jtt += q * tt
            dx = new - xk if new > xk else xk - new
            if dx > step:  # noqa: PLR1730 - cheaper than a call to max() in this loop
                step = dx
        self.last = out
        self.move = (0.0, 0.0)
        return m1, m2, j, jt, jtt, step

    def advance(self, d_theta: float, d_t: float) -> None:
        """See :meth:`ArraySweep.advance` (applied lazily)."""
        self.move = (d_theta, d_t)

    def accept(self) -> None:
        self.move = (0.0, 0.0)

    def caps(self) -> Array:
        return np.array(self._caps())

    def margin_price(self, time_budget: float) -> float:
        """See :meth:`ArraySweep.margin_price`."""
        rows = []
        budget, sum_pca_b, sum_pc_b = time_budget, 0.0, 0.0
        for a, b, pc, lo, hi, fixed in zip(
            self.log_k, self.rate, self.pc, self.lower, self.upper, self.fixed, strict=True
        ):
            if fixed:
                budget -= pc * lo
            else:
                rows.append((a, b, pc, lo, hi))
                sum_pca_b += pc * a / b
                sum_pc_b += pc / b
        return _margin_price(rows, budget, sum_pca_b, sum_pc_b)


#: Iteration limit of the margin-price guess (it ends in a few on the right linear piece).
MARGIN_PRICE_MAXITER = 40


def _margin_step(
    u: float, u_lo: float, u_hi: float, gap: float, slope: float, *, budget: float
) -> tuple[float, float, float, bool]:
    """One bracketed Newton step on the falling piecewise-linear ``S(u) - budget`` (``gap``);
    done when the gap or the step is at rounding level."""
    if gap > 0.0:
        u_lo = u
    else:
        u_hi = u
    if abs(gap) <= 1e-12 * max(abs(budget), 1e-300):
        return u, u_lo, u_hi, True
    nxt = u - gap / slope if slope < 0.0 else math.nan
    if not u_lo < nxt < u_hi:
        nxt = 0.5 * (u_lo + u_hi)
    return nxt, u_lo, u_hi, abs(nxt - u) <= 1e-12 * max(1.0, abs(u))


def _interior_start(sum_pca_b: float, sum_pc_b: float, budget: float, u_lo: float, u_hi: float) -> float:
    """Where ``S(u) = budget`` if no cap sat on a bound (``S`` is then ``sum pc a / b - u sum pc / b``),
    or the bracket's midpoint if that lies outside it."""
    u = (sum_pca_b - budget) / sum_pc_b if sum_pc_b > 0.0 else math.nan
    return u if u_lo < u < u_hi else 0.5 * (u_lo + u_hi)


def _margin_price(
    rows: list[tuple[float, float, float, float, float]], budget: float, sum_pca_b: float, sum_pc_b: float
) -> float:
    """Solve ``sum pc clip((ln K - u) / b, lo, hi) = budget`` for ``u`` and return ``e^u``.

    The left side falls piecewise linearly in ``u``; Newton's method on it, kept inside a
    bracket and started where no cap would sit on a bound (``sum_pca_b = sum pc ln K / b``,
    ``sum_pc_b = sum pc / b``), ends on the exact root once it reaches the right piece. ``nan``
    if there is none.
    """
    if not rows:
        return math.nan
    u_lo = min(a - b * hi for a, b, _, _, hi in rows)  # every cap at its maximum
    u_hi = max(a - b * lo for a, b, _, lo, _ in rows)  # every cap at its minimum
    u = _interior_start(sum_pca_b, sum_pc_b, budget, u_lo, u_hi)
    for _ in range(MARGIN_PRICE_MAXITER):
        total = slope = 0.0
        for a, b, pc, lo, hi in rows:
            cap = (a - u) / b
            if cap <= lo:
                total += pc * lo
            elif cap >= hi:
                total += pc * hi
            else:
                total += pc * cap
                slope -= pc / b
        u, u_lo, u_hi, done = _margin_step(u, u_lo, u_hi, total - budget, slope, budget=budget)
        if done:
            break
    return math.exp(u) if -700.0 < u < 700.0 else math.nan


def use_scalar(n: int, kernel: Kernel = "auto") -> bool:
    """Whether ``kernel`` means the scalar kernel for ``n`` types."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    return kernel == "scalar" or (kernel == "auto" and n <= SCALAR_MAX_TYPES)


def make_sweep(p: Problem, x: Array, kernel: Kernel = "auto") -> ArraySweep | ScalarSweep:
    """The pass for the problem (by default the faster kernel for its size), started at ``x``."""
    return ScalarSweep(p, x) if use_scalar(p.size, kernel) else ArraySweep(p, x)
