"""The model file: the ``[[types]]``, ``[objective]``, ``[workload]`` and the backend's queue
(``[backend]`` slots and step, its replicas) of a thinkcap config, as the optimisation
problem reads them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from thinkcap.controller import Problem, TaskType
from thinkcap.controller.queue import MG1, BatchingEngine, QueueModel
from thinkcap.proxy.toml_reader import ConfigError, Table, read_toml
from thinkcap.proxy.transport.client import base_url

#: Tables a config may hold; the ones this module does not read yet are passed through.
SECTIONS = ("backend", "backends", "proxy", "objective", "controller", "estimators", "cluster", "extproc", "workload",
            "types")  # fmt: skip
DEFAULT_RHO_MAX = 0.95
DEFAULT_ARRIVAL_RATE = 1.0


@dataclass(frozen=True)
class TypeConfig:
    """One ``[[types]]`` entry beyond the model parameters: how requests are recognised."""

    task: TaskType
    keywords: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    #: The configured prefill (``service.prefill_s``, part of the task's overhead), which holds
    #: up a batching engine's other sequences.
    prefill_s: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    """The optimisation model of a config file: types, objective and offline workload."""

    path: str
    types: tuple[TypeConfig, ...]
    latency_penalty: float
    rho_max: float
    arrival_rate: float
    queue: QueueModel = field(default_factory=MG1)

    def problem(self, arrival_rate: float | None = None) -> Problem:
        """The :class:`controller.Problem` at the workload rate (or ``arrival_rate``); a batching
        engine's queue model holds the types' mean configured prefill."""
        rate = self.arrival_rate if arrival_rate is None else arrival_rate
        return Problem(tuple(t.task for t in self.types), rate, self.latency_penalty, self.rho_max,
                       self.queue_with_prefill())  # fmt: skip

    def queue_with_prefill(self) -> QueueModel:
        """The queue model, a batching engine's with the types' mean configured prefill."""
        if not isinstance(self.queue, BatchingEngine):
            return self.queue
        total = math.fsum(t.task.prior for t in self.types)
        pause = math.fsum(t.task.prior * t.prefill_s for t in self.types) / total
        return replace(self.queue, prefill_s=pause)


def backend_table(path: str | Path, root: Mapping[str, Any]) -> Table:
    """The ``[backend]`` table, with a top-level ``[[backends]]`` list read as its replicas."""
    backend = root.get("backend", {})
    if "backends" not in root:
        return Table(path, "backend", backend)
    if isinstance(backend, Mapping) and ("url" in backend or "replicas" in backend):
        raise ConfigError(path, "backends", "give [backend] url, [[backend.replicas]] or [[backends]], one of them")
    if not isinstance(backend, Mapping):
        return Table(path, "backend", backend)
    return Table(path, "backend", {**backend, "replicas": root["backends"]}, aliases={"replicas": "backends"})


def read_replicas(backend: Table) -> tuple[tuple[str, int], ...]:
    """The backend's replicas, ``(url, slots)`` each: ``url`` (one URL or a list, each with
    ``[backend] slots``) or ``[[backend.replicas]]`` (``url`` and ``slots`` each, ``slots``
    defaulting to ``[backend] slots``)."""
    slots = backend.integer("slots", 1, lo=1)
    url = backend.raw("url")
    entries = backend.raw("replicas")
    if url is not None and entries is not None:
        raise backend.error("replicas", "give url or [[backend.replicas]], not both")
    out: list[tuple[str, int]] = []
    if entries is not None:
        if not isinstance(entries, list) or not entries:
            raise backend.error("replicas", "must be a non-empty array of tables: [[backend.replicas]] url = ...")
        for i, raw in enumerate(entries):
            entry = Table(backend.path, f"{backend.key('replicas')}[{i}]", raw)
            out.append((_url(entry, entry.string("url")), entry.integer("slots", slots, lo=1)))
            entry.close()
    elif isinstance(url, list):
        if not url or not all(isinstance(u, str) for u in url):
            raise backend.error("url", "must be a URL or a non-empty list of URLs")
        out = [(_url(backend, u), slots) for u in url]
    else:
        out = [(_url(backend, backend.string("url")), slots)]
    bases = [base_url(u) for u, _ in out]
    for i, b in enumerate(bases):
        if b in bases[:i]:
            raise backend.error("url" if entries is None else "replicas", f"replica {b!r} is listed twice")
    return tuple(out)


def _url(where: Table, url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise where.error("url", f"must be an http(s) URL, got {url!r}")
    return url


def read_queue(backend: Table) -> QueueModel:
    """``[backend] slots``, the replicas and ``[backend.step]``: M/G/1 for one replica with one
    slot, a batching engine otherwise (several replicas: a pool of them, each with the step:
    the line ``base_s + per_seq_s j``, and optionally ``levels_s``, the step measured at
    1, 2, ... sequences, which the line only extends).

    The caller closes ``backend``; the step table is closed here. A ``[backend]`` without a
    URL (a model-only file) is read as one replica.
    """
    if backend.data.get("url") is None and backend.data.get("replicas") is None:
        pool: tuple[int, ...] = (backend.integer("slots", 1, lo=1),)
    else:
        pool = tuple(slots for _, slots in read_replicas(backend))
    step = backend.table("step")
    if pool == (1,):
        if step.data:
            raise backend.error("step", "is only read with slots > 1 (one slot is the M/G/1 model)")
        step.close()
        return MG1()
    if not step.data:
        what = f"slots = {pool[0]}" if len(pool) == 1 else f"{len(pool)} replicas"
        raise backend.error("step", f"{what} needs the engine's step time: [backend.step] base_s, per_seq_s")
    base = step.number("base_s", lo=0.0)
    per_seq = step.number("per_seq_s", lo=0.0)
    levels = step.positive_numbers("levels_s")
    step.close()
    if base + per_seq <= 0:
        raise step.error("base_s", "base_s + per_seq_s must be > 0 (a step takes time)")
    return BatchingEngine(sum(pool), base, per_seq, pool if len(pool) > 1 else (), levels)


def read_task(entry: Table, queue: QueueModel | None = None) -> TaskType:
    """The model parameters of one ``[[types]]`` entry (the caller closes ``entry``).

    With a batching engine (``slots > 1`` or several replicas) a type's service time alone on the engine is
    ``prefill_s + overhead_s + tau(1) l``: the per-token time is the engine's step at one
    sequence, so ``service.per_token_s`` is an error there.
    """
    name = entry.string("name")
    acc = entry.table("accuracy")
    svc = entry.table("service")
    base = acc.number("base", 0.0, lo=0.0, hi=1.0)
    gain = acc.number("gain", lo=0.0, hi=1.0)
    if base + gain > 1.0:
        raise acc.error("gain", f"base + gain must be <= 1, got {base + gain:g}")
    lo = entry.integer("min_tokens", 0, lo=0)
    hi = entry.integer("max_tokens", lo=1)
    if lo > hi:
        raise entry.error("min_tokens", f"must be <= max_tokens ({hi}), got {lo}")
    if isinstance(queue, BatchingEngine):
        if "per_token_s" in svc.data:
            raise svc.error("per_token_s", "with [backend] slots > 1 the per-token time is [backend.step]'s")
        overhead = svc.number("prefill_s", 0.0, lo=0.0) + svc.number("overhead_s", 0.0, lo=0.0)
        per_token = queue.step_time(1.0)
    else:
        if "prefill_s" in svc.data:
            raise svc.error("prefill_s", "is read with [backend] slots > 1; with one slot use overhead_s")
        overhead = svc.number("overhead_s", lo=0.0)
        per_token = svc.number("per_token_s", lo=0.0)
    task = TaskType(
        name=name,
        prior=entry.number("prior", lo=0.0, lo_open=True, hi=1.0),
        weight=entry.number("weight", 1.0, lo=0.0),
        accuracy_base=base,
        accuracy_gain=gain,
        accuracy_rate=acc.number("rate", lo=0.0, lo_open=True),
        overhead_s=overhead,
        per_token_s=per_token,
        variance_s2=svc.number("variance_s2", 0.0, lo=0.0),
        min_tokens=lo,
        max_tokens=hi,
    )
    acc.close()
    svc.close()
    return task


def check_types(path: str | Path, tasks: list[TaskType]) -> None:
    """Type names are unique and the priors sum to one."""
    names = [t.name for t in tasks]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(path, f"types[{i}].name", f"duplicate type name {name!r}")
    total = math.fsum(t.prior for t in tasks)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(path, "types[*].prior", f"priors must sum to 1, got {total:.6g}")


def type_tables(root: Table) -> list[Table]:
    """The ``[[types]]`` entries of a file, at least one."""
    raw_types = root.raw("types")
    if not isinstance(raw_types, list) or not raw_types:
        raise root.error("types", "at least one [[types]] table is required")
    return [Table(root.path, f"types[{i}]", t) for i, t in enumerate(raw_types)]


def _type_config(entry: Table, queue: QueueModel) -> TypeConfig:
    task = read_task(entry, queue)  # checks service.prefill_s
    service = entry.raw("service")
    prefill = service.get("prefill_s", 0.0) if isinstance(service, Mapping) else 0.0
    out = TypeConfig(
        task=task,
        keywords=entry.strings("keywords"),
        patterns=entry.strings("patterns"),
        examples=entry.strings("examples"),
        prefill_s=float(prefill),
    )
    entry.close()
    return out


def load_model(path: str | Path, data: Mapping[str, Any] | None = None) -> ModelConfig:
    """Read the model part of a config: ``[objective]``, ``[workload]`` and ``[[types]]``."""
    root = Table(path, "", read_toml(path) if data is None else data)
    unknown = sorted(set(root.data) - set(SECTIONS))
    if unknown:
        raise root.error(unknown[0], f"unknown section (known: {', '.join(SECTIONS)})")
    objective = root.table("objective")
    workload = root.table("workload")
    # The [backend] table belongs to the serve settings; the model reads its queue keys only.
    queue = read_queue(backend_table(path, root.data))
    types = tuple(_type_config(t, queue) for t in type_tables(root))
    check_types(path, [t.task for t in types])
    cfg = ModelConfig(
        path=str(path),
        types=types,
        latency_penalty=objective.number("latency_penalty", lo=0.0),
        rho_max=objective.number("rho_max", DEFAULT_RHO_MAX, lo=0.0, lo_open=True, hi=1.0, hi_open=True),
        arrival_rate=workload.number("arrival_rate", DEFAULT_ARRIVAL_RATE, lo=0.0),
        queue=queue,
    )
    objective.close()
    workload.close()
    return cfg
