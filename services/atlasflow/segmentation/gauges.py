"""The segmentation service's scrape-time gauges (`atlasflow.common.metrics.Metrics.add_source`;
no grpc): the job queue and its oldest running job, Triton's availability as this replica
sees it, and the ensemble version it serves. docs/runbooks.md says what an SRE does with them."""

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


class VersionGauges(Protocol):
    """What `version_readings` needs (`activation.ServedVersionFollower`)."""

    in_step: bool

    @property
    def served_default(self) -> str: ...


def version_readings(follower: VersionGauges) -> list[Reading]:
    """``atlasflow_ensemble_version_served{version=<this replica's default>}`` 1, and
    ``atlasflow_ensemble_version_in_step`` 1/0: 0 = the activated version recorded in the
    database is not served here (missing or corrupt weights, Triton without its model), so this
    replica claims no jobs (`activation.ServedVersionFollower`); as of the last check."""
    return [
        Reading("atlasflow_ensemble_version_served", follower.served_default, 1.0),
        Reading("atlasflow_ensemble_version_in_step", "", 1.0 if follower.in_step else 0.0),
    ]
