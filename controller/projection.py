"""Euclidean projection onto a box cut by one half-space."""

from __future__ import annotations

import numpy as np

from thinkcap.controller.problem import Array, Problem


def project_box_halfspace(y: Array, lo: Array, hi: Array, a: Array, r: float) -> tuple[Array, float]:
    """Project ``y`` onto ``{lo <= x <= hi, a . x <= r}`` with ``a >= 0``.

    Returns the projection and the multiplier ``nu >= 0`` of the half-space.

    Notes
    -----
    The solution is ``x(nu) = clip(y - nu a, lo, hi)`` with the smallest ``nu >= 0`` such that
    ``g(nu) = a . x(nu) <= r``. ``g`` is piecewise linear and non-increasing with breakpoints
    where a coordinate leaves ``hi`` (``(y_k - hi_k) / a_k``) or reaches ``lo``
    (``(y_k - lo_k) / a_k``); sorting them gives ``nu`` exactly in O(N log N). If even
    ``x = lo`` violates the half-space the set is empty and ``lo`` is returned.

    Examples
    --------
    >>> x, nu = project_box_halfspace(np.array([2.0, 2.0]), np.zeros(2), np.full(2, 3.0),
    ...                               np.ones(2), 2.0)
    >>> x.tolist(), nu
    ([1.0, 1.0], 1.0)
    """
    x0 = np.clip(y, lo, hi)
    g0 = float(a @ x0)
    if g0 <= r:
        return x0, 0.0
    pos = a > 0
    ap, yp, lop, hip = a[pos], y[pos], lo[pos], hi[pos]
    enter = (yp - hip) / ap
    leave = (yp - lop) / ap
    a2 = ap * ap
    slope0 = -float(a2[(enter <= 0) & (leave > 0)].sum())
    ev_pos = np.concatenate([enter[enter > 0], leave[leave > 0]])
    ev_delta = np.concatenate([-a2[enter > 0], a2[leave > 0]])
    order = np.argsort(ev_pos, kind="stable")
    ev_pos, ev_delta = ev_pos[order], ev_delta[order]
    # g at each breakpoint: slopes hold on the segments between consecutive breakpoints.
    knots = np.concatenate([[0.0], ev_pos])
    slopes = slope0 + np.concatenate([[0.0], np.cumsum(ev_delta)])
    g_knots = g0 + np.concatenate([[0.0], np.cumsum(slopes[:-1] * np.diff(knots))])
    below = np.nonzero(g_knots <= r)[0]
    if below.size == 0:  # past the last breakpoint every cut coordinate sits at lo
        return np.where(pos, lo, x0), float(knots[-1])
    i = int(below[0]) - 1  # g(0) > r, so the crossing lies in segment i >= 0
    nu = float(knots[i] + (g_knots[i] - r) / -slopes[i])
    return np.clip(y - nu * a, lo, hi), nu


def project_feasible(p: Problem, y: Array) -> tuple[Array, float]:
    """Project onto F: the box [lo, hi] cut by rho(l) = kappa m1(l) + rho0 <= rho_max."""
    kappa = p.kappa
    a = kappa * p.prior * p.c
    r = p.load_cap - kappa * float(p.prior @ p.t0)
    return project_box_halfspace(y, p.lo, p.hi, a, r)
