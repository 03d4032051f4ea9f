"""Prometheus metrics of the server, served on /metrics (prometheus-client).

Label values are small closed sets (command, request type, result code), so cardinality stays bounded.

The three metrics every CCR touches (answers by command/type/result, the request latency, the Redis call
latency) are plain counters in this module, read by a custom collector at scrape time: prometheus-client's
Histogram.observe takes a lock per bucket and walks the bounds in Python, and Counter.inc takes a lock, which
was ≈ 5 µs of every request (BENCHMARKS.md). Here an observation is one `bisect` and two additions on the
event loop's thread; the scrape (another thread) copies the lists first. The exposition is the one
prometheus-client's own Counter and Histogram give (names, `_total`, `_bucket`/`_count`/`_sum`, `_created`).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

REQUEST_TYPES = {1: "initial", 2: "update", 3: "termination", 4: "event", None: "unknown"}
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class FastHistogram:
    """Bucket counts and a sum, without locks (observed from one thread; scraped as a snapshot)."""

    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = (*buckets, float("inf"))
        self.counts = [0] * len(self.bounds)  # per bucket, not cumulative: bucket i is (bounds[i-1], bounds[i]]
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        counts, total = list(self.counts), self.sum
        buckets, running = [], 0
        for bound, count in zip(self.bounds, counts, strict=True):
            running += count
            buckets.append((floatToGoString(bound), float(running)))
        return buckets, total


class _HotPathCollector(Collector):
    """Exposes the per-request metrics kept by `Metrics` as prometheus-client would."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        answers = CounterMetricFamily("ocs_diameter_requests", "Diameter requests answered",
                                      labels=["command", "type", "result"])
        for (command, request_type, result_code), count in list(m.answer_counts.items()):
            labels = [command, REQUEST_TYPES.get(request_type, "unknown"), str(result_code)]
            answers.add_metric(labels, float(count), created=m.answer_created.get(
                (command, request_type, result_code)))
        yield answers
        latency = HistogramMetricFamily("ocs_request_latency_seconds", "Time from request decoded to answer encoded",
                                        labels=["command"])
        for command, histogram in list(m.latencies.items()):
            buckets, total = histogram.cumulative()
            latency.add_metric([command], buckets, total)
            latency.add_sample("ocs_request_latency_seconds_created", {"command": command}, histogram.created)
        yield latency
        redis = HistogramMetricFamily("ocs_redis_call_latency_seconds",
                                      "Latency of one balance-store call (batched per loop tick)")
        buckets, total = m.redis_latency.cumulative()
        redis.add_metric([], buckets, total)
        redis.add_sample("ocs_redis_call_latency_seconds_created", {}, m.redis_latency.created)
        yield redis


class Metrics:
    """The server's metrics in their own registry (so tests and several servers in one process don't clash)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # the hot path's metrics (see the module docstring), exposed by _HotPathCollector
        self.answer_counts: dict[tuple, int] = {}  # (command, request type, result code) -> answers
        self.answer_created: dict[tuple, float] = {}
        self.latencies: dict[str, FastHistogram] = {"CCR": FastHistogram()}  # by command
        self._ccr_latency = self.latencies["CCR"]
        self.redis_latency = FastHistogram()
        self.registry.register(_HotPathCollector(self))
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
        self.shed = Counter("ocs_overload_answers",
                            "CCRs answered 3004 at once (too many in flight, or over the time budget)",
                            ["type"], registry=self.registry)

    def observe_answer(self, request_type: int | None, result_code: int, command: str = "CCR") -> None:
        key = (command, request_type, result_code)
        counts = self.answer_counts
        count = counts.get(key)
        if count is None:
            self.answer_created[key] = time.time()
            counts[key] = 1
        else:
            counts[key] = count + 1

    def observe_latency(self, seconds: float, command: str = "CCR") -> None:
        histogram = self._ccr_latency if command == "CCR" else self.latencies.get(command)
        if histogram is None:
            histogram = self.latencies[command] = FastHistogram()
        histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
        histogram.sum += seconds

    def observe_redis(self, seconds: float) -> None:
        histogram = self.redis_latency
        histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
        histogram.sum += seconds

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
