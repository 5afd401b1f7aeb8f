"""The structured exact solver (DESIGN.md 1, solver 3; our extension, the default).

The types are coupled only through the scalars (m1, m2). Every queue model has
``E[T] = Ta(m1) + m2 Tb(m1)`` and load ``rho = kappa m1`` (:mod:`controller.queue`; here rho is
the part that scales with m1, and the margin is ``load_cap = rho_max - rho0``), so at a
load rho write sigma = 2 Tb (the price of m2) and T1(rho, m2) = Ta' + m2 Tb' (the price of
m1), and the common price theta = gamma T1 + mu kappa. For M/G/1, s = 1 - rho,
sigma = lambda / s and T1 = 1 + sigma^2 m2 / 2. Then type k's KKT condition (DESIGN.md 1,
KKT line) reads

    w_k A_k b_k e^{-b_k l} = c_k (alpha_k + beta_k l),
    alpha_k = theta + gamma sigma t0_k,   beta_k = gamma sigma c_k,

whose root is ``l = W(e^z) / b - alpha / beta`` with Lambert's W and
``z = ln(b K / beta) + b alpha / beta``, ``K = w A b / c``. We evaluate it in log space, as
the root of the increasing concave ``f(l) = b l + ln(alpha + beta l) - ln K``, by a projected
Newton iteration that is monotone after one step and free of the cancellation of the
closed form when ``beta`` is small. The problem is then two scalar consistency equations
in (rho, theta), solved by a safeguarded 2-D Newton method with analytic Jacobian:

    G1 = kappa M1(l(rho, theta)) - rho = 0,
    G2 = gamma T1(rho, M2(l(rho, theta))) - theta = 0.

When the margin binds, rho = rho_max is fixed and one monotone equation in theta
remains: kappa M1(l) = rho_max, with mu = (theta - gamma T1(rho_max, M2)) / kappa.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from thinkcap.controller.kkt import certify
from thinkcap.controller.problem import Array, Problem
from thinkcap.controller.queue import MG1
from thinkcap.controller.result import SolveResult, Status
from thinkcap.controller.sweep import ArraySweep, Kernel, ScalarSweep, fixed_caps, make_sweep, use_scalar

#: Absolute tolerance on the per-type Newton step, tokens.
CAP_XTOL = 1e-9
#: Absolute tolerance on the load consistency residual G1 (dimensionless).
RHO_TOL = 1e-13
#: Relative tolerance on the price consistency residual G2 / theta.
THETA_RTOL = 1e-13
#: The joint Newton method takes its last step unverified below these step sizes
#: (tokens; relative price) since the error after it is their square.
FINAL_CAP_STEP = 1e-3
FINAL_PRICE_STEP = 1e-6
#: Newton steps that must press rho against rho_max before the margin is taken as binding.
PRESSED_ITERATIONS = 1
#: Iteration limit of the joint Newton method before the bracketing fallback.
MAXITER = 60


def _prices(p: Problem, rho: float) -> tuple[float, float, float, float, float, float]:
    """At load ``rho``: (sigma, dsigma/drho, a, da/drho, b, db/drho) with T1 = a + b m2."""
    if isinstance(p.queue, MG1):  # closed form: sigma = lambda / s, T1 = 1 + sigma^2 m2 / 2
        lam = p.arrival_rate
        sigma = lam / (1.0 - rho)
        dsig = sigma * sigma / lam
        return sigma, dsig, 1.0, 0.0, 0.5 * sigma * sigma, sigma * dsig
    kappa = p.kappa
    q = p.queue_terms(rho / kappa)
    return 2.0 * q.tb, 2.0 * q.tb1 / kappa, q.ta1, q.ta2 / kappa, q.tb1, q.tb2 / kappa


@dataclass
class _State:
    """Mutable work state of one solve: the warm start and the evaluation count."""

    x: Array
    nfev: int = 0


class _Caps:
    """Per-type best responses l(theta, sigma) with their price derivatives."""

    def __init__(self, p: Problem) -> None:
        self.p = p
        fixed, _, self.log_k_safe = fixed_caps(p)
        self.no_gain = p.weight * p.gain * p.rate <= 0
        self.free_tokens = fixed & ~self.no_gain
        # ln K, with -inf for a type without gain and +inf for one with free tokens.
        self.log_k = np.where(fixed, np.where(self.no_gain, -np.inf, np.inf), self.log_k_safe)

    def solve(self, theta: float, sigma: float, st: _State) -> tuple[Array, Array]:
        """Caps at the prices and dl/dtheta, zero where a bound is active."""
        p = self.p
        gamma = p.latency_penalty
        alpha = theta + gamma * sigma * p.t0
        beta = gamma * sigma * p.c
        fixed_hi = self.free_tokens | (alpha <= 0)
        alpha_safe = np.where(alpha > 0, alpha, 1.0)
        log_k = self.log_k_safe
        x = np.clip(st.x, p.lo, p.hi)
        for _ in range(200):
            st.nfev += 1
            arg = alpha_safe + beta * x
            f = p.rate * x + np.log(arg) - log_k
            df = p.rate + beta / arg
            new = np.clip(x - f / df, p.lo, p.hi)
            step = float(np.max(np.abs(new - x)))
            x = new
            if step <= CAP_XTOL:
                break
        x = np.where(fixed_hi, p.hi, np.where(self.no_gain, p.lo, x))
        st.x = x
        interior = (x > p.lo) & (x < p.hi) & ~fixed_hi & ~self.no_gain
        den = p.rate * (alpha_safe + beta * x) + beta
        d_theta: Array = np.where(interior, -1.0 / den, 0.0)
        return x, d_theta


def _theta_for_load(p: Problem, caps: _Caps, rho: float, st: _State) -> float:
    """Solve G2(rho, theta) = 0 for theta (decreasing in theta, so one root)."""
    gamma = p.latency_penalty
    sigma, _, a, _, b, _ = _prices(p, rho)
    lo = gamma * (a + b * p.moments(p.lo)[1])
    hi = gamma * (a + b * p.moments(p.hi)[1])
    if hi - lo <= 1e-15 * max(hi, 1e-300):
        return hi

    def g2(theta: float) -> float:
        x = caps.solve(theta, sigma, st)[0]
        return gamma * (a + b * p.moments(x)[1]) - theta

    return float(brentq(g2, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps))


def _bracketed(p: Problem, caps: _Caps, rho_lo: float, rho_hi: float, st: _State) -> tuple[float, float]:
    """Nested bracketing fallback: brentq on rho with theta solved inside."""

    def h(rho: float) -> float:
        theta = _theta_for_load(p, caps, rho, st)
        sigma = _prices(p, rho)[0]
        return p.kappa * p.moments(caps.solve(theta, sigma, st)[0])[0] - rho

    eps = 4 * np.finfo(float).eps
    rho = rho_hi if h(rho_hi) >= 0 else float(brentq(h, rho_lo, rho_hi, xtol=1e-16, rtol=eps))
    return rho, _theta_for_load(p, caps, rho, st)


def _margin(p: Problem, caps: _Caps, theta_lo: float, st: _State) -> tuple[float, Array, int]:
    """Margin binds: solve kappa M1(l(theta)) = rho_max for theta >= theta_lo."""
    lam, gamma = p.kappa, p.latency_penalty
    sigma = _prices(p, p.load_cap)[0]
    pc = p.prior * p.c
    # A price at which every type sits at its minimum: f(lo) >= 0 for all.
    k_lo = np.where(np.isfinite(caps.log_k), np.exp(np.minimum(caps.log_k, 700) - p.rate * p.lo), 0.0)
    theta_hi = max(theta_lo, float(np.max(k_lo - gamma * sigma * p.service_times(p.lo)))) * 2 + 1e-12
    lo, hi = theta_lo, theta_hi
    theta = theta_lo
    it = 0
    for it in range(1, 200):
        x, d_th = caps.solve(theta, sigma, st)
        h = lam * float(p.prior.dot(p.service_times(x))) - p.load_cap
        if abs(h) <= RHO_TOL:
            return theta, x, it
        if h > 0:
            lo = theta
        else:
            hi = theta
        dh = lam * float(pc.dot(d_th))
        nxt = theta - h / dh if dh < 0 else math.nan
        if not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        if hi - lo <= 4e-16 * hi:
            break
        theta = nxt
    return theta, caps.solve(theta, sigma, st)[0], it


def _joint_newton(
    p: Problem, sw: ArraySweep | ScalarSweep, rho_lo: float, rho_cap: float, st: _State
) -> tuple[float, float, Array, float, int] | None:
    """Newton's method on caps and prices together: one pass over the types per iteration.

    Each iteration takes one projected Newton step of every type's equation at the current
    prices (``sw.newton``), linearises the caps in the prices (``dl/dtheta``, ``dl/dsigma``)
    and solves the 2x2 system for the price step: Newton on the whole KKT system through its
    Schur complement. When ``rho`` presses against ``rho_cap = rho_max`` with load to spare
    the margin binds and the iteration continues in ``theta`` alone. Returns
    ``(rho, theta, x, mu, nit)``, or ``None`` if it does not converge (the caller then falls
    back to the bracketing method).
    """
    lam, gamma = p.kappa, p.latency_penalty  # lam: the load per unit m1
    m1, m2 = sw.moments()
    rho = min(max(lam * m1, rho_lo), rho_cap)
    sigma, dsig, ta, dta, tb, dtb = _prices(p, rho)
    theta = gamma * (ta + tb * m2)
    margin = False
    can_bind = rho_cap == p.load_cap
    pressed = 0
    th_lo, th_hi = 0.0, math.inf
    first = st.nfev
    for _ in range(MAXITER):
        st.nfev += 1
        sigma, dsig, ta, dta, tb, dtb = _prices(p, rho)
        m1, m2, j, jt, jtt, step = sw.newton(theta, gamma * sigma, full=not margin)
        g1 = lam * m1 - rho
        j12 = lam * j
        if margin:
            if abs(g1) <= RHO_TOL and step <= CAP_XTOL:
                sw.accept()
                mu = (theta - gamma * (ta + tb * sw.moments()[1])) / lam
                if mu >= -1e-9 * theta / lam:
                    break
                margin = can_bind = False  # a negative price: the margin does not bind after all
                continue
            # The load falls as theta rises: keep a bracket and bisect (geometrically) when
            # Newton leaves it or stalls on a flat piece where every type sits at a bound.
            if g1 > 0:
                th_lo = theta
            else:
                th_hi = theta
            # Newton in log(theta): caps fall like log(theta), so the load is nearly affine there.
            target = math.nan
            if j12 < 0.0 and theta > 0.0:
                target = theta * math.exp(max(-50.0, min(50.0, -g1 / (theta * j12))))
            if not th_lo < target < th_hi:
                if not math.isfinite(th_hi):
                    target = 2.0 * theta
                else:
                    target = math.sqrt(th_lo * th_hi) if th_lo > 0.0 else 0.5 * th_hi
            d_theta = target - theta
            d_rho = raw_step = 0.0
        else:
            m2 += sw.pv
            g2 = gamma * (ta + tb * m2) - theta
            if abs(g1) <= RHO_TOL and abs(g2) <= THETA_RTOL * theta and step <= CAP_XTOL:
                sw.accept()
                break
            # dl/dsigma = gamma t dl/dtheta, so every Jacobian entry is a dot with dl/dtheta:
            # dM1/dtheta = j, dM1/dsigma = gamma jt, dM2/dtheta = 2 jt, dM2/dsigma = 2 gamma jtt.
            j11 = lam * gamma * jt * dsig - 1.0
            j21 = gamma * (dta + dtb * m2 + tb * 2.0 * gamma * jtt * dsig)
            j22 = 2.0 * gamma * tb * jt - 1.0
            det = j11 * j22 - j12 * j21
            if det == 0.0 or not math.isfinite(det):
                return None
            d_rho = (-g1 * j22 + g2 * j12) / det
            d_theta = (-g2 * j11 + g1 * j21) / det
            raw_step = abs(d_rho)
            new_rho = min(max(rho + d_rho, rho_lo), rho_cap)
            pressed = pressed + 1 if can_bind and new_rho == rho_cap and g1 > 0 else 0
            if pressed >= PRESSED_ITERATIONS:  # the unconstrained optimum lies beyond the margin
                margin, rho, d_rho = True, rho_cap, 0.0
                guess = sw.margin_price(rho_cap / lam - float(p.prior.dot(p.t0)))
                if math.isfinite(guess) and guess > theta:
                    d_theta = guess - theta
            else:
                d_rho, rho = new_rho - rho, new_rho
        new_theta = theta + d_theta if margin else max(theta + d_theta, 0.1 * theta)
        sw.advance(new_theta - theta, gamma * dsig * d_rho)
        # Quadratic convergence: once the step is this small the next residual is below
        # machine precision, so take it without another verifying pass.
        # On the margin theta moves by a bracketed secant-like step, not Newton's on the whole
        # system: its last step is verified like any other (unverified, the load could end
        # above rho_max by 1e-7).
        small_price_step = raw_step <= FINAL_PRICE_STEP and abs(new_theta - theta) <= FINAL_PRICE_STEP * theta
        if small_price_step and step <= FINAL_CAP_STEP and not margin:
            theta = new_theta
            break
        theta = new_theta
    else:
        return None
    x = sw.caps()
    st.x = x
    it = st.nfev - first
    if not margin:
        return rho, theta, x, 0.0, it
    _, _, ta, _, tb, _ = _prices(p, rho)
    mu = (theta - gamma * (ta + tb * p.moments(x)[1])) / lam
    if mu < -1e-9 * theta / lam:
        return None
    return rho, theta, x, max(mu, 0.0), it


def exact(p: Problem, *, x0: Array | None = None, kernel: Kernel = "auto") -> SolveResult:
    """Maximise U over F by the structured reduction to two scalars (the default method).

    Parameters
    ----------
    p
        The problem.
    x0
        Optional warm start (e.g. the previous solution); only used as a starting point.
    kernel
        The per-type pass: ``"auto"`` (Python floats up to ``SCALAR_MAX_TYPES`` types,
        numpy above), ``"scalar"`` or ``"array"``. The answer is the same up to rounding.

    Returns
    -------
    SolveResult
        ``x`` is the unique optimum; ``multiplier`` is mu; ``nit`` counts outer iterations.

    Notes
    -----
    See the module docstring. Each outer evaluation costs O(N). Degenerate types are
    handled in closed form: ``w A = 0`` gives ``lo``, ``c = 0`` (free tokens) or
    ``gamma = mu = 0`` gives ``hi``.

    Examples
    --------
    >>> from thinkcap.controller.problem import TaskType
    >>> t = TaskType("qa", 1.0, 0.2, 0.7, 0.01, 0.05, 0.002, 0, 2000)
    >>> r = exact(Problem((t,), arrival_rate=2.0, latency_penalty=0.05))
    >>> r.success, round(float(r.x[0]), 1)
    (True, 173.6)
    """
    use_scalar(p.size, kernel)  # reject an unknown kernel before any work
    lam, gamma = p.kappa, p.latency_penalty  # lam: the load per unit m1
    start = p.lo.copy() if x0 is None else np.clip(np.asarray(x0, dtype=float), p.lo, p.hi)
    st = _State(x=start)
    sw = make_sweep(p, start, kernel)
    rho_lo = lam * sw.m1_lo
    if rho_lo > p.load_cap:
        return _finish(p, p.lo.copy(), 0.0, Status.OVERLOAD, nit=0, st=st, kernel=kernel)
    if lam == 0.0:
        x = _Caps(p).solve(gamma, 0.0, st)[0]
        return _finish(p, x, 0.0, Status.CONVERGED, nit=1, st=st, kernel=kernel)
    rho_top = lam * sw.m1_hi
    if gamma > 0.0:
        fast = _joint_newton(p, sw, rho_lo, min(rho_top, p.load_cap), st)
        if fast is not None:
            _, _, x, mu, it = fast
            return _finish(p, x, mu, Status.CONVERGED, nit=it, st=st, kernel=kernel)
        st.x = start
    caps = _Caps(p)
    nit = 0
    if rho_top > p.load_cap:
        # Does the unconstrained optimum lie beyond the margin? Check the sign of G1 there.
        theta_m = _theta_for_load(p, caps, p.load_cap, st)
        sigma_m, _, ta_m, _, tb_m, _ = _prices(p, p.load_cap)
        nit += 1
        if lam * p.moments(caps.solve(theta_m, sigma_m, st)[0])[0] > p.load_cap:
            theta, x, it = _margin(p, caps, theta_m, st)
            m2 = p.moments(x)[1]
            mu = max(0.0, (theta - gamma * (ta_m + tb_m * m2)) / lam)
            return _finish(p, x, mu, Status.CONVERGED, nit=nit + it, st=st, kernel=kernel)
        rho_hi = p.load_cap
    else:
        rho_hi = rho_top
    if gamma == 0.0:  # latency is free and the margin is slack: theta = 0, caps at hi
        return _finish(p, caps.solve(0.0, 0.0, st)[0], 0.0, Status.CONVERGED, nit=nit + 1, st=st, kernel=kernel)
    if rho_hi - rho_lo <= RHO_TOL:
        x = caps.solve(_theta_for_load(p, caps, rho_hi, st), _prices(p, rho_hi)[0], st)[0]
        return _finish(p, x, 0.0, Status.CONVERGED, nit=nit + 1, st=st, kernel=kernel)
    rho, theta = _bracketed(p, caps, rho_lo, rho_hi, st)
    x = caps.solve(theta, _prices(p, rho)[0], st)[0]
    return _finish(p, x, 0.0, Status.CONVERGED, nit=nit, st=st, kernel=kernel)


def _finish(
    p: Problem, x: Array, mu: float, status: Status, *, nit: int, st: _State, kernel: Kernel = "auto"
) -> SolveResult:
    if status is Status.OVERLOAD:
        fun, res = p.objective(x), math.nan
    else:
        fun, res = certify(p, x, mu, kernel=kernel)
    return SolveResult(
        x=x,
        fun=fun,
        status=status,
        nit=nit,
        nfev=st.nfev,
        residual=res,
        method="exact",
        multiplier=mu,
    )
