"""Pure optimisation of reasoning-token caps for an LLM server: the queue models (M/G/1, a
batching engine, a pool of engines), the problem, its solvers and the decision."""

from thinkcap.controller.decision import (
    Decision,
    admit_fraction,
    decide,
    load_at_min_caps,
    problem_from_record,
    problem_record,
    should_publish,
)
from thinkcap.controller.iterative import fixed_point, projected_gradient
from thinkcap.controller.methods import DEFAULT_METHOD, METHODS, solve
from thinkcap.controller.problem import Problem, QueueMetrics, TaskType
from thinkcap.controller.result import SolveResult, Status
from thinkcap.controller.rounding import Rounded, round_caps, rounding_bound
from thinkcap.controller.structured import exact

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Decision",
    "Problem",
    "QueueMetrics",
    "Rounded",
    "SolveResult",
    "Status",
    "TaskType",
    "admit_fraction",
    "decide",
    "exact",
    "fixed_point",
    "load_at_min_caps",
    "problem_from_record",
    "problem_record",
    "projected_gradient",
    "round_caps",
    "rounding_bound",
    "should_publish",
    "solve",
]
