"""The ground truth of a simulated world: task types, server behaviour, faults and load.

A scenario is read from TOML by :func:`proxy.scenario_file.load_scenario`; this module only
holds the validated values, so the simulator never parses files itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from thinkcap.controller import Problem, TaskType
from thinkcap.controller.queue import MG1, BatchingEngine, QueueModel

#: Streaming field names under which reasoning-token deltas are sent.
REASONING_FIELDS = ("reasoning", "reasoning_content")
#: Where a server's ``usage`` reports reasoning tokens: ``openai`` (and vLLM from mid-2026) in
#: ``completion_tokens_details.reasoning_tokens``, ``sglang`` at the top level
#: (``usage.reasoning_tokens``), ``none`` nowhere (older vLLM, llama.cpp).
USAGE_SHAPES = ("openai", "sglang", "none")
#: The usage shape each thinkcap dialect's servers send.
DIALECT_USAGE = {
    "vllm": "openai",
    "openai": "openai",
    "sglang": "sglang",
    "llamacpp": "none",
    "max_tokens": "none",
    "llama-server": "none",
}


@dataclass(frozen=True)
class SimType:
    """One true task type: its model parameters plus how the server recognises and answers it.

    ``natural_tokens`` is how long the model thinks when nothing caps it; ``answer_tokens``
    follow the reasoning and cost ``per_token_s`` each like any generated token.
    """

    task: TaskType
    marker: str
    natural_tokens: int
    answer_tokens: int = 8
    prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.marker:
            raise ValueError(f"type {self.task.name!r}: marker must be a non-empty string")
        if self.natural_tokens < 0 or self.answer_tokens < 0:
            raise ValueError(f"type {self.task.name!r}: natural_tokens and answer_tokens must be >= 0")

    @property
    def name(self) -> str:
        """The type's name."""
        return self.task.name

    def accuracy(self, reasoning_tokens: int) -> float:
        """``p_k(l) = base + gain (1 - exp(-rate l))``, the probability of a correct answer."""
        t = self.task
        return t.accuracy_base + t.accuracy_gain * -math.expm1(-t.accuracy_rate * reasoning_tokens)

    def prompt(self, index: int) -> str:
        """Prompt number ``index`` (cycling), always carrying the type's marker."""
        text = self.prompts[index % len(self.prompts)] if self.prompts else f"A {self.name} question."
        return f"{self.marker} {text}"


@dataclass(frozen=True)
class Faults:
    """Per-request fault probabilities; each request draws at most one fault."""

    error_rate: float = 0.0
    stall_rate: float = 0.0
    stall_s: float = 5.0
    drop_rate: float = 0.0
    malformed_rate: float = 0.0

    def __post_init__(self) -> None:
        rates = (self.error_rate, self.stall_rate, self.drop_rate, self.malformed_rate)
        if any(not 0.0 <= r <= 1.0 for r in rates) or sum(rates) > 1.0:
            raise ValueError("fault rates must lie in [0, 1] and sum to at most 1")
        if not (math.isfinite(self.stall_s) and self.stall_s >= 0):
            raise ValueError(f"stall_s must be a finite number >= 0, got {self.stall_s!r}")

    def pick(self, u: float) -> str | None:
        """The fault chosen by a uniform number ``u`` in [0, 1), or ``None``."""
        for name, rate in (
            ("error", self.error_rate),
            ("stall", self.stall_rate),
            ("drop", self.drop_rate),
            ("malformed", self.malformed_rate),
        ):
            if u < rate:
                return name
            u -= rate
        return None


FAULT_KINDS = ("error", "stall", "drop", "malformed")


@dataclass(frozen=True)
class LoadPhase:
    """A stretch of the load schedule: a constant rate, or a linear ramp to ``rate_end``."""

    duration_s: float
    rate: float
    rate_end: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"duration_s must be a finite number > 0, got {self.duration_s!r}")
        for value in (self.rate, self.rate if self.rate_end is None else self.rate_end):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"rates must be finite numbers >= 0, got {value!r}")

    @property
    def end_rate(self) -> float:
        """The rate at the end of the phase."""
        return self.rate if self.rate_end is None else self.rate_end

    @property
    def mean_rate(self) -> float:
        """The average arrival rate over the phase."""
        return 0.5 * (self.rate + self.end_rate)


@dataclass(frozen=True)
class Scenario:
    """Everything the simulated server and the load generator need to know."""

    types: tuple[SimType, ...]
    latency_penalty: float = 0.0
    rho_max: float = 0.95
    model: str = "sim-reasoner"
    slots: int = 1
    time_scale: float = 1.0
    seed: int = 0
    reasoning_field: str = "reasoning"
    chunk_tokens: int = 4
    default_type: str = ""
    stream_usage: bool = True
    usage_shape: str = "openai"
    thinking_budget_supported: bool = True
    faults: Faults = field(default_factory=Faults)
    phases: tuple[LoadPhase, ...] = ()
    #: A continuous-batching engine (``[server] step``): its ``slots`` sequences advance one
    #: token per step; a type's ``overhead_s`` is then its prefill. ``None``: ``slots``
    #: independent servers, each serving one request at its own pace.
    engine: BatchingEngine | None = None

    def __post_init__(self) -> None:
        if not self.types:
            raise ValueError("a scenario needs at least one type")
        names = [t.name for t in self.types]
        if len(set(names)) != len(names):
            raise ValueError(f"type names must be unique, got {names}")
        if self.default_type and self.default_type not in names:
            raise ValueError(f"default_type {self.default_type!r} is not one of {names}")
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")
        if not (math.isfinite(self.time_scale) and self.time_scale >= 0):
            raise ValueError(f"time_scale must be a finite number >= 0, got {self.time_scale!r}")
        if self.reasoning_field not in REASONING_FIELDS:
            raise ValueError(f"reasoning_field must be one of {list(REASONING_FIELDS)}, got {self.reasoning_field!r}")
        if self.usage_shape not in USAGE_SHAPES:
            raise ValueError(f"usage_shape must be one of {list(USAGE_SHAPES)}, got {self.usage_shape!r}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if self.engine is not None and self.engine.slots != self.slots:
            raise ValueError(f"the engine has {self.engine.slots} slots, the server {self.slots}")

    @property
    def names(self) -> tuple[str, ...]:
        """The type names in order."""
        return tuple(t.name for t in self.types)

    @property
    def priors(self) -> np.ndarray[Any, np.dtype[np.float64]]:
        """The true type mix."""
        p = np.array([t.task.prior for t in self.types], dtype=np.float64)
        out: np.ndarray[Any, np.dtype[np.float64]] = p / p.sum()
        return out

    def by_name(self) -> Mapping[str, SimType]:
        """The types keyed by name."""
        return {t.name: t for t in self.types}

    def recognise(self, text: str) -> SimType:
        """The true type of a prompt: the first type whose marker it contains, else the default."""
        for t in self.types:
            if t.marker in text:
                return t
        return self.by_name()[self.default_type] if self.default_type else self.types[0]

    @property
    def wall_penalty(self) -> float:
        """The latency penalty per wall-clock second: ``latency_penalty / time_scale``.

        ``latency_penalty`` is per simulated second, so the accuracy-latency trade-off is the
        same whatever the time scale (a zero time scale leaves it unscaled).
        """
        return self.latency_penalty / self.time_scale if self.time_scale > 0 else self.latency_penalty

    def problem(self, arrival_rate: float, *, wall_clock: bool = True) -> Problem:
        """The true allocation problem at ``arrival_rate``, as the simulated server behaves.

        The answer tokens are part of the fixed overhead (``t0 = overhead + per_token x
        answer``), and caps above the natural length buy nothing, so ``max_tokens`` is clipped
        to it. With ``wall_clock`` (the default) times are in wall-clock seconds: service
        times are multiplied by ``time_scale``, the penalty is :attr:`wall_penalty`, and
        ``arrival_rate`` is per wall-clock second. With an engine, the queue model is the
        batching engine (its step scaled alike, and the types' mean prefill, which pauses it)
        and ``per_token`` is its step at one sequence.
        """
        s = self.time_scale if wall_clock and self.time_scale > 0 else 1.0
        engine = self.engine
        queue: QueueModel = MG1()  # an engine with one slot is exactly that
        if engine is not None and engine.slots > 1:
            prior = self.priors
            pause = s * float(prior @ np.array([t.task.overhead_s for t in self.types]))
            queue = BatchingEngine(engine.slots, s * engine.step_base_s, s * engine.step_per_seq_s, prefill_s=pause)
        tasks = []
        for t in self.types:
            k = t.task
            hi = min(k.max_tokens, t.natural_tokens)
            tasks.append(
                replace(
                    k,
                    overhead_s=s * (k.overhead_s + k.per_token_s * t.answer_tokens),
                    per_token_s=s * k.per_token_s,
                    variance_s2=s * s * k.variance_s2,
                    min_tokens=min(k.min_tokens, hi),
                    max_tokens=hi,
                )
            )
        return Problem(tuple(tasks), arrival_rate, self.latency_penalty / s, self.rho_max, queue)

    def with_phases(self, phases: Sequence[LoadPhase]) -> Scenario:
        """A copy with another load schedule."""
        return replace(self, phases=tuple(phases))
