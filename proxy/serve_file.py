"""Settings of ``thinkcap serve``: the ``[backend]`` and ``[proxy]`` tables plus the model.

Parsed once from the TOML file into frozen dataclasses and passed down; every error names
the key and the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from thinkcap.controller import METHODS
from thinkcap.estimators import accuracy, arrival, mix, service, service_model
from thinkcap.proxy.dialects import BUDGETS, DIALECTS, KEEP_ALIVE, reasoning_cap
from thinkcap.proxy.model_file import ModelConfig, backend_table, load_model, read_queue, read_replicas
from thinkcap.proxy.toml_reader import ConfigError, Table, read_toml
from thinkcap.proxy.transport import client, server


def parse_hostport(text: str, *, where: Table, key: str) -> tuple[str, int]:
    """``"host:port"`` with a port in 0..65535 (0 picks a free port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise where.error(key, f'must be "host:port", got {text!r}')
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class ReplicaSettings:
    """One replica of the backend: its URL and how many requests it runs at once."""

    url: str
    slots: int = 1

    @property
    def base(self) -> str:
        """The replica's root URL without a trailing ``/`` or ``/v1``."""
        return client.base_url(self.url)


@dataclass(frozen=True)
class BackendSettings:
    """The upstream model server: one replica (``url``), or several (``replicas``; ``url`` is
    then the first's and ``slots`` their sum).

    A replica is ejected after ``eject_after`` consecutive failures (connection refused,
    dropped mid-answer, a 5xx, or no byte within ``read_timeout_s``) and probed with a small
    chat request once ``probe_interval_s`` seconds have passed (doubled for each ejection
    since its last answered request, up to a minute) until it answers, then taken back.
    """

    url: str
    dialect: str = "vllm"
    api_key: str | None = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float | None = 300.0
    total_timeout_s: float | None = None
    answer_allowance: int = 0
    probe: bool = True
    model: str | None = None
    max_answer_bytes: int = client.MAX_ANSWER_BYTES
    slots: int = 1  # requests the server runs at once ([backend.step] is read with the model)
    thinks: bool = True  # llama-server: the model reasons (cap: thinking_budget_tokens), else max_tokens
    keep_alive: bool = True  # default: see KEEP_ALIVE
    replicas: tuple[ReplicaSettings, ...] = ()  # default: one, (url, slots)
    eject_after: int = 3
    probe_interval_s: float = 2.0
    budget: str = "auto"  # native | forced | auto (the start-up probe decides): see dialects.BUDGETS
    reasoning_tags: tuple[str, str] = ("<think>", "</think>")  # the model's own, for forcing
    engine_gauges_s: float | None = None  # poll each replica's /metrics this often (off by default)

    def __post_init__(self) -> None:
        if len(self.replicas) <= 1:  # one replica is (url, slots), also in a copy that changes them
            object.__setattr__(self, "replicas", (ReplicaSettings(self.url, self.slots),))

    @property
    def reasoning_cap(self) -> bool:
        """Whether the cap bounds the reasoning alone (else the whole answer)."""
        return reasoning_cap(self.dialect, self.thinks)

    @property
    def base(self) -> str:
        """The server's root URL without a trailing ``/`` or ``/v1``."""
        return client.base_url(self.url)

    def __repr__(self) -> str:
        key = "None" if self.api_key is None else "'***'"
        return f"BackendSettings(url={self.url!r}, dialect={self.dialect!r}, api_key={key})"


@dataclass(frozen=True)
class ProxySettings:
    """The listening side: addresses, admission and limits."""

    host: str = "127.0.0.1"
    port: int = 8000
    admin_host: str = "127.0.0.1"
    admin_port: int = 8002
    admin_token: str | None = None
    max_concurrency: int = 1  # default: the backend's slots
    max_queue: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    retry_after_s: int = 1
    min_drain_s: float = 5.0
    drain_timeout_s: float = 30.0
    default_type: str = ""
    log_content: bool = False
    max_connections: int = server.MAX_CONNECTIONS
    head_timeout_s: float = server.HEAD_TIMEOUT_S
    body_min_rate: int = server.BODY_MIN_RATE

    def __repr__(self) -> str:
        token = "None" if self.admin_token is None else "'***'"
        return (
            f"ProxySettings(listen={self.host}:{self.port}, admin={self.admin_host}:{self.admin_port}, token={token})"
        )


@dataclass(frozen=True)
class ClusterSettings:
    """The ``[cluster]`` table: several thinkcap replicas sharing one Redis (off without
    ``redis_url``).

    Every ``sync_interval_s`` each replica writes its estimates to Redis (they expire after
    ``3 x sync_interval_s`` unless rewritten) and reads the others'. One replica holds the
    leader lease (``lease_s``, renewed every sync) and decides on the merged estimates; every
    replica applies the newest published decision. With Redis unreachable a replica keeps the
    caps in force (``fallback = "static"``; shedding decays to off) or decides alone on its own estimates with the
    arrival rate scaled by the replicas last seen (``fallback = "local"``). ``replica_id``
    defaults to the host name and process id.
    """

    redis_url: str | None = None
    key_prefix: str = "thinkcap"
    replica_id: str | None = None
    lease_s: float = 5.0
    sync_interval_s: float = 1.0
    fallback: str = "static"
    redis_timeout_s: float = 1.0


FALLBACKS = ("static", "local")


@dataclass(frozen=True)
class ControllerSettings:
    """The ``[controller]`` table.

    A cap is republished when it moves by more than ``max(hysteresis_tokens,
    hysteresis_relative x old cap)`` and the new caps score at least the old ones at both ends
    of the arrival rate's band of ``hysteresis_rate_z`` standard errors (0: no band), so that
    the rate's noise does not swing them; all caps are, whatever the hysteresis, when the predicted
    mean system time at the caps in force exceeds the new caps' by more than
    ``hysteresis_latency`` (a fraction), and in overload when the caps in force are not the
    minimum caps. Overload (no stable allocation even at the minimum caps) sheds the share of
    arrivals the server cannot take, on evidence only: the load at the minimum caps exceeds
    ``rho_max`` at the arrival rate's lower confidence bound, and the admission queue holds
    requests (no fewer than at the decision before). An overload without that evidence is
    logged (``overload_unconfirmed``) and everything is admitted. While shedding, the admit
    fraction follows the load at every decision (``shed_release x rho_max`` over the load at
    the minimum caps, which counts shed arrivals too), and shedding ends once that load is
    at most ``rho_max``; a failed decision halves the share shed. Once shedding starts or
    stops it holds for ``shed_min_dwell_s`` seconds. The arrival-rate change detector asks for
    an early decision at most once every ``min_resolve_interval_s`` seconds. The estimated
    arrival rate replaces ``[workload] arrival_rate`` once ``min_arrivals`` requests have
    arrived.
    """

    enabled: bool = True
    interval_s: float = 2.0
    method: str = "exact"
    hysteresis_tokens: int = 8
    hysteresis_relative: float = 0.05
    hysteresis_latency: float = 0.2
    hysteresis_rate_z: float = 2.0
    shed_release: float = 0.9
    shed_min_dwell_s: float = 10.0
    min_resolve_interval_s: float = 1.0
    min_arrivals: int = 20


@dataclass(frozen=True)
class EstimatorSettings:
    """The ``[estimators]`` table: time constants of the online estimators, and when graded
    feedback replaces a type's configured accuracy curve in the solve: once it holds
    ``accuracy_min_samples`` graded answers in ``accuracy_min_levels`` distinct token levels
    (five answers each) and the fitted accuracy's standard error is at most
    ``accuracy_max_stderr`` wherever feedback fell. The fit is the posterior mode with the
    configured curve worth ``accuracy_prior_strength`` answers, so it is shrunk toward the
    configured curve while the evidence is thin."""

    arrival_half_life_s: float = arrival.HALF_LIFE_S
    detector_window_s: float = arrival.FAST_HALF_LIFE_S
    detector_reference_s: float = arrival.REFERENCE_HALF_LIFE_S
    mix_half_life_s: float = mix.HALF_LIFE_S
    mix_concentration: float = mix.CONCENTRATION
    service_min_samples: int = service_model.MIN_SAMPLES
    service_forgetting: float = service.FORGETTING
    accuracy_prior_strength: float = accuracy.PRIOR_STRENGTH
    accuracy_min_samples: int = 50
    accuracy_min_levels: int = 3
    accuracy_max_stderr: float = 0.1


@dataclass(frozen=True)
class ExtprocSettings:
    """The ``[extproc]`` table: ``thinkcap extproc``, the Envoy external processor.

    ``listen`` is where its gRPC service (the processor and the health checks) listens. A
    message's work is synchronous (well under a millisecond); one that takes longer than
    ``message_timeout_s`` is logged (``slow_message``): set Envoy's ``message_timeout`` above
    it, or Envoy gives up on the message first.
    """

    host: str = "127.0.0.1"
    port: int = 9002
    message_timeout_s: float = 0.15


@dataclass(frozen=True)
class Settings:
    """Everything ``thinkcap serve`` reads from its config file."""

    model: ModelConfig
    backend: BackendSettings
    proxy: ProxySettings = field(default_factory=ProxySettings)
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    estimators: EstimatorSettings = field(default_factory=EstimatorSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    extproc: ExtprocSettings = field(default_factory=ExtprocSettings)

    def with_backend(self, **changes: Any) -> Settings:
        """A copy with some backend settings changed."""
        return replace(self, backend=replace(self.backend, **changes))

    def with_proxy(self, **changes: Any) -> Settings:
        """A copy with some proxy settings changed."""
        return replace(self, proxy=replace(self.proxy, **changes))

    def with_extproc(self, **changes: Any) -> Settings:
        """A copy with some extproc settings changed."""
        return replace(self, extproc=replace(self.extproc, **changes))


def _optional_timeout(t: Table, name: str, default: float | None) -> float | None:
    value = t.raw(name)
    if value is None:
        return default
    if value is False or value == 0:
        return None
    return t.number(name, lo=0.0, lo_open=True)


def _backend(t: Table) -> BackendSettings:
    replicas = tuple(ReplicaSettings(url, slots) for url, slots in read_replicas(t))
    api_key = t.raw("api_key")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise t.error("api_key", "must be a non-empty string")
    model = t.raw("model")
    if model is not None and not isinstance(model, str):
        raise t.error("model", "must be a string")
    probe = t.boolean("probe", BackendSettings.probe)
    dialect = t.string("dialect", BackendSettings.dialect, choices=DIALECTS)
    thinks = t.boolean("thinks")
    if thinks is not None and dialect != "llama-server":
        raise t.error("thinks", 'is read with dialect = "llama-server" only')
    keep_alive = t.boolean("keep_alive")
    budget = t.string("budget", BackendSettings.budget, choices=BUDGETS)
    tags = t.strings("reasoning_tags") or BackendSettings.reasoning_tags
    if len(tags) != 2 or not all(tags):
        raise t.error("reasoning_tags", f"must be two non-empty strings, the start and end tags, got {list(tags)!r}")
    out = BackendSettings(
        url=replicas[0].url,
        replicas=replicas,
        eject_after=t.integer("eject_after", BackendSettings.eject_after, lo=1),
        probe_interval_s=t.number("probe_interval_s", BackendSettings.probe_interval_s, lo=0.0, lo_open=True),
        dialect=dialect,
        keep_alive=KEEP_ALIVE.get(dialect, BackendSettings.keep_alive) if keep_alive is None else keep_alive,
        thinks=BackendSettings.thinks if thinks is None else thinks,
        api_key=api_key,
        connect_timeout_s=t.number("connect_timeout_s", BackendSettings.connect_timeout_s, lo=0.0, lo_open=True),
        read_timeout_s=_optional_timeout(t, "read_timeout_s", BackendSettings.read_timeout_s),
        total_timeout_s=_optional_timeout(t, "total_timeout_s", BackendSettings.total_timeout_s),
        answer_allowance=t.integer("answer_allowance", BackendSettings.answer_allowance, lo=0),
        probe=probe,
        model=model,
        max_answer_bytes=t.integer("max_answer_bytes", BackendSettings.max_answer_bytes, lo=1024),
        slots=read_queue(t).slots,  # the replicas' sum
        budget=budget,
        reasoning_tags=(tags[0], tags[1]),
        engine_gauges_s=_optional_timeout(t, "engine_gauges_s", BackendSettings.engine_gauges_s),
    )
    t.close()
    return out


def _proxy(t: Table, type_names: list[str], slots: int = 1) -> ProxySettings:
    host, port = parse_hostport(t.string("listen", f"{ProxySettings.host}:{ProxySettings.port}"), where=t, key="listen")
    admin_host, admin_port = parse_hostport(
        t.string("admin_listen", f"{ProxySettings.admin_host}:{ProxySettings.admin_port}"), where=t, key="admin_listen"
    )
    token = t.raw("admin_token")
    if token is not None and (not isinstance(token, str) or not token):
        raise t.error("admin_token", "must be a non-empty string")
    default_type = t.string("default_type", type_names[-1])
    if default_type not in type_names:
        raise t.error("default_type", f"must be one of {type_names}, got {default_type!r}")
    log_content = t.boolean("log_content", ProxySettings.log_content)
    out = ProxySettings(
        host=host,
        port=port,
        admin_host=admin_host,
        admin_port=admin_port,
        admin_token=token,
        max_concurrency=t.integer("max_concurrency", slots, lo=1),
        max_queue=t.integer("max_queue", ProxySettings.max_queue, lo=0),
        max_body_bytes=t.integer("max_body_bytes", ProxySettings.max_body_bytes, lo=1024),
        retry_after_s=t.integer("retry_after_s", ProxySettings.retry_after_s, lo=1),
        min_drain_s=t.number("min_drain_s", ProxySettings.min_drain_s, lo=0.0),
        drain_timeout_s=t.number("drain_timeout_s", ProxySettings.drain_timeout_s, lo=0.0),
        default_type=default_type,
        log_content=log_content,
        max_connections=t.integer("max_connections", ProxySettings.max_connections, lo=1),
        head_timeout_s=t.number("head_timeout_s", ProxySettings.head_timeout_s, lo=0.0, lo_open=True),
        body_min_rate=t.integer("body_min_rate", ProxySettings.body_min_rate, lo=0),
    )
    t.close()
    return out


def _controller(t: Table) -> ControllerSettings:
    d = ControllerSettings()
    out = ControllerSettings(
        enabled=t.boolean("enabled", d.enabled),
        interval_s=t.number("interval_s", d.interval_s, lo=0.0, lo_open=True),
        method=t.string("method", d.method, choices=tuple(sorted(METHODS))),
        hysteresis_tokens=t.integer("hysteresis_tokens", d.hysteresis_tokens, lo=0),
        hysteresis_relative=t.number("hysteresis_relative", d.hysteresis_relative, lo=0.0),
        hysteresis_latency=t.number("hysteresis_latency", d.hysteresis_latency, lo=0.0),
        hysteresis_rate_z=t.number("hysteresis_rate_z", d.hysteresis_rate_z, lo=0.0),
        shed_release=t.number("shed_release", d.shed_release, lo=0.0, lo_open=True, hi=1.0),
        shed_min_dwell_s=t.number("shed_min_dwell_s", d.shed_min_dwell_s, lo=0.0),
        min_resolve_interval_s=t.number("min_resolve_interval_s", d.min_resolve_interval_s, lo=0.0),
        min_arrivals=t.integer("min_arrivals", d.min_arrivals, lo=0),
    )
    t.close()
    return out


def _cluster(t: Table) -> ClusterSettings:
    d = ClusterSettings()
    url = t.raw("redis_url")
    if url is not None and (not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://"))):
        raise t.error("redis_url", f"must be a redis://, rediss:// or unix:// URL, got {url!r}")
    replica_id = t.raw("replica_id")
    if replica_id is not None and (not isinstance(replica_id, str) or not replica_id.strip()):
        raise t.error("replica_id", "must be a non-empty string")
    out = ClusterSettings(
        redis_url=url,
        key_prefix=t.string("key_prefix", d.key_prefix),
        replica_id=replica_id,
        lease_s=t.number("lease_s", d.lease_s, lo=0.0, lo_open=True),
        sync_interval_s=t.number("sync_interval_s", d.sync_interval_s, lo=0.0, lo_open=True),
        fallback=t.string("fallback", d.fallback, choices=FALLBACKS),
        redis_timeout_s=t.number("redis_timeout_s", d.redis_timeout_s, lo=0.0, lo_open=True),
    )
    if out.sync_interval_s * 2 > out.lease_s:
        raise t.error(
            "sync_interval_s", f"must be at most half of lease_s ({out.lease_s:g}) so the lease is renewed in time"
        )
    t.close()
    return out


def _estimators(t: Table) -> EstimatorSettings:
    d = EstimatorSettings()
    out = EstimatorSettings(
        arrival_half_life_s=t.number("arrival_half_life_s", d.arrival_half_life_s, lo=0.0, lo_open=True),
        detector_window_s=t.number("detector_window_s", d.detector_window_s, lo=0.0, lo_open=True),
        detector_reference_s=t.number("detector_reference_s", d.detector_reference_s, lo=0.0, lo_open=True),
        mix_half_life_s=t.number("mix_half_life_s", d.mix_half_life_s, lo=0.0, lo_open=True),
        mix_concentration=t.number("mix_concentration", d.mix_concentration, lo=0.0),
        service_min_samples=t.integer("service_min_samples", d.service_min_samples, lo=0),
        service_forgetting=t.number("service_forgetting", d.service_forgetting, lo=0.0, lo_open=True, hi=1.0),
        accuracy_prior_strength=t.number("accuracy_prior_strength", d.accuracy_prior_strength, lo=0.0, lo_open=True),
        accuracy_min_samples=t.integer("accuracy_min_samples", d.accuracy_min_samples, lo=0),
        accuracy_min_levels=t.integer("accuracy_min_levels", d.accuracy_min_levels, lo=1),
        accuracy_max_stderr=t.number("accuracy_max_stderr", d.accuracy_max_stderr, lo=0.0, lo_open=True),
    )
    if out.detector_window_s >= out.detector_reference_s:
        raise t.error("detector_window_s", "must be shorter than detector_reference_s")
    t.close()
    return out


def load_settings(path: str | Path, data: Mapping[str, Any] | None = None) -> Settings:
    """Read a full ``thinkcap serve`` config: model, ``[backend]`` (required) and ``[proxy]``."""
    raw = read_toml(path) if data is None else data
    model = load_model(path, raw)
    root = Table(path, "", raw)
    if "backend" not in root.data and "backends" not in root.data:
        raise ConfigError(path, "backend", "a [backend] table with at least url is required")
    root.seen.update({"backend", "backends"})
    backend = _backend(backend_table(path, root.data))
    proxy = _proxy(root.table("proxy"), [t.task.name for t in model.types], backend.slots)
    controller = _controller(root.table("controller"))
    estimators = _estimators(root.table("estimators"))
    cluster = _cluster(root.table("cluster"))
    extproc = _extproc(root.table("extproc"))
    return Settings(model=model, backend=backend, proxy=proxy, controller=controller, estimators=estimators,
                    cluster=cluster, extproc=extproc)  # fmt: skip


def _extproc(t: Table) -> ExtprocSettings:
    d = ExtprocSettings()
    host, port = parse_hostport(t.string("listen", f"{d.host}:{d.port}"), where=t, key="listen")
    timeout = t.number("message_timeout_s", d.message_timeout_s, lo=0.0, lo_open=True)
    out = ExtprocSettings(host=host, port=port, message_timeout_s=timeout)
    t.close()
    return out
