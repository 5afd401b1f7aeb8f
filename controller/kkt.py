"""Optimality certificates and a-priori constants shared by the solvers.

All bounds hold over the feasible set F = {lo <= l <= hi, lambda m1(l) <= rho_max}: there the
slack s = 1 - rho is at least ``s_min = 1 - min(rho_max, lambda m1(hi))`` and every service
time and moment is at most its value at ``hi``.
"""

from __future__ import annotations

import math

import numpy as np

from thinkcap.controller.problem import Array, Problem
from thinkcap.controller.sweep import Kernel, use_scalar


def _worst_point(p: Problem, upper: Array) -> tuple[float, Array, float]:
    """(s_min, t(upper), m2(upper)): the smallest slack and largest times over F below ``upper``."""
    t_hi = p.service_times(upper)
    m1_hi, m2_hi = p.moments(upper)
    s_min = 1.0 - min(p.rho_max, p.arrival_rate * m1_hi)
    return s_min, t_hi, m2_hi


def _congestion_row_sums(p: Problem, upper: Array) -> Array:
    """Upper bound over {l in F, l <= upper} of sum_j |dPhi_k / dl_j| for every type k.

    dPhi_k/dl_j = lambda c_k [k=j] / s + lambda^2 pi_j c_j (t_k + t_j) / s^2
    + lambda^3 m2 pi_j c_j / s^3.
    """
    lam = p.arrival_rate
    s, t, m2 = _worst_point(p, upper)
    pc = p.prior * p.c
    big_c = float(pc.sum())
    ct = float(pc.dot(t))
    out: Array = lam * p.c / s + lam**2 * (t * big_c + ct) / s**2 + lam**3 * m2 * big_c / s**3
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
    lam = p.arrival_rate
    q_lo = p.metrics(p.lo)
    s_max = 1.0 - q_lo.rho
    if s_max <= 0.0:
        return math.inf
    phi_min = 1.0 + lam * p.service_times(p.lo) / s_max + lam**2 * q_lo.m2 / (2 * s_max**2)
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
    Residual per type: ``|l_k - clip(l_k + g_k / h_k)|`` with ``g = grad U - mu lambda pi c``
    the Lagrangian gradient and ``h_k = -d^2 U / dl_k^2`` the diagonal curvature,
    ``pi_k w_k A_k b_k^2 e^{-b_k l_k} + gamma pi_k c_k dPhi_k/dl_k``: how far each cap is
    from its own optimum with the others held fixed (a Newton-scaled natural residual). The
    margin adds its violation, and its complementarity gap when ``mu > 0``, converted to
    tokens through ``d rho / d l = lambda pi c``. At an unstable point: (-inf, +inf).
    """
    if use_scalar(p.size, kernel):
        try:
            return _certify_scalar(p, x, multiplier)
        except OverflowError:  # exp of a far negative cap: numpy's inf is the right answer
            pass
    lam, gamma = p.arrival_rate, p.latency_penalty
    prior, c = p.prior, p.c
    pc = prior * c
    t = p.t0 + c * x
    m1 = float(prior.dot(t))
    m2 = float(prior.dot(t * t + p.v))
    rho = lam * m1
    if rho >= 1.0:
        return -math.inf, math.inf
    s = 1.0 - rho
    decay = np.exp(-p.rate * x)
    pwa = prior * p.weight * p.gain
    accuracy = float(pwa.dot(1.0 - decay)) + float(prior.dot(p.weight * p.base))
    fun = accuracy - gamma * (m1 + lam * m2 / (2.0 * s))
    marginal = pwa * p.rate * decay
    a, b2 = lam / s, lam * lam / (s * s)
    phi = 1.0 + a * t + 0.5 * b2 * m2
    dphi = a * c + (2.0 * b2) * pc * t + (b2 * a * m2) * pc
    g = marginal - pc * (gamma * phi + multiplier * lam)
    h = np.maximum(marginal * p.rate + gamma * pc * dphi, 1e-300)
    res = float(np.max(np.abs(np.minimum(np.maximum(x + g / h, p.lo), p.hi) - x)))
    rate_per_token = lam * float(pc.sum())
    if rate_per_token > 0:
        gap = rho - p.rho_max
        margin = max(gap, 0.0) if multiplier == 0.0 else abs(gap)
        res = max(res, margin / rate_per_token)
    return fun, res


def _certify_scalar(p: Problem, x: Array, multiplier: float) -> tuple[float, float]:
    """:func:`certify` over Python floats: the same sums, faster for a handful of types."""
    lam, gamma = p.arrival_rate, p.latency_penalty
    prior, c, xs = p.prior.tolist(), p.c.tolist(), x.tolist()
    ts = [t0 + ck * xk for t0, ck, xk in zip(p.t0.tolist(), c, xs, strict=True)]
    m1 = m2 = 0.0
    for pk, t, v in zip(prior, ts, p.v.tolist(), strict=True):
        m1 += pk * t
        m2 += pk * (t * t + v)
    rho = lam * m1
    if rho >= 1.0:
        return -math.inf, math.inf
    s = 1.0 - rho
    a, b2 = lam / s, lam * lam / (s * s)
    b2am2 = b2 * a * m2
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
        phi = 1.0 + a * t + 0.5 * b2 * m2
        dphi = a * ck + 2.0 * b2 * pc * t + b2am2 * pc
        g = marginal - pc * (gamma * phi + multiplier * lam)
        h = max(marginal * b + gamma * pc * dphi, 1e-300)
        res = max(res, abs(min(max(xk + g / h, lo), hi) - xk))
    fun = accuracy - gamma * (m1 + lam * m2 / (2.0 * s))
    rate_per_token = lam * pc_sum
    if rate_per_token > 0:
        gap = rho - p.rho_max
        margin = max(gap, 0.0) if multiplier == 0.0 else abs(gap)
        res = max(res, margin / rate_per_token)
    return fun, res


def kkt_residual(p: Problem, x: Array, multiplier: float) -> float:
    """Optimality residual of ``x`` with margin multiplier ``mu``, in tokens (see :func:`certify`)."""
    return certify(p, x, multiplier)[1]
