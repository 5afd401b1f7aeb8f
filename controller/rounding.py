"""Integer caps from a continuous optimum (paper: nearest rounding; ext: neighbour search)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from thinkcap.controller.kkt import lipschitz_bound
from thinkcap.controller.problem import Array, Problem

#: Neighbour search enumerates all floor/ceil combinations up to this many fractional types.
EXHAUSTIVE_MAX_TYPES = 12
#: Greedy coordinate passes at most.
GREEDY_MAX_PASSES = 50


@dataclass(frozen=True)
class Rounded:
    """Integer caps and what rounding cost.

    Attributes
    ----------
    caps
        Integer caps, one per type, inside F.
    fun
        Objective at the caps.
    loss
        ``U(x*) - U(caps) >= 0``: the objective lost to integrality.
    bound
        A-priori bound on the loss of any floor/ceil rounding inside F
        (:func:`rounding_bound`); the neighbour search never loses more than nearest rounding.
    method
        ``"nearest"`` or ``"neighbour"``.
    """

    caps: NDArray[np.int64]
    fun: float
    loss: float
    bound: float
    method: str


def rounding_bound(p: Problem, x: Array) -> float:
    """A-priori bound on ``U(x) - U(r)`` for every floor/ceil rounding r of x that lies in F.

    Notes
    -----
    By the L-smoothness of U on the segment from x to r (inside F, which is convex),
    ``U(x) - U(r) <= -grad U(x) . (r - x) + (L / 2) ||r - x||^2
    <= sum_k |g_k| d_k + (L / 2) sum_k d_k^2`` with ``d_k = max(f_k, 1 - f_k)`` the largest
    move of a fractional cap (``f_k`` its fractional part; 0 for integral caps) and L bounded
    over the box ``[floor(x), ceil(x)]`` cut by the margin. Both roundings here return such
    an r; nearest rounding moves by at most 1/2 unless the margin forces a floor.
    """
    f = x - np.floor(x)
    d = np.where(f > 1e-12, np.maximum(f, 1.0 - f), 0.0)
    if not np.any(d):
        return 0.0
    g = p.gradient(x)
    lip = lipschitz_bound(p, np.floor(x), np.ceil(x))
    return float(np.abs(g) @ d + 0.5 * lip * float(d @ d))


def _objectives(p: Problem, candidates: Array) -> Array:
    """U for each row of ``candidates`` (-inf where the row leaves F)."""
    lam = p.arrival_rate
    t = p.t0 + p.c * candidates
    m1 = t @ p.prior
    m2 = (t * t + p.v) @ p.prior
    rho = p.kappa * m1 + p.rho0
    acc = (p.base + p.gain * -np.expm1(-p.rate * candidates)) @ (p.prior * p.weight)
    feasible = rho <= p.rho_max + 1e-12
    if p.queue.slots == 1:  # M/G/1 in closed form, all rows at once
        with np.errstate(divide="ignore", invalid="ignore"):
            wait = np.where(lam > 0, lam * m2 / (2.0 * (1.0 - rho)), 0.0)
        t_sys = m1 + wait
    else:
        t_sys = np.array([p.queue_terms(a).system_time(b) if ok and lam > 0 else a
                          for a, b, ok in zip(m1.tolist(), m2.tolist(), feasible.tolist(), strict=True)])  # fmt: skip
    u = acc - p.latency_penalty * t_sys
    out: Array = np.where(feasible, u, -math.inf)
    return out


def _nearest(p: Problem, x: Array) -> Array:
    """Nearest integers; types rounded up fall back to floor while the margin is broken."""
    r = np.clip(np.round(x), p.lo, p.hi)
    if p.is_feasible(r, atol=1e-12):
        return r
    return np.clip(np.floor(x), p.lo, p.hi)


def _neighbour(p: Problem, x: Array, start: Array) -> Array:
    floor = np.clip(np.floor(x), p.lo, p.hi)
    ceil = np.clip(np.ceil(x), p.lo, p.hi)
    free = np.nonzero(ceil > floor)[0]
    if free.size == 0:
        return floor
    if free.size <= EXHAUSTIVE_MAX_TYPES:
        bits = (np.arange(2**free.size)[:, None] >> np.arange(free.size)[None, :]) & 1
        cands = np.repeat(floor[None, :], bits.shape[0], axis=0)
        cands[:, free] += bits
        u = _objectives(p, cands)
        top = int(np.argmax(u))
        chosen: Array = cands[top] if u[top] >= _objectives(p, start[None, :])[0] else start
        return chosen
    best: Array = start.copy()
    best_u = float(_objectives(p, best[None, :])[0])
    for _ in range(GREEDY_MAX_PASSES):
        # Try flipping every fractional type alone; take the single best improving flip.
        cands = np.repeat(best[None, :], free.size, axis=0)
        rows = np.arange(free.size)
        cands[rows, free] = np.where(best[free] == floor[free], ceil[free], floor[free])
        u = _objectives(p, cands)
        k = int(np.argmax(u))
        if u[k] <= best_u:
            break
        best, best_u = cands[k], float(u[k])
    return best


def round_caps(p: Problem, x: Array, *, method: str = "neighbour") -> Rounded:
    """Round a continuous optimum ``x`` to integer caps inside F.

    Parameters
    ----------
    p
        The problem (its bounds are integers, so ``lo`` is always a feasible rounding).
    x
        Continuous allocation in F, usually a solver's ``x``.
    method
        ``"nearest"`` (paper) or ``"neighbour"``: floor/ceil combinations, exhaustive up to
        ``EXHAUSTIVE_MAX_TYPES`` fractional types and greedy single flips beyond, started
        from the nearest rounding, so it is never worse.

    Examples
    --------
    >>> from thinkcap.controller.problem import TaskType
    >>> t = TaskType("qa", 1.0, 0.2, 0.7, 0.01, 0.05, 0.002, 0, 2000)
    >>> p = Problem((t,), arrival_rate=2.0, latency_penalty=0.05)
    >>> round_caps(p, np.array([136.6])).caps.tolist()
    [137]
    """
    if method not in ("nearest", "neighbour"):
        raise ValueError(f"method: must be 'nearest' or 'neighbour', got {method!r}")
    x = np.clip(np.asarray(x, dtype=float), p.lo, p.hi)
    caps = _nearest(p, x)
    if method == "neighbour":
        caps = _neighbour(p, x, caps)
    fun = p.objective(caps)
    return Rounded(
        caps=caps.astype(np.int64),
        fun=fun,
        loss=p.objective(x) - fun,
        bound=rounding_bound(p, x),
        method=method,
    )
