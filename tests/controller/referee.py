"""An independent referee: scipy's generic SLSQP on the continuous problem."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from thinkcap.controller import Problem


def referee(p: Problem) -> tuple[np.ndarray, float]:
    """Best of two SLSQP runs (from ``lo`` and from the box centre projected into F).

    Variables are scaled by ``hi`` so that every coordinate lives in [lo/hi, 1].
    """
    scale = np.maximum(p.hi, 1.0)
    a = p.kappa * p.prior * p.c * scale

    def f(u: np.ndarray) -> float:
        val = p.objective(u * scale)
        return -val if np.isfinite(val) else 1e6

    def g(u: np.ndarray) -> np.ndarray:
        return -p.gradient(u * scale) * scale

    cons = {
        "type": "ineq",
        "fun": lambda u: p.rho_max - p.kappa * p.moments(u * scale)[0],
        "jac": lambda u: -a,
    }
    bounds = list(zip(p.lo / scale, p.hi / scale, strict=True))
    best_x, best_u = p.lo.copy(), p.objective(p.lo)
    centre = 0.5 * (p.lo + p.hi)
    m1_lo, m1_c = p.moments(p.lo)[0], p.moments(centre)[0]
    if p.kappa * m1_c > p.rho_max:  # pull the centre back inside the margin
        w = (p.rho_max / p.kappa - m1_lo) / (m1_c - m1_lo) * 0.99
        centre = p.lo + w * (centre - p.lo)
    for start in (p.lo, centre):
        r = minimize(f, start / scale, jac=g, method="SLSQP", bounds=bounds, constraints=[cons],
                     options={"ftol": 1e-16, "maxiter": 2000})  # fmt: skip
        x = np.clip(r.x * scale, p.lo, p.hi)
        if p.is_feasible(x, atol=1e-9) and p.objective(x) > best_u:
            best_x, best_u = x, p.objective(x)
    return best_x, best_u
