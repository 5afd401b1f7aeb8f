"""Read a simulation scenario (``examples/scenario.toml``) into :class:`sim.scenario.Scenario`.

The ``[[types]]`` tables use the keys of the thinkcap config plus ``marker``,
``natural_tokens``, ``answer_tokens`` and ``prompts``; ``[server]``, ``[faults]`` and
``[load]`` describe the simulated server and the load schedule.
"""

from __future__ import annotations

from pathlib import Path

from thinkcap.controller.queue import BatchingEngine, QueueModel
from thinkcap.proxy.model_file import check_types, read_queue, read_task, type_tables
from thinkcap.proxy.toml_reader import ConfigError, Table, read_toml
from thinkcap.sim.scenario import REASONING_FIELDS, USAGE_SHAPES, Faults, LoadPhase, Scenario, SimType

SCENARIO_SECTIONS = ("objective", "server", "faults", "load", "types")


def _sim_type(entry: Table, queue: QueueModel | None) -> SimType:
    task = read_task(entry, queue)
    marker = entry.string("marker", f"[{task.name}]")
    if not marker.strip():
        raise entry.error("marker", "must not be blank")
    out = SimType(
        task=task,
        marker=marker,
        natural_tokens=entry.integer("natural_tokens", task.max_tokens, lo=0),
        answer_tokens=entry.integer("answer_tokens", 8, lo=0),
        prompts=entry.strings("prompts"),
    )
    entry.close()
    return out


def read_phases(table: Table) -> tuple[LoadPhase, ...]:
    """The ``[[load.phases]]`` list (may be empty)."""
    raw = table.raw("phases")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise table.error("phases", "must be an array of tables ([[load.phases]])")
    phases = []
    for i, item in enumerate(raw):
        t = Table(table.path, f"{table.key('phases')}[{i}]", item)
        rate = t.number("rate", lo=0.0)
        end = t.raw("rate_end")
        phases.append(
            LoadPhase(
                duration_s=t.number("duration_s", lo=0.0, lo_open=True),
                rate=rate,
                rate_end=None if end is None else t.number("rate_end", lo=0.0),
            )
        )
        t.close()
    return tuple(phases)


def load_scenario(path: str | Path) -> Scenario:
    """Parse and validate a scenario file; every error names the key and the file."""
    root = Table(path, "", read_toml(path))
    unknown = sorted(set(root.data) - set(SCENARIO_SECTIONS))
    if unknown:
        raise root.error(unknown[0], f"unknown section (known: {', '.join(SCENARIO_SECTIONS)})")
    objective, server, faults, load = (root.table(n) for n in ("objective", "server", "faults", "load"))
    # [server] step makes the server a batching engine; without it, slots independent servers.
    engine = read_queue(server) if "step" in server.data else None
    if engine is not None and not isinstance(engine, BatchingEngine):
        raise server.error("step", "a batching engine needs slots > 1")
    types = tuple(_sim_type(t, engine) for t in type_tables(root))
    check_types(path, [t.task for t in types])
    names = [t.name for t in types]
    default_type = server.string("default_type", "")
    if default_type and default_type not in names:
        raise server.error("default_type", f"must be one of {names}, got {default_type!r}")
    rates = {
        k: faults.number(k, 0.0, lo=0.0, hi=1.0) for k in ("error_rate", "stall_rate", "drop_rate", "malformed_rate")
    }
    if sum(rates.values()) > 1.0:
        raise ConfigError(path, "faults", f"the fault rates must sum to at most 1, got {sum(rates.values()):g}")
    fault_rates = Faults(stall_s=faults.number("stall_s", 5.0, lo=0.0), **rates)
    scenario = Scenario(
        types=types,
        latency_penalty=objective.number("latency_penalty", 0.0, lo=0.0),
        rho_max=objective.number("rho_max", 0.95, lo=0.0, lo_open=True, hi=1.0, hi_open=True),
        model=server.string("model", "sim-reasoner"),
        slots=server.integer("slots", 1, lo=1),
        time_scale=server.number("time_scale", 1.0, lo=0.0),
        seed=server.integer("seed", 0),
        reasoning_field=server.string("reasoning_field", "reasoning", choices=REASONING_FIELDS),
        chunk_tokens=server.integer("chunk_tokens", 1, lo=1),
        default_type=default_type,
        stream_usage=server.boolean("stream_usage", True),
        usage_shape=server.string("usage_shape", "openai", choices=USAGE_SHAPES),
        thinking_budget_supported=server.boolean("thinking_budget_supported", True),
        faults=fault_rates,
        phases=read_phases(load),
        engine=engine,
    )
    for t in (objective, server, faults, load, root):
        t.close()
    return scenario
