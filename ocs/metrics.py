"""Prometheus metrics of the server, served on /metrics (prometheus-client).

Label values are small closed sets (command, request type, result code), so cardinality stays bounded.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REQUEST_TYPES = {1: "initial", 2: "update", 3: "termination", 4: "event", None: "unknown"}
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The server's metrics in their own registry (so tests and several servers in one process don't clash)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "ocs_diameter_requests", "Diameter requests answered", ["command", "type", "result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ocs_request_latency_seconds", "Time from request decoded to answer encoded", ["command"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.redis_latency = Histogram(
            "ocs_redis_call_latency_seconds", "Latency of one balance-store call (batched per loop tick)",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.open_sessions = Gauge("ocs_open_sessions", "Open credit-control sessions", registry=self.registry)
        self.peers = Gauge("ocs_connected_peers", "Diameter peers in the open state", registry=self.registry)
        self.cdr_records = Counter("ocs_cdr_records_written", "CDR records written to files",
                                   registry=self.registry)
        self.server_requests = Counter(
            "ocs_server_initiated_requests", "RAR/ASR sent, by the answer's result (timeout, undelivered)",
            ["command", "result"], registry=self.registry,
        )
        self.sessions_closed = Counter(
            "ocs_sessions_closed_outside_ccr", "Sessions closed without a CCR-T (supervision, peer restart, RAA/ASA)",
            ["cause"], registry=self.registry,
        )
        self.shed = Counter("ocs_overload_answers", "CCRs answered 3004 at once because too many were in flight",
                            ["type"], registry=self.registry)
        self._answer_children: dict[tuple, object] = {}
        self._ccr_latency = self.latency.labels("CCR")

    def observe_answer(self, request_type: int | None, result_code: int, command: str = "CCR") -> None:
        key = (command, request_type, result_code)
        child = self._answer_children.get(key)
        if child is None:
            child = self.requests.labels(command, REQUEST_TYPES.get(request_type, "unknown"), str(result_code))
            self._answer_children[key] = child
        child.inc()

    def observe_latency(self, seconds: float) -> None:
        self._ccr_latency.observe(seconds)

    def observe_redis(self, seconds: float) -> None:
        self.redis_latency.observe(seconds)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
