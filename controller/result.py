"""The one result record that every solver returns."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from numpy.typing import NDArray


class Status(IntEnum):
    """Why a solver stopped (scipy's vocabulary: 0 is success)."""

    CONVERGED = 0
    MAXITER = 1
    OVERLOAD = 2
    FAILED = 3


_MESSAGES = {
    Status.CONVERGED: "optimality (KKT) residual below tolerance",
    Status.MAXITER: "iteration limit reached before the tolerance",
    Status.OVERLOAD: "lambda * m1 > rho_max even at minimal reasoning; caps at their minimum",
    Status.FAILED: "numerical failure",
}


@dataclass(frozen=True)
class SolveResult:
    """The outcome of one solve.

    Attributes
    ----------
    x
        Continuous token allocation, one entry per type.
    fun
        Objective U(x) (-inf if the queue is unstable at ``x``).
    status
        A :class:`Status`; ``success`` and ``message`` derive from it.
    nit
        Iterations of the method's main loop.
    nfev
        Evaluations of the per-type map or of the gradient (one pass over all types each).
    residual
        Optimality residual in tokens (:func:`controller.kkt.kkt_residual`).
    method
        Name of the method that produced the result.
    multiplier
        mu >= 0, the multiplier of the margin constraint lambda m1 <= rho_max.
    contraction
        The fixed-point method's sufficient contraction factor kappa (``None`` for others).
    """

    x: NDArray[np.float64]
    fun: float
    status: Status
    nit: int
    nfev: int
    residual: float
    method: str
    multiplier: float = 0.0
    contraction: float | None = None

    @property
    def success(self) -> bool:
        """Whether the solver reached its tolerance."""
        return self.status is Status.CONVERGED

    @property
    def message(self) -> str:
        """A human-readable reason for ``status``."""
        return _MESSAGES[self.status]
