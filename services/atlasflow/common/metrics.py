"""Prometheus metrics: RED per RPC (rate, errors, duration) and queue depth.

Labels carry only service, method, gRPC code and queue names: never identifiers of patients,
studies or series (unbounded cardinality and PHI).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    """One registry per service process (tests may create several in one process)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.rpc_requests = Counter(
            "atlasflow_rpc_requests",
            "RPCs handled, by method and gRPC status code.",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.rpc_duration = Histogram(
            "atlasflow_rpc_duration_seconds",
            "RPC handling time in seconds.",
            ["service", "method"],
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
        )
        self.queue_depth = Gauge(
            "atlasflow_queue_depth",
            "Items waiting in a durable work queue or outbox.",
            ["service", "queue"],
            registry=self.registry,
        )
        self.events = Counter(
            "atlasflow_events",
            "Domain events (instances stored, jobs finished, ...).",
            ["service", "event"],
            registry=self.registry,
        )
        self.background_restarts = Counter(
            "atlasflow_background_restarts",
            "Background loops (assembler, outbox, worker) restarted after they died, by part.",
            ["service", "part"],
            registry=self.registry,
        )

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_requests.labels(self.service, method, code).inc()
        self.rpc_duration.labels(self.service, method).observe(seconds)

    def set_queue_depth(self, queue: str, depth: int) -> None:
        self.queue_depth.labels(self.service, queue).set(depth)

    def count(self, event: str, n: int = 1) -> None:
        self.events.labels(self.service, event).inc(n)

    def count_restart(self, part: str) -> None:
        self.background_restarts.labels(self.service, part).inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        if port:
            start_http_server(port, addr=host, registry=self.registry)
