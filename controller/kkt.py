"""Optimality certificates and a-priori constants shared by the solvers.

All bounds hold over the feasible set F = {lo <= l <= hi, rho(l) <= rho_max}: there the load
is at most ``min(rho_max, rho(hi))`` and every service time and moment is at most its value
at ``hi``. They are written for any queue model with ``E[T] = Ta(m1) + m2 Tb(m1)``
(:mod:`controller.queue`), whose ``Tb``, ``Tb'``, ``Tb''`` and ``Ta''`` are nonnegative and
(except ``Ta''``, bounded by a sweep over the load) nondecreasing in m1; for M/G/1 they are
the paper's closed forms.
"""

from __future__ import annotations

import math

import numpy as np

from thinkcap.controller.problem import Array, Problem
from thinkcap.controller.sweep import Kernel, use_scalar

#: Loads at which a bound on ``Ta''`` is sought (it need not be monotone in the load).
TA2_SWEEP = 32


def _worst_terms(p: Problem, upper: Array) -> tuple[float, float, float, Array, float]:
    """(Tb, Tb', largest |d2E[T]/dm1^2|, t(upper), m2(upper)) bounding the queue over F below ``upper``."""
    t_hi = p.service_times(upper)
    m1_hi, m2_hi = p.moments(upper)
    kappa = p.kappa
    m1 = m1_hi if kappa == 0.0 else min(m1_hi, p.load_cap / kappa)
    q = p.queue_terms(m1)
    curve = q.d_m1_m1(m2_hi)
    if p.queue.slots > 1:
        for share in np.linspace(0.0, 1.0, TA2_SWEEP, endpoint=False)[1:]:
            curve = max(curve, abs(p.queue_terms(share * m1).ta2) + m2_hi * q.tb2)
    return q.tb, q.tb1, curve, t_hi, m2_hi


def _congestion_row_sums(p: Problem, upper: Array) -> Array:
    """Upper bound over {l in F, l <= upper} of sum_j |dPhi_k / dl_j| for every type k.

    With Phi_k = T1 + 2 t_k T2 (T1 = dE[T]/dm1, T2 = dE[T]/dm2 = Tb):
    dPhi_k/dl_j = 2 T2 c_k [k=j] + pi_j c_j (T11 + 2 T12 (t_k + t_j)), T12 = Tb'; for M/G/1
    lambda c_k [k=j] / s + lambda^2 pi_j c_j (t_k + t_j) / s^2 + lambda^3 m2 pi_j c_j / s^3.
    """
    if p.arrival_rate == 0.0:
        return np.zeros(p.size)
    tb, tb1, t11, t, _ = _worst_terms(p, upper)
    pc = p.prior * p.c
    big_c = float(pc.sum())
    ct = float(pc.dot(t))
    out: Array = 2.0 * tb * p.c + 2.0 * tb1 * (t * big_c + ct) + t11 * big_c
    return out


def lipschitz_bound(p: Problem, lower: Array | None = None, upper: Array | None = None) -> float:
    """A computable bound L on the Lipschitz constant of grad U over F (or over the part of F
    inside the box ``[lower, upper]``).

    Notes
    -----
    The Hessian of U is ``-diag(pi w A b^2 e^{-b l}) - gamma H_T`` with
    ``(H_T)_kj = pi_k c_k dPhi_k/dl_j`` symmetric positive semidefinite, so
    ``||Hess U||_2 <= max_k pi_k w_k A_k b_k^2 e^{-b_k lo_k} + gamma max_k sum_j |(H_T)_kj|``
    (the spectral norm of a symmetric matrix is at most its largest absolute row sum), each
    term taken at its worst point: accuracy curvature at ``lower``, times and load at ``upper``.
    """
    lower = p.lo if lower is None else lower
    upper = p.hi if upper is None else upper
    acc = p.prior * p.weight * p.gain * p.rate**2 * np.exp(-p.rate * lower)
    queue = p.prior * p.c * _congestion_row_sums(p, upper)
    return float(acc.max() + p.latency_penalty * queue.max())


def contraction_factor(p: Problem) -> float:
    """Sufficient contraction factor kappa of the fixed-point map (infinity norm).

    Notes
    -----
    The map is ``T_k(l) = clip((1/b_k) ln(w_k A_k b_k / (c_k gamma Phi_k(l))))`` (paper,
    KKT fixed point), so ``|dT_k/dl_j| = |dPhi_k/dl_j| / (b_k Phi_k)``. Its row sums are
    bounded at the worst point of F (smallest slack), with ``Phi_k`` bounded below by its
    value at ``lo`` with the largest slack. ``kappa < 1`` guarantees geometric convergence.
    Types whose map is constant (``w A = 0``, ``c = 0``) contribute nothing.
    """
    if p.latency_penalty == 0.0 or p.arrival_rate == 0.0:
        return 0.0
    if p.metrics(p.lo).rho >= 1.0:
        return math.inf
    phi_min = p.congestion(p.lo)
    active = (p.weight * p.gain > 0) & (p.c > 0)
    rows = np.where(active, _congestion_row_sums(p, p.hi) / (p.rate * phi_min), 0.0)
    return float(rows.max())


def local_contraction(p: Problem, x: Array) -> float:
    """The infinity norm of the fixed-point map's Jacobian at ``x`` in F (same rows as kappa).

    It bounds the spectral radius of the Jacobian ``-B H`` (B positive diagonal, H positive
    semidefinite), whose eigenvalues are real and in ``[-norm, 0]``.
    """
    if p.latency_penalty == 0.0 or p.arrival_rate == 0.0:
        return 0.0
    active = (p.weight * p.gain > 0) & (p.c > 0)
    rows = np.where(active, _congestion_row_sums(p, x) / (p.rate * p.congestion(x)), 0.0)
    return float(rows.max())


def certify(p: Problem, x: Array, multiplier: float, *, kernel: Kernel = "auto") -> tuple[float, float]:
    """The objective U(x) and the optimality residual of ``x`` (tokens), computed together.

    Notes
    -----
    Residual per type: ``|l_k - clip(l_k + g_k / h_k)|`` with ``g = grad U - mu kappa pi c``
    the Lagrangian gradient and ``h_k = -d^2 U / dl_k^2`` the diagonal curvature,
    ``pi_k w_k A_k b_k^2 e^{-b_k l_k} + gamma pi_k c_k dPhi_k/dl_k``: how far each cap is
    from its own optimum with the others held fixed (a Newton-scaled natural residual). The
    margin adds its violation, and its complementarity gap when ``mu > 0``, converted to
    tokens through ``d rho / d l = kappa pi c``. At an unstable point: (-inf, +inf).
    """
    if use_scalar(p.size, kernel):
        try:
            return _certify_scalar(p, x, multiplier)
        except OverflowError:  # exp of a far negative cap: numpy's inf is the right answer
            pass
    kappa, gamma = p.kappa, p.latency_penalty
    prior, c = p.prior, p.c
    pc = prior * c
    t = p.t0 + c * x
    m1 = float(prior.dot(t))
    m2 = float(prior.dot(t * t + p.v))
    rho = kappa * m1 + p.rho0
    if rho >= 1.0:
        return -math.inf, math.inf
    q = p.queue_terms(m1)
    decay = np.exp(-p.rate * x)
    pwa = prior * p.weight * p.gain
    accuracy = float(pwa.dot(1.0 - decay)) + float(prior.dot(p.weight * p.base))
    fun = accuracy - gamma * q.system_time(m2)
    marginal = pwa * p.rate * decay
    two_t2 = 2.0 * q.tb
    phi = q.d_m1(m2) + two_t2 * t
    dphi = two_t2 * c + (4.0 * q.tb1) * pc * t + q.d_m1_m1(m2) * pc
    g = marginal - pc * (gamma * phi + multiplier * kappa)
    h = np.maximum(marginal * p.rate + gamma * pc * dphi, 1e-300)
    res = float(np.max(np.abs(np.minimum(np.maximum(x + g / h, p.lo), p.hi) - x)))
    rate_per_token = kappa * float(pc.sum())
    if rate_per_token > 0:
        gap = rho - p.rho_max
        margin = max(gap, 0.0) if multiplier == 0.0 else abs(gap)
        res = max(res, margin / rate_per_token)
    return fun, res


def _certify_scalar(p: Problem, x: Array, multiplier: float) -> tuple[float, float]:
    """:func:`certify` over Python floats: the same sums, faster for a handful of types."""
    kappa, gamma = p.kappa, p.latency_penalty
    prior, c, xs = p.prior.tolist(), p.c.tolist(), x.tolist()
    ts = [t0 + ck * xk for t0, ck, xk in zip(p.t0.tolist(), c, xs, strict=True)]
    m1 = m2 = 0.0
    for pk, t, v in zip(prior, ts, p.v.tolist(), strict=True):
        m1 += pk * t
        m2 += pk * (t * t + v)
    rho = kappa * m1 + p.rho0
    if rho >= 1.0:
        return -math.inf, math.inf
    q = p.queue_terms(m1)
    t1, two_t2, four_t12, t11 = q.d_m1(m2), 2.0 * q.tb, 4.0 * q.tb1, q.d_m1_m1(m2)
    accuracy = res = pc_sum = 0.0
    rows = zip(prior, p.weight.tolist(), p.base.tolist(), p.gain.tolist(), p.rate.tolist(), c, ts, xs,
               p.lo.tolist(), p.hi.tolist(), strict=True)  # fmt: skip
    for pk, w, base, gain, b, ck, t, xk, lo, hi in rows:
        decay = math.exp(-b * xk)
        pwa = pk * w * gain
        accuracy += pwa * (1.0 - decay) + pk * w * base
        marginal = pwa * b * decay
        pc = pk * ck
        pc_sum += pc
        phi = t1 + two_t2 * t
        dphi = two_t2 * ck + four_t12 * pc * t + t11 * pc
        g = marginal - pc * (gamma * phi + multiplier * kappa)
        h = max(marginal * b + gamma * pc * dphi, 1e-300)
        res = max(res, abs(min(max(xk + g / h, lo), hi) - xk))
    fun = accuracy - gamma * q.system_time(m2)
    rate_per_token = kappa * pc_sum
    if rate_per_token > 0:
        gap = rho - p.rho_max
        margin = max(gap, 0.0) if multiplier == 0.0 else abs(gap)
        res = max(res, margin / rate_per_token)
    return fun, res


def kkt_residual(p: Problem, x: Array, multiplier: float) -> float:
    """Optimality residual of ``x`` with margin multiplier ``mu``, in tokens (see :func:`certify`)."""
    return certify(p, x, multiplier)[1]
