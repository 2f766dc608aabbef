"""Prometheus metrics: RED per RPC (rate, errors, duration), stage latencies and the pipeline's
state (queue depth, lease age, outbox lag, free disk, Triton availability).

Labels carry only service, method, gRPC code, stage and queue names: never identifiers of
patients, studies or series (unbounded cardinality and PHI).

Gauges of the pipeline's state are computed when Prometheus scrapes (`Metrics.add_source`): a
source is a callback that asks the service's store (the shared database, the disk) and returns
`Reading`s. Every replica of a service answers from the same database, so a queue's depth is
right whichever replica is scraped: aggregate replicas with ``max by (service, queue)``, never
``sum``. A source that fails or takes longer than its timeout is left out of that scrape (its
series go missing for it) and counted in ``atlasflow_gauge_source_failures_total``.
docs/runbooks.md says what each metric means to an SRE.
"""

from __future__ import annotations

import concurrent.futures
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: the scrape-time gauge families: name -> (help, the label besides ``service``, or "" for none)
GAUGES: dict[str, tuple[str, str]] = {
    "atlasflow_queue_depth": ("Items waiting in a durable work queue or outbox.", "queue"),
    "atlasflow_lease_oldest_age_seconds": (
        "Age of the oldest running claim of a queue since its last heartbeat or progress, seconds (0: none).",
        "queue",
    ),
    "atlasflow_leases_expired": ("Running claims of a queue past their expiry, not yet taken back.", "queue"),
    "atlasflow_outbox_lag_seconds": ("Age of the oldest undelivered outbox row, seconds (0: none).", "outbox"),
    "atlasflow_disk_free_bytes": ("Free bytes of a directory's file system.", "dir"),
    "atlasflow_disk_floor_bytes": ("The free-disk floor below which new data is refused (0: off).", "dir"),
    "atlasflow_triton_up": ("Triton live with the model ready, as this segmentation replica sees it (1/0).", ""),
    "atlasflow_ensemble_version_served": (
        "The ensemble version this segmentation replica serves as its default for new jobs (value 1).",
        "version",
    ),
    "atlasflow_ensemble_version_in_step": (
        "1 when this segmentation replica serves the activated ensemble version recorded in the database"
        " (or none is recorded), 0 when it cannot and claims no jobs.",
        "",
    ),
    "atlasflow_gauge_source_up": ("1 when a scrape-time source answered in this scrape, 0 when it failed.", "source"),
}

#: buckets of ``atlasflow_stage_duration_seconds`` (a stage runs from milliseconds to an hour)
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

#: default wait for one source at scrape time, seconds
SOURCE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Reading:
    """One value of a scrape-time gauge: `family` one of `GAUGES`, `label` the value of its
    second label ("" for a family without one)."""

    family: str
    label: str
    value: float


Source = Callable[[], Iterable[Reading]]


class PendingCounter(Protocol):
    """What `Metrics.add_outbox` needs of an outbox store."""

    def pending(self) -> int: ...


def _run(source: Source) -> list[Reading]:
    readings = list(source())
    for r in readings:
        if r.family not in GAUGES:
            raise ValueError(f"unknown gauge family {r.family}")
    return readings


class _ScrapeCollector(Collector):
    """Emits the `GAUGES` families from the pushed queue depths and the sources."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name, (doc, label) in GAUGES.items():
            yield GaugeMetricFamily(name, doc, labels=["service", *([label] if label else [])])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values: dict[tuple[str, str], float] = {}
        for reading in [*self.m.pushed(), *self.m.read_sources(with_status=True)]:
            values[(reading.family, reading.label)] = reading.value
        for name, (doc, label) in GAUGES.items():
            fam = GaugeMetricFamily(name, doc, labels=["service", *([label] if label else [])])
            for (family, value_label), value in sorted(values.items()):
                if family == name:
                    fam.add_metric([self.m.service, *([value_label] if label else [])], value)
            yield fam


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
        self.stage_duration = Histogram(
            "atlasflow_stage_duration_seconds",
            "Time a pipeline stage took, seconds (ingest receive_to_assembled and assemble_volume,"
            " segmentation segmentation_job and triton_call, ranking ranking_update, labels label_write).",
            ["service", "stage"],
            registry=self.registry,
            buckets=STAGE_BUCKETS,
        )
        self.source_failures = Counter(
            "atlasflow_gauge_source_failures",
            "Scrape-time gauge sources that failed or timed out, by source.",
            ["service", "source"],
            registry=self.registry,
        )
        self._pushed: dict[tuple[str, str], float] = {}
        self._sources: dict[str, tuple[Source, float]] = {}
        self._lock = threading.Lock()
        # Each source call runs in its own daemon thread, so a slow database cannot hold a scrape
        # longer than its timeout nor the process at exit; a call still running when the next
        # scrape comes is not started again (that source counts as failed until it returns).
        self._running: dict[str, concurrent.futures.Future[list[Reading]]] = {}
        self.registry.register(_ScrapeCollector(self))

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_requests.labels(self.service, method, code).inc()
        self.rpc_duration.labels(self.service, method).observe(seconds)

    def set_queue_depth(self, queue: str, depth: int) -> None:
        """A queue depth pushed by a loop (a source's reading of the same queue wins)."""
        self.push(Reading("atlasflow_queue_depth", queue, float(depth)))

    def set_outbox_lag(self, outbox: str, seconds: float) -> None:
        """An outbox lag pushed by a dispatcher (a source's reading of the same outbox wins)."""
        self.push(Reading("atlasflow_outbox_lag_seconds", outbox, max(0.0, float(seconds))))

    def push(self, reading: Reading) -> None:
        """Set a scrape-time gauge from a loop: kept until replaced (a source's reading of the
        same family and label wins)."""
        if reading.family not in GAUGES:
            raise ValueError(f"unknown gauge family {reading.family}")
        with self._lock:
            self._pushed[(reading.family, reading.label)] = reading.value

    def pushed(self) -> list[Reading]:
        with self._lock:
            return [Reading(f, label, v) for (f, label), v in self._pushed.items()]

    def count(self, event: str, n: int = 1) -> None:
        self.events.labels(self.service, event).inc(n)

    def count_restart(self, part: str) -> None:
        self.background_restarts.labels(self.service, part).inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        """One run of a pipeline stage (`atlasflow_stage_duration_seconds`)."""
        self.stage_duration.labels(self.service, stage).observe(max(0.0, seconds))

    def add_source(self, name: str, source: Source, timeout_s: float = SOURCE_TIMEOUT_S) -> None:
        """Read `source` at every scrape (in a worker thread, at most `timeout_s` seconds); a
        second source of the same `name` replaces the first."""
        with self._lock:
            self._sources[name] = (source, timeout_s)

    def add_disk(self, dir_name: str, path: Path | str, floor_bytes: int = 0) -> None:
        """Free bytes of `path`'s file system and the floor (`atlasflow_disk_*{dir=dir_name}`)."""

        def read() -> list[Reading]:
            return [
                Reading("atlasflow_disk_free_bytes", dir_name, float(shutil.disk_usage(path).free)),
                Reading("atlasflow_disk_floor_bytes", dir_name, float(floor_bytes)),
            ]

        self.add_source(f"disk_{dir_name}", read)

    def add_outbox(self, outbox: str, store: PendingCounter) -> None:
        """Pending rows (``atlasflow_queue_depth{queue=<outbox>}``) and, when `store` has
        ``oldest_pending_age(now)``, the lag (``atlasflow_outbox_lag_seconds{outbox=<outbox>}``)
        of an outbox store (`atlasflow.common.outbox.OutboxStore`), read at every scrape."""
        pending = store.pending
        lag = getattr(store, "oldest_pending_age", None)

        def read() -> list[Reading]:
            out = [Reading("atlasflow_queue_depth", outbox, float(pending()))]
            if lag is not None:
                out.append(Reading("atlasflow_outbox_lag_seconds", outbox, max(0.0, float(lag(time.time())))))
            return out

        self.add_source(f"outbox_{outbox}", read)

    def read_sources(self, *, with_status: bool = False) -> list[Reading]:
        """Every source's readings (the failed and slow ones left out, counted); with
        `with_status`, also each source's ``atlasflow_gauge_source_up``."""
        with self._lock:
            sources = [(name, source, t) for name, (source, t) in self._sources.items()]
        futures = [(name, self._start(name, source), t) for name, source, t in sources]
        readings: list[Reading] = []
        deadline = time.monotonic()
        for name, future, timeout_s in futures:
            try:
                got = future.result(timeout=max(0.0, deadline + timeout_s - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - a scrape never fails on one source
                # type only: a database error's message may quote data
                log.warning("gauge source failed", extra={"fields": {"source": name, "error": type(exc).__name__}})
                self.source_failures.labels(self.service, name).inc()
                if with_status:
                    readings.append(Reading("atlasflow_gauge_source_up", name, 0.0))
                continue
            readings.extend(got)
            if with_status:
                readings.append(Reading("atlasflow_gauge_source_up", name, 1.0))
        return readings

    def _start(self, name: str, source: Source) -> concurrent.futures.Future[list[Reading]]:
        """The running call of `name` if one is still running, else a new one."""
        with self._lock:
            running = self._running.get(name)
            if running is not None and not running.done():
                return running
            future: concurrent.futures.Future[list[Reading]] = concurrent.futures.Future()
            self._running[name] = future

        def call() -> None:
            try:
                future.set_result(_run(source))
            except BaseException as exc:  # noqa: BLE001 - handed to the scrape
                future.set_exception(exc)

        threading.Thread(target=call, name=f"{self.service}-gauge-{name}", daemon=True).start()
        return future

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        if port:
            start_http_server(port, addr=host, registry=self.registry)


def lease_readings(queue: str, oldest_age_s: float, expired: int) -> list[Reading]:
    """The two lease gauges of one queue."""
    return [
        Reading("atlasflow_lease_oldest_age_seconds", queue, max(0.0, oldest_age_s)),
        Reading("atlasflow_leases_expired", queue, float(expired)),
    ]
