"""One entry point over the three solvers."""

from __future__ import annotations

from collections.abc import Callable

from thinkcap.controller.iterative import fixed_point, projected_gradient
from thinkcap.controller.problem import Array, Problem
from thinkcap.controller.result import SolveResult
from thinkcap.controller.structured import exact

METHODS: dict[str, Callable[..., SolveResult]] = {
    "exact": exact,
    "fixed_point": fixed_point,
    "projected_gradient": projected_gradient,
}
DEFAULT_METHOD = "exact"


def solve(p: Problem, *, method: str = DEFAULT_METHOD, x0: Array | None = None) -> SolveResult:
    """Solve ``p`` with the named method (``exact``, ``fixed_point``, ``projected_gradient``)."""
    try:
        fn = METHODS[method]
    except KeyError:
        raise ValueError(f"method: must be one of {sorted(METHODS)}, got {method!r}") from None
    return fn(p, x0=x0)
