"""Prometheus metrics of one proxy, in a registry of its own (no global state)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from thinkcap.estimators import Snapshot
from thinkcap.proxy.admission import Admission

TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
#: The bucket boundaries of OpenTelemetry's GenAI semantic conventions, per metric.
GENAI_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
GENAI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
GENAI_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
GENAI_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


def _reader(obj: Any, name: str) -> Callable[[], float]:
    """Reads ``obj.name`` as a number at each scrape."""
    return lambda: float(getattr(obj, name))


class Metrics:
    """Counters, histograms and gauges named ``thinkcap_*``."""

    def __init__(self, type_names: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "thinkcap_requests", "Finished requests by type and HTTP status", ["type", "status"], registry=r
        )
        self.system_time = Histogram(
            "thinkcap_system_time_seconds", "Arrival to last byte", ["type"], buckets=TIME_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "thinkcap_queue_wait_seconds", "Time in the admission queue", ["type"], buckets=TIME_BUCKETS, registry=r
        )
        self.tokens = Counter("thinkcap_tokens", "Tokens by type and kind", ["type", "kind"], registry=r)
        self.tokens_unknown = Counter(
            "thinkcap_token_counts_unknown",
            "Answered requests whose count of this kind the backend did not report (and no stream gave)",
            ["type", "kind"],
            registry=r,
        )
        self.caps = Gauge("thinkcap_cap_tokens", "Reasoning-token cap in force", ["type"], registry=r)
        self.queue_length = Gauge("thinkcap_queue_length", "Requests waiting for admission", registry=r)
        self.in_flight = Gauge(
            "thinkcap_in_flight", "Requests holding an admission slot (being served upstream)", registry=r
        )
        self.in_service = Gauge(
            "thinkcap_in_service", "Requests sent upstream and not yet answered in full", registry=r
        )
        self.replica_healthy = Gauge(
            "thinkcap_replica_healthy", "1 while a backend replica is in use, 0 while it is ejected", ["replica"],
            registry=r,
        )  # fmt: skip
        self.replica_in_service = Gauge(
            "thinkcap_replica_in_service", "Requests in service on a backend replica", ["replica"], registry=r
        )
        self.replica_ejections = Gauge(
            "thinkcap_replica_ejections", "Times a backend replica was ejected since start", ["replica"], registry=r
        )
        self.engine_requests = Gauge(
            "thinkcap_engine_requests", "A replica's requests as its engine reports them ([backend] engine_gauges_s)",
            ["replica", "state"], registry=r,
        )  # fmt: skip
        self.step_seconds = Gauge(
            "thinkcap_step_seconds", "Fitted engine step time tau(j) = a + b j: a (base) and b (per_seq)", ["term"],
            registry=r,
        )  # fmt: skip
        self.arrival_rate = Gauge("thinkcap_arrival_rate", "Estimated arrival rate, requests/s", registry=r)
        self.prior = Gauge("thinkcap_type_prior", "Estimated share of requests by type", ["type"], registry=r)
        self.overhead = Gauge(
            "thinkcap_service_overhead_seconds", "Estimated service overhead t0", ["type"], registry=r
        )
        self.per_token = Gauge(
            "thinkcap_service_per_token_seconds", "Estimated seconds per token c", ["type"], registry=r
        )
        self.rho = Gauge("thinkcap_load", "Predicted server load rho at the caps in force", registry=r)
        self.predicted_system_time = Gauge(
            "thinkcap_predicted_system_time_seconds", "Predicted mean system time", registry=r
        )
        self.solve_time = Gauge("thinkcap_solve_time_seconds", "Duration of the last solve", registry=r)
        self.cluster_errors = Counter(
            "thinkcap_cluster_errors",
            "Errors the cluster's sync and listen loops logged and went on from",
            ["task"],
            registry=r,
        )
        # OpenTelemetry's GenAI conventions, as Prometheus names them, beside the thinkcap_* ones
        op = ["gen_ai_operation_name"]
        self.genai_tokens = Histogram(
            "gen_ai_client_token_usage", "Tokens per answered request, by gen_ai_token_type (input, output, reasoning)",
            [*op, "gen_ai_token_type"], buckets=GENAI_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.genai_duration = Histogram(
            "gen_ai_server_request_duration", "Seconds from sending a request upstream to its answer's end", op,
            buckets=GENAI_DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.genai_ttft = Histogram(
            "gen_ai_server_time_to_first_token", "Seconds from sending a streamed request upstream to its first token",
            op, buckets=GENAI_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.genai_tpot = Histogram(
            "gen_ai_server_time_per_output_token", "Seconds per output token after the first, streamed answers", op,
            buckets=GENAI_TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self._children: dict[tuple[Any, ...], Any] = {}
        self._requests: dict[tuple[str, str], Any] = {}
        self._system: dict[str, Any] = {}
        self._wait: dict[str, Any] = {}
        self._tokens: dict[tuple[str, str], Any] = {}
        self._unknown: dict[tuple[str, str], Any] = {}
        for name in type_names:
            self.caps.labels(name)

    def genai(
        self,
        operation: str,
        *,
        tokens: Mapping[str, int | None],
        duration_s: float | None,
        first_token_s: float | None,
        per_output_token_s: float | None,
    ) -> None:
        """One answered request in the GenAI conventions' metrics (a count not known is left out)."""
        for kind, count in tokens.items():
            if count is not None:
                self._child(self.genai_tokens, operation, kind).observe(count)
        for hist, seconds in ((self.genai_duration, duration_s), (self.genai_ttft, first_token_s),
                              (self.genai_tpot, per_output_token_s)):  # fmt: skip
            if seconds is not None:
                self._child(hist, operation).observe(seconds)

    def _child(self, metric: Any, *labels: str) -> Any:
        """A metric's label child, cached (this runs on every request)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def finished(self, name: str, status: str, system_time: float, tokens: Mapping[str, int | None]) -> None:
        """Count one finished request (label children are cached: this runs on every request); a
        token count of ``None`` is counted as unknown, not as 0."""
        key = (name, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(name, status)
        child.inc()
        hist = self._system.get(name)
        if hist is None:
            hist = self._system[name] = self.system_time.labels(name)
        hist.observe(system_time)
        for kind, value in tokens.items():
            if value is None:
                unknown = self._unknown.get((name, kind))
                if unknown is None:
                    unknown = self._unknown[name, kind] = self.tokens_unknown.labels(name, kind)
                unknown.inc()
            elif value:
                counter = self._tokens.get((name, kind))
                if counter is None:
                    counter = self._tokens[name, kind] = self.tokens.labels(name, kind)
                counter.inc(value)

    def waited(self, name: str, seconds: float) -> None:
        """Observe one admission wait (the label child is cached)."""
        hist = self._wait.get(name)
        if hist is None:
            hist = self._wait[name] = self.queue_wait.labels(name)
        hist.observe(seconds)

    def watch(self, admission: Admission, pool: Any = None) -> None:
        """Read the queue length, the requests in flight and those in service upstream (each
        replica's, if ``pool`` has several) at each scrape (nothing to update on the request path)."""
        self.queue_length.set_function(lambda: admission.queued)
        self.in_flight.set_function(lambda: admission.in_flight)
        if pool is None:
            return
        self.in_service.set_function(lambda: pool.in_service)
        for r in pool.replicas:
            self.replica_healthy.labels(r.url).set_function(_reader(r, "healthy"))
            self.replica_in_service.labels(r.url).set_function(_reader(r, "in_service"))
            self.replica_ejections.labels(r.url).set_function(_reader(r, "ejections"))

    def engine(self, replica: str, gauges: Mapping[str, float]) -> None:
        """A replica's engine gauges, as read from its ``/metrics``."""
        for state, value in gauges.items():
            self.engine_requests.labels(replica, state).set(value)

    def set_caps(self, caps: Mapping[str, int]) -> None:
        """Show the caps in force."""
        for name, cap in caps.items():
            self.caps.labels(name).set(cap)

    def set_estimates(self, snap: Snapshot) -> None:
        """Show an estimator snapshot."""
        self.arrival_rate.set(snap.arrival_rate)
        for t in snap.types:
            self.prior.labels(t.name).set(t.prior)
            self.overhead.labels(t.name).set(t.overhead_s)
            self.per_token.labels(t.name).set(t.per_token_s)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
