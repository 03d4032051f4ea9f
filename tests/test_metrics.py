"""The per-request metrics kept outside prometheus-client (ocs.metrics) are exposed exactly as its own Counter
and Histogram would expose the same observations: same families, names, labels, buckets, counts and sums."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from ocs.metrics import LATENCY_BUCKETS, REQUEST_TYPES, Metrics

OBSERVATIONS = [0.0, 0.0004, 0.0005, 0.00051, 0.003, 0.02, 0.7, 2.5, 2.6, 30.0]
ANSWERS = [(1, 2001), (2, 2001), (2, 2001), (3, 2001), (4, 4012), (None, 5005), (1, 3004)]


def reference_exposition() -> str:
    registry = CollectorRegistry()
    requests = Counter("ocs_diameter_requests", "Diameter requests answered", ["command", "type", "result"],
                       registry=registry)
    latency = Histogram("ocs_request_latency_seconds", "Time from request decoded to answer encoded", ["command"],
                        buckets=LATENCY_BUCKETS, registry=registry)
    redis = Histogram("ocs_redis_call_latency_seconds", "Latency of one balance-store call (batched per loop tick)",
                      buckets=LATENCY_BUCKETS, registry=registry)
    latency.labels("CCR")
    for request_type, result in ANSWERS:
        requests.labels("CCR", REQUEST_TYPES[request_type], str(result)).inc()
    for seconds in OBSERVATIONS:
        latency.labels("CCR").observe(seconds)
        redis.observe(seconds / 10)
    latency.labels("CER").observe(0.001)
    return generate_latest(registry).decode()


def without_timestamps(text: str) -> list[str]:
    """The lines, with the value of each `_created` sample (a wall-clock time) blanked."""
    return [re.sub(r"(_created(\{[^}]*\})?) .*", r"\1 T", line) for line in text.splitlines()]


def test_hot_path_metrics_expose_like_prometheus_client():
    metrics = Metrics()
    for request_type, result in ANSWERS:
        metrics.observe_answer(request_type, result)
    for seconds in OBSERVATIONS:
        metrics.observe_latency(seconds)
        metrics.observe_redis(seconds / 10)
    metrics.observe_latency(0.001, command="CER")
    ours = without_timestamps(generate_latest(metrics.registry).decode())
    reference = without_timestamps(reference_exposition())
    hot = ("ocs_diameter_requests", "ocs_request_latency_seconds", "ocs_redis_call_latency_seconds")
    assert [line for line in ours if any(name in line for name in hot)] == reference


def test_a_fresh_server_exposes_the_empty_ccr_latency_and_redis_histograms():
    text = generate_latest(Metrics().registry).decode()
    assert 'ocs_request_latency_seconds_count{command="CCR"} 0.0' in text
    assert "ocs_redis_call_latency_seconds_count 0.0" in text
    assert "ocs_diameter_requests_total{" not in text
