"""The paper's two iterative methods: the projected fixed point and projected gradient.

Both share one skeleton: a state (the iterate), a step that maps it to the next iterate
and reports a residual in tokens, and one driver loop (:func:`_drive`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.optimize import brentq

from thinkcap.controller.kkt import certify, contraction_factor, kkt_residual, lipschitz_bound, local_contraction
from thinkcap.controller.problem import Array, Problem
from thinkcap.controller.projection import project_feasible
from thinkcap.controller.result import SolveResult, Status

#: Stop when the method's residual (tokens, absolute) is at most this.
XTOL = 1e-7
#: The projected gradient's default tolerance on the KKT residual, tokens (caps are integers).
GRADIENT_XTOL = 1e-3
#: Default iteration limits.
FIXED_POINT_MAXITER = 100_000
GRADIENT_MAXITER = 2_000_000
#: The fixed point halves its safety factor after this many steps without a new best residual.
STALL_ITERATIONS = 50
#: The fixed point's extra safety factor never goes below this.
MIN_DAMPING = 1.0 / 1024
#: Projected gradient evaluates its KKT residual every this many iterations.
GRADIENT_CHECK_EVERY = 16

Step = Callable[[Array], tuple[Array, float, float]]


def _check_options(xtol: float, maxiter: int) -> None:
    if not (isinstance(xtol, float | int) and math.isfinite(xtol) and xtol > 0):
        raise ValueError(f"xtol: must be a finite number > 0, got {xtol!r}")
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter: must be an integer >= 1, got {maxiter!r}")


def _drive(step: Step, x: Array, xtol: float, maxiter: int) -> tuple[Array, float, int, Status]:
    """Run ``x, residual, mu = step(x)`` until ``residual <= xtol``; returns (x, mu, nit, status)."""
    mu = 0.0
    for nit in range(1, maxiter + 1):
        x, residual, mu = step(x)
        if residual <= xtol:
            return x, mu, nit, Status.CONVERGED
        if not np.all(np.isfinite(x)):
            return x, mu, nit, Status.FAILED
    return x, mu, maxiter, Status.MAXITER


def _start(p: Problem, x0: Array | None) -> Array:
    x = p.lo.copy() if x0 is None else np.asarray(x0, dtype=float)
    return project_feasible(p, x)[0]


def _result(
    p: Problem, x: Array, mu: float, *, nit: int, nfev: int, status: Status, method: str, kappa: float | None
) -> SolveResult:
    if status is Status.OVERLOAD:
        return SolveResult(p.lo.copy(), p.objective(p.lo), status, 0, 0, math.nan, method, 0.0, kappa)
    fun, residual = certify(p, x, mu)
    return SolveResult(x, fun, status, nit, nfev, residual, method, mu, kappa)


def best_response(p: Problem, x: Array) -> tuple[Array, float]:
    """The paper's KKT map T(l) with the margin price mu chosen so that T(l) lies in F.

    Notes
    -----
    ``T_k(l) = clip((1/b_k) ln(w_k A_k b_k / (c_k (gamma Phi_k(l) + mu kappa))))``
    (DESIGN.md 1, KKT line; ``kappa = lambda`` for M/G/1), with ``mu = 0`` when that keeps
    ``rho(T) <= rho_max`` and otherwise the unique ``mu > 0`` that puts ``T`` on the margin.
    """
    kappa = p.kappa
    phi = p.congestion(x)
    wab = p.weight * p.gain * p.rate

    def image(mu: float) -> Array:
        price = p.c * (p.latency_penalty * phi + mu * kappa)
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = np.log(wab / price) / p.rate
        raw = np.where(price <= 0, np.where(wab > 0, np.inf, -np.inf), raw)
        out: Array = np.clip(np.nan_to_num(raw, nan=-np.inf), p.lo, p.hi)
        return out

    t = image(0.0)
    if kappa == 0.0 or kappa * float(p.prior @ p.service_times(t)) <= p.load_cap:
        return t, 0.0
    a = p.c * kappa
    mu_hi = float(
        np.max(
            np.where(
                a > 0, (wab * np.exp(-p.rate * p.lo) - p.latency_penalty * p.c * phi) / np.where(a > 0, a, 1.0), 0.0
            )
        )
    )
    mu_hi = max(mu_hi, 1e-300) * 2.0

    def excess(mu: float) -> float:
        return kappa * float(p.prior @ p.service_times(image(mu))) - p.load_cap

    mu = float(brentq(excess, 0.0, mu_hi, xtol=1e-300, rtol=4 * np.finfo(float).eps))
    x_mu = image(mu)
    if excess(mu) > 0:  # land exactly inside F despite rounding
        x_mu = project_feasible(p, x_mu)[0]
    return x_mu, mu


def fixed_point(
    p: Problem, *, x0: Array | None = None, xtol: float = XTOL, maxiter: int = FIXED_POINT_MAXITER
) -> SolveResult:
    """The paper's coupled projected fixed-point iteration, guarded against oscillation.

    Parameters
    ----------
    p
        The problem.
    x0
        Starting point (projected onto F); default ``lo``.
    xtol
        Absolute tolerance, tokens, on ``max_k |T_k(l) - l_k|``.
    maxiter
        Iteration limit.

    Notes
    -----
    Iterates ``l <- l + omega (T(l) - l)`` with :func:`best_response` ``T``. The map is
    antitone: its Jacobian ``-B H`` has real eigenvalues in ``[-k(l), 0]`` with ``k(l)`` the
    local norm of :func:`controller.kkt.local_contraction`. Where ``k(l) < 1`` the step is the
    paper's plain one (``omega = 1``); elsewhere the averaged (Krasnoselskii-Mann) step
    ``omega = 2 / (2 + k(l))`` makes the iteration a local contraction instead of an
    oscillation. A residual that has not improved for ``STALL_ITERATIONS`` steps halves a
    further safety factor.
    ``contraction`` reports the global kappa of :func:`controller.kkt.contraction_factor`;
    ``kappa < 1`` guarantees geometric convergence of the plain iteration.

    Examples
    --------
    >>> from thinkcap.controller.problem import TaskType
    >>> t = TaskType("qa", 1.0, 0.2, 0.7, 0.01, 0.05, 0.002, 0, 2000)
    >>> r = fixed_point(Problem((t,), arrival_rate=2.0, latency_penalty=0.05))
    >>> r.success, round(float(r.x[0]), 1)
    (True, 173.6)
    """
    _check_options(xtol, maxiter)
    kappa = contraction_factor(p)
    if p.overloaded:
        return _result(p, p.lo, 0.0, nit=0, nfev=0, status=Status.OVERLOAD, method="fixed_point", kappa=kappa)
    state = {"safety": 1.0, "best": math.inf, "stalled": 0, "nfev": 0}

    def step(x: Array) -> tuple[Array, float, float]:
        t, mu = best_response(p, x)
        state["nfev"] += 1
        residual = float(np.max(np.abs(t - x)))
        if residual < state["best"]:
            state["best"], state["stalled"] = residual, 0
        else:
            state["stalled"] += 1
            if state["stalled"] >= STALL_ITERATIONS:
                state["safety"] = max(state["safety"] * 0.5, MIN_DAMPING)
                state["stalled"] = 0
        k = local_contraction(p, x)
        omega = 1.0 if k < 1.0 else 2.0 / (2.0 + k)
        return x + state["safety"] * omega * (t - x), residual, mu

    x, mu, nit, status = _drive(step, _start(p, x0), xtol, maxiter)
    return _result(p, x, mu, nit=nit, nfev=int(state["nfev"]), status=status, method="fixed_point", kappa=kappa)


def projected_gradient(
    p: Problem,
    *,
    x0: Array | None = None,
    xtol: float = GRADIENT_XTOL,
    maxiter: int = GRADIENT_MAXITER,
    accelerate: bool = True,
) -> SolveResult:
    """The paper's projected gradient ascent with step 1/L.

    Parameters
    ----------
    p
        The problem.
    x0
        Starting point (projected onto F); default ``lo``.
    xtol
        Absolute tolerance, tokens, on the KKT residual (:func:`controller.kkt.kkt_residual`).
    maxiter
        Iteration limit.
    accelerate
        Nesterov momentum with adaptive restart on top of the same 1/L step (the default:
        far fewer iterations on ill-conditioned instances). ``False`` runs the paper's
        plain iteration, which can need millions of iterations when curvatures differ a lot.

    Notes
    -----
    ``l <- Pi_F(l + grad U(l) / L)`` with ``L`` from :func:`controller.kkt.lipschitz_bound`
    and ``Pi_F`` from :func:`controller.projection.project_feasible`. The projection's
    multiplier ``nu`` gives the margin price ``mu = nu L``. Converges for every feasible
    instance because U is concave with L-Lipschitz gradient on F.

    Examples
    --------
    >>> from thinkcap.controller.problem import TaskType
    >>> t = TaskType("qa", 1.0, 0.2, 0.7, 0.01, 0.05, 0.002, 0, 2000)
    >>> r = projected_gradient(Problem((t,), arrival_rate=2.0, latency_penalty=0.05))
    >>> r.success, round(float(r.x[0]), 1)
    (True, 173.6)
    """
    _check_options(xtol, maxiter)
    if p.overloaded:
        return _result(p, p.lo, 0.0, nit=0, nfev=0, status=Status.OVERLOAD, method="projected_gradient", kappa=None)
    lip = lipschitz_bound(p)
    if lip <= 0:  # U is flat: every feasible point is optimal
        x = _start(p, x0)
        return _result(p, x, 0.0, nit=0, nfev=0, status=Status.CONVERGED, method="projected_gradient", kappa=None)
    state = {"nfev": 0, "t": 1.0, "k": 0}
    prev = _start(p, x0)

    def step(x: Array) -> tuple[Array, float, float]:
        nonlocal prev
        y = x
        if accelerate:
            t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * state["t"] ** 2))
            y = project_feasible(p, x + ((state["t"] - 1.0) / t_next) * (x - prev))[0]
            state["t"] = t_next
        g = p.gradient(y)
        state["nfev"] += 1
        new, nu = project_feasible(p, y + g / lip)
        if accelerate and float(g @ (new - x)) < 0:  # restart when momentum points downhill
            state["t"] = 1.0
        prev = x
        mu = nu * lip
        state["k"] += 1
        if state["k"] % GRADIENT_CHECK_EVERY:
            return new, math.inf, mu
        return new, kkt_residual(p, new, mu), mu

    x, mu, nit, status = _drive(step, prev, xtol, maxiter)
    return _result(p, x, mu, nit=nit, nfev=int(state["nfev"]), status=status, method="projected_gradient", kappa=None)
