"""Pure optimisation of reasoning-token caps for an M/G/1 LLM server."""

from thinkcap.controller.iterative import fixed_point, projected_gradient
from thinkcap.controller.methods import DEFAULT_METHOD, METHODS, solve
from thinkcap.controller.problem import Problem, QueueMetrics, TaskType
from thinkcap.controller.result import SolveResult, Status
from thinkcap.controller.rounding import Rounded, round_caps, rounding_bound
from thinkcap.controller.structured import exact

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Problem",
    "QueueMetrics",
    "Rounded",
    "SolveResult",
    "Status",
    "TaskType",
    "exact",
    "fixed_point",
    "projected_gradient",
    "round_caps",
    "rounding_bound",
    "solve",
]
