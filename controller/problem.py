"""The allocation problem: task types, a queue model and the objective.

Notation follows DESIGN.md section 1 (the paper's model, eqs. (1)-(6) of Ozbas and
Bastopcu, 2026): type k has prior ``pi_k``, weight ``w_k``, accuracy curve
``p_k(l) = D_k + A_k (1 - exp(-b_k l))`` and affine service time ``t_k(l) = t0_k + c_k l``
with within-type variance ``v_k``. The queue is the paper's M/G/1 unless the problem names
another model (:mod:`controller.queue`: a batching engine with several slots); every model
gives ``E[T] = Ta(m1) + m2 Tb(m1)`` and a load ``rho = kappa m1 + rho0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from thinkcap.controller.queue import MG1, QueueModel, QueueTerms

Array = NDArray[np.float64]

#: How far the configured priors may be from summing to one before they are rejected.
PRIOR_SUM_TOLERANCE = 1e-6


@dataclass(frozen=True, slots=True)
class TaskType:
    """One task type and its configured parameters (config names of DESIGN.md 1)."""

    name: str
    prior: float
    accuracy_base: float
    accuracy_gain: float
    accuracy_rate: float
    overhead_s: float
    per_token_s: float
    min_tokens: int
    max_tokens: int
    weight: float = 1.0
    variance_s2: float = 0.0

    def __post_init__(self) -> None:
        def bad(key: str, why: str, value: object) -> ValueError:
            return ValueError(f"type {self.name!r}: {key} {why}, got {value!r}")

        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"type name must be a non-empty string, got {self.name!r}")
        reals = {
            "prior": self.prior,
            "weight": self.weight,
            "accuracy.base": self.accuracy_base,
            "accuracy.gain": self.accuracy_gain,
            "accuracy.rate": self.accuracy_rate,
            "service.overhead_s": self.overhead_s,
            "service.per_token_s": self.per_token_s,
            "service.variance_s2": self.variance_s2,
        }
        for key, value in reals.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad(key, "must be a number", value)
            if not math.isfinite(value):
                raise bad(key, "must be finite", value)
            if key not in {"prior", "accuracy.rate"} and value < 0:
                raise bad(key, "must be >= 0", value)
        if self.prior <= 0:
            raise bad("prior", "must be > 0 (give a rare type a small prior)", self.prior)
        if self.accuracy_rate <= 0:
            raise bad("accuracy.rate", "must be > 0", self.accuracy_rate)
        if self.accuracy_base + self.accuracy_gain > 1 + 1e-12:
            raise bad(
                "accuracy.base + accuracy.gain",
                "must be <= 1",
                self.accuracy_base + self.accuracy_gain,
            )
        for key, value in (("min_tokens", self.min_tokens), ("max_tokens", self.max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(key, "must be an integer", value)
            if value < 0:
                raise bad(key, "must be >= 0", value)
        if self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})", self.min_tokens)


@dataclass(frozen=True, slots=True)
class QueueMetrics:
    """Queue quantities of one allocation; waits are +inf when the queue is unstable.

    ``mean_wait`` is the time before service starts (for a batching engine: before a slot);
    ``occupancy`` the mean number in service, E[min(N, slots)].
    """

    m1: float
    m2: float
    rho: float
    mean_wait: float
    mean_system_time: float
    occupancy: float = 0.0

    @property
    def stable(self) -> bool:
        """Whether the load is below one."""
        return self.rho < 1.0


def _frozen(values: list[float]) -> Array:
    out = np.asarray(values, dtype=np.float64)
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class Problem:
    """A validated, immutable instance of the reasoning-token allocation problem.

    Parameters
    ----------
    types
        The task types; names must be unique and priors must sum to one (within
        ``PRIOR_SUM_TOLERANCE``; they are then normalised exactly).
    arrival_rate
        Total Poisson arrival rate lambda, requests per second (>= 0).
    latency_penalty
        gamma: objective points traded for one second of mean system time (>= 0).
    rho_max
        Stability margin: feasible allocations keep the load ``rho = kappa m1 + rho0 <= rho_max``
        (0 < rho_max < 1; ``kappa = lambda`` and ``rho0 = 0`` for M/G/1).
    queue
        The queue model (default: the paper's M/G/1).

    Examples
    --------
    >>> t = TaskType("qa", 1.0, 0.2, 0.7, 0.01, 0.05, 0.002, 0, 2000)
    >>> p = Problem((t,), arrival_rate=1.0, latency_penalty=0.1)
    >>> round(p.metrics(np.array([100.0])).rho, 3)
    0.25
    """

    types: tuple[TaskType, ...]
    arrival_rate: float
    latency_penalty: float
    rho_max: float = 0.95
    queue: QueueModel = field(default_factory=MG1)
    prior: Array = field(init=False, repr=False, compare=False)
    weight: Array = field(init=False, repr=False, compare=False)
    base: Array = field(init=False, repr=False, compare=False)
    gain: Array = field(init=False, repr=False, compare=False)
    rate: Array = field(init=False, repr=False, compare=False)
    t0: Array = field(init=False, repr=False, compare=False)
    c: Array = field(init=False, repr=False, compare=False)
    v: Array = field(init=False, repr=False, compare=False)
    lo: Array = field(init=False, repr=False, compare=False)
    hi: Array = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        types = tuple(self.types)
        if not types:
            raise ValueError("types: at least one task type is required")
        for t in types:
            if not isinstance(t, TaskType):
                raise ValueError(f"types: expected TaskType, got {type(t).__name__}")
        names = [t.name for t in types]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"types: duplicate type names {dup}")
        total = math.fsum(t.prior for t in types)
        if abs(total - 1.0) > PRIOR_SUM_TOLERANCE:
            raise ValueError(f"prior: the priors of all types must sum to 1, got {total!r}")
        for key, value in (
            ("arrival_rate", self.arrival_rate),
            ("latency_penalty", self.latency_penalty),
            ("rho_max", self.rho_max),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key}: must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{key}: must be finite, got {value!r}")
        if self.arrival_rate < 0:
            raise ValueError(f"arrival_rate: must be >= 0, got {self.arrival_rate!r}")
        if self.latency_penalty < 0:
            raise ValueError(f"latency_penalty: must be >= 0, got {self.latency_penalty!r}")
        if not 0 < self.rho_max < 1:
            raise ValueError(f"rho_max: must be in (0, 1), got {self.rho_max!r}")
        object.__setattr__(self, "types", types)
        put = object.__setattr__
        put(self, "prior", _frozen([t.prior / total for t in types]))
        put(self, "weight", _frozen([t.weight for t in types]))
        put(self, "base", _frozen([t.accuracy_base for t in types]))
        put(self, "gain", _frozen([t.accuracy_gain for t in types]))
        put(self, "rate", _frozen([t.accuracy_rate for t in types]))
        put(self, "t0", _frozen([t.overhead_s for t in types]))
        put(self, "c", _frozen([t.per_token_s for t in types]))
        put(self, "v", _frozen([t.variance_s2 for t in types]))
        put(self, "lo", _frozen([float(t.min_tokens) for t in types]))
        put(self, "hi", _frozen([float(t.max_tokens) for t in types]))

    # -- construction helpers -------------------------------------------------

    @property
    def size(self) -> int:
        """Number of task types N."""
        return len(self.types)

    @property
    def names(self) -> tuple[str, ...]:
        """Type names in order."""
        return tuple(t.name for t in self.types)

    def with_arrival_rate(self, arrival_rate: float) -> Problem:
        """The same problem at another arrival rate."""
        return Problem(self.types, arrival_rate, self.latency_penalty, self.rho_max, self.queue)

    @property
    def kappa(self) -> float:
        """Load per second of mean service time: ``rho = kappa m1 + rho0`` (lambda for M/G/1)."""
        return self.arrival_rate * self.queue.load_factor()

    @property
    def rho0(self) -> float:
        """The load that does not scale with m1 (0 but for a batching engine whose prefills
        pause the batch: :class:`BatchingEngine`)."""
        return self.queue.load_offset(self.arrival_rate)

    @property
    def load_cap(self) -> float:
        """The most ``kappa m1`` may reach within the margin: ``rho_max - rho0``."""
        return self.rho_max - self.rho0

    def queue_terms(self, m1: float) -> QueueTerms:
        """The queue model's ``Ta``, ``Tb`` and derivatives at mean service time ``m1`` (rho < 1)."""
        return self.queue.terms(self.arrival_rate, m1)

    @classmethod
    def from_arrays(cls, **arrays: Any) -> Problem:
        """Build a problem from per-type arrays (names default to ``t0``, ``t1``, ...).

        Keys: ``prior``, ``weight``, ``base``, ``gain``, ``rate``, ``t0``, ``c``, ``v``,
        ``lo``, ``hi`` (arrays), ``arrival_rate``, ``latency_penalty``, ``rho_max`` and
        optionally ``queue``.
        """
        scalars = {k: arrays.pop(k) for k in ("arrival_rate", "latency_penalty", "rho_max")}
        queue = arrays.pop("queue", MG1())
        prior = np.asarray(arrays.pop("prior"), dtype=float)
        n = prior.size
        names = arrays.pop("names", [f"t{k}" for k in range(n)])
        weight = np.asarray(arrays.pop("weight", np.ones(n)), dtype=float)
        v = np.asarray(arrays.pop("v", np.zeros(n)), dtype=float)
        cols = {k: np.asarray(arrays.pop(k)) for k in ("base", "gain", "rate", "t0", "c", "lo", "hi")}
        if arrays:
            raise ValueError(f"from_arrays: unknown keys {sorted(arrays)}")
        types = tuple(
            TaskType(
                name=str(names[k]),
                prior=float(prior[k]),
                weight=float(weight[k]),
                accuracy_base=float(cols["base"][k]),
                accuracy_gain=float(cols["gain"][k]),
                accuracy_rate=float(cols["rate"][k]),
                overhead_s=float(cols["t0"][k]),
                per_token_s=float(cols["c"][k]),
                variance_s2=float(v[k]),
                min_tokens=int(cols["lo"][k]),
                max_tokens=int(cols["hi"][k]),
            )
            for k in range(n)
        )
        return cls(types, **{k: float(val) for k, val in scalars.items()}, queue=queue)

    # -- the model -------------------------------------------------------------

    def service_times(self, x: Array) -> Array:
        """t_k(l_k) = t0_k + c_k l_k, seconds."""
        return self.t0 + self.c * x

    def moments(self, x: Array) -> tuple[float, float]:
        """First and second moments of the service time: m1 = sum pi t, m2 = sum pi (t^2 + v)."""
        t = self.service_times(x)
        return float(self.prior.dot(t)), float(self.prior.dot(t * t + self.v))

    def metrics(self, x: Array) -> QueueMetrics:
        """The queue model's metrics; for M/G/1 Pollaczek-Khinchine:
        E[W] = lambda m2 / (2 (1 - rho)), E[T] = m1 + E[W]."""
        m1, m2 = self.moments(x)
        lam = self.arrival_rate
        rho = self.kappa * m1 + self.rho0
        if lam == 0.0:
            return QueueMetrics(m1, m2, 0.0, 0.0, m1, 0.0)
        if rho >= 1.0:
            return QueueMetrics(m1, m2, rho, math.inf, math.inf, float(self.queue.slots))
        t_sys = self.queue_terms(m1).system_time(m2)
        busy = self.queue.occupancy(lam, m1)
        # Little: the mean time in service is occupancy / lambda; the rest is the wait.
        return QueueMetrics(m1, m2, rho, max(t_sys - busy / lam, 0.0), t_sys, busy)

    def accuracy(self, x: Array) -> Array:
        """p_k(l_k) = D_k + A_k (1 - exp(-b_k l_k))."""
        return self.base + self.gain * -np.expm1(-self.rate * x)

    def mean_accuracy(self, x: Array) -> float:
        """Weighted mean accuracy sum_k pi_k w_k p_k(l_k)."""
        return float(self.prior @ (self.weight * self.accuracy(x)))

    def objective(self, x: Array) -> float:
        """U(l) = sum pi w p(l) - gamma E[T](l); -inf when the queue is unstable."""
        t_sys = self.metrics(x).mean_system_time
        if math.isinf(t_sys):
            return -math.inf
        return self.mean_accuracy(x) - self.latency_penalty * t_sys

    def congestion(self, x: Array) -> Array:
        """Phi_k = dE[T]/dm1 + 2 t_k dE[T]/dm2 (M/G/1: 1 + lambda t_k / s + lambda^2 m2 / (2 s^2));
        +inf when unstable."""
        m1, m2 = self.moments(x)
        if self.kappa * m1 + self.rho0 >= 1.0:
            return np.full(self.size, math.inf)
        q = self.queue_terms(m1)
        result: Array = q.d_m1(m2) + 2.0 * q.tb * self.service_times(x)
        return result

    def gradient(self, x: Array) -> Array:
        """dU/dl_k = pi_k [w_k A_k b_k exp(-b_k l_k) - gamma c_k Phi_k] (DESIGN.md 1).

        Outside stability the types whose tokens cost time get -inf.
        """
        marginal = self.weight * self.gain * self.rate * np.exp(-self.rate * x)
        phi = self.congestion(x)
        if np.isinf(phi[0]):
            cost = np.where(self.c > 0, math.inf, 0.0) * self.latency_penalty
        else:
            cost = self.latency_penalty * self.c * phi
        result: Array = self.prior * (marginal - cost)
        return result

    def is_feasible(self, x: Array, *, atol: float = 1e-9) -> bool:
        """Inside the box and the stability margin rho <= rho_max (absolute slack ``atol``)."""
        x = np.asarray(x, dtype=float)
        if x.shape != (self.size,) or not np.all(np.isfinite(x)):
            return False
        in_box = bool(np.all(x >= self.lo - atol) and np.all(x <= self.hi + atol))
        return in_box and self.metrics(x).rho <= self.rho_max + atol

    @property
    def overloaded(self) -> bool:
        """Whether even minimal reasoning breaks the margin (the feasible set is empty)."""
        return self.metrics(self.lo).rho > self.rho_max
