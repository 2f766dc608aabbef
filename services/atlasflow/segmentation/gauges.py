"""The segmentation service's scrape-time gauges (`atlasflow.common.metrics.Metrics.add_source`;
no grpc): the job queue and its oldest running job, and Triton's availability as this replica
sees it. docs/runbooks.md says what an SRE does with them."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol

from atlasflow.common.metrics import Reading, lease_readings

#: queue name of the segmentation jobs (``atlasflow_queue_depth``, ``atlasflow_lease_*``)
JOBS_QUEUE = "segmentation_jobs"


class JobGauges(Protocol):
    def queued_count(self) -> int: ...

    def oldest_running_age(self, now: float) -> float: ...

    def expired_leases(self, now: float) -> int: ...


def job_readings(jobs: JobGauges) -> list[Reading]:
    """Jobs QUEUED or RUNNING; the age of the oldest RUNNING one since its claim or heartbeat,
    and the RUNNING ones whose lease expired (their replica died or hangs)."""
    now = time.time()
    return [
        Reading("atlasflow_queue_depth", JOBS_QUEUE, float(jobs.queued_count())),
        *lease_readings(JOBS_QUEUE, jobs.oldest_running_age(now), jobs.expired_leases(now)),
    ]


def triton_readings(segmenters: Iterable[object]) -> list[Reading]:
    """``atlasflow_triton_up`` 1 when every segmenter that can tell (has ``ready()``: the Triton
    clients) answers ready, else 0; nothing when none can tell (in-process segmenters)."""
    checks = [getattr(s, "ready", None) for s in segmenters]
    answers = [bool(check()) for check in checks if callable(check)]
    if not answers:
        return []
    return [Reading("atlasflow_triton_up", "", 1.0 if all(answers) else 0.0)]
