"""Segmentation gRPC servicer: converts a request, calls the job store, converts the answer.

Job store calls (SQLite) and blob look-ups (files) run in a worker thread (`asyncio.to_thread`),
never on the event loop; the store serialises them itself. The jobs run in `worker.Worker`.

ActivateEnsembleVersion records the version in the database before this replica swaps to it
(every replica follows the record: `activation.ServedVersionFollower`); new jobs default to the
recorded version on every replica (`served_now`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import timestamp_pb2
from opentelemetry import trace

from atlasflow.common.blobstore import BlobStore
from atlasflow.common.errors import FailedPrecondition, InvalidArgument, NotFound
from atlasflow.common.organs import ORGANS
from atlasflow.common.server import Context, author_of
from atlasflow.common.telemetry import current_traceparent
from atlasflow.common.v1 import common_pb2
from atlasflow.segmentation.activation import EnsembleRegistry, Loader
from atlasflow.segmentation.jobs import Job, JobStore
from atlasflow.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from atlasflow.segmentation.worker import DOMAIN, Worker, blob_ref

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

WAIT_DEFAULT_S = 60.0
WAIT_MAX_S = 600.0
# WaitSegmentationJob re-reads the job at least this often even without a change notice.
WAIT_RECHECK_S = 2.0
DONE_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")

_STATE = {
    "QUEUED": common_pb2.OPERATION_STATE_QUEUED,
    "RUNNING": common_pb2.OPERATION_STATE_RUNNING,
    "SUCCEEDED": common_pb2.OPERATION_STATE_SUCCEEDED,
    "FAILED": common_pb2.OPERATION_STATE_FAILED,
    "CANCELLED": common_pb2.OPERATION_STATE_CANCELLED,
}
_STAGE = {
    "": segmentation_pb2.JOB_STAGE_UNSPECIFIED,
    "LOADING": segmentation_pb2.JOB_STAGE_LOADING,
    "INFERENCE": segmentation_pb2.JOB_STAGE_INFERENCE,
    "POSTPROCESSING": segmentation_pb2.JOB_STAGE_POSTPROCESSING,
    "HANDOFF": segmentation_pb2.JOB_STAGE_HANDOFF,
}


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def organ_statistics(result: dict[str, Any]) -> list[segmentation_pb2.OrganStatistics]:
    return [
        segmentation_pb2.OrganStatistics(
            organ=o["organ"],
            volume_ml=o["volume_ml"],
            attention_ml=o["attention_ml"],
            heatmap_ml=o["heatmap_ml"],
            component_count=o["component_count"],
        )
        for o in result.get("organs", [])
    ]


def job_to_proto(job: Job) -> segmentation_pb2.SegmentationJob:
    msg = segmentation_pb2.SegmentationJob(
        job_id=job.job_id,
        case_id=job.case_id,
        series_id=job.series_id,
        series_version=job.series_version,
        ensemble_version=job.ensemble_version,
        state=_STATE[job.state],
        progress=segmentation_pb2.SegmentationProgress(stage=_STAGE[job.stage], fraction=job.fraction),
        error_reason=job.error_reason,
        attempts=job.attempts,
        create_time=_ts(job.create_time),
        update_time=_ts(job.update_time),
    )
    if job.state == "QUEUED" and job.attempts > 0:
        msg.next_attempt_time.CopyFrom(_ts(job.next_attempt_at))
    r = job.result
    if job.state == "SUCCEEDED" and r:
        msg.result.CopyFrom(
            segmentation_pb2.SegmentationResult(
                label_map=blob_ref(r["label_map"], r["label_map_size"]),
                heatmap=blob_ref(r["heatmap"], r["heatmap_size"]),
                organs=organ_statistics(r),
                members=r.get("members", []),
                weights_trained=r.get("weights_trained", False),
                inference_seconds=r.get("inference_seconds", 0.0),
            )
        )
    return msg


@dataclass
class Activation:
    """What ActivateEnsembleVersion needs: the served versions, where promoted versions live,
    how a version reaches Triton and how a segmenter for a model name is made
    (`atlasflow.segmentation.activation`)."""

    registry: EnsembleRegistry
    versions_dir: str
    loader: Loader
    make_segmenter: Callable[[str], Any]


MAX_REINFER_CASES = 10_000


class SegmentationServicer(segmentation_pb2_grpc.SegmentationServiceServicer):
    def __init__(
        self,
        jobs: JobStore,
        blobs: BlobStore,
        worker: Worker,
        ensembles: list[str],
        activation: Activation | None = None,
    ) -> None:
        self.jobs = jobs
        self.blobs = blobs
        self.worker = worker
        self._ensembles = ensembles
        self.activation = activation
        # WaitSegmentationJob: one event per waited-on job, set (in the server's loop) when the
        # job store reports a change of that job.
        self._waits: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        jobs.listeners.append(self._job_changed)

    @property
    def ensembles(self) -> list[str]:
        """The served versions, the default first (after activations: the registry's)."""
        if self.activation is not None:
            return list(self.activation.registry.state.versions)
        return self._ensembles

    def served_now(self) -> list[str]:
        """The versions a new job may name, the default first (blocking: reads the database).
        With several replicas the default is the activated version recorded in the database
        (`activation.ServedVersionFollower`), even while this replica does not serve it yet:
        the job waits for a replica that does, and no replica labels it with an older version."""
        served = self.ensembles
        record = self.jobs.served_version() if self.activation is not None else None
        if record is None:
            return served
        return [record.version, *[v for v in served if v != record.version]]

    def _job_changed(self, job_id: str) -> None:  # any thread
        loop = self._loop
        if loop is not None and job_id in self._waits:
            loop.call_soon_threadsafe(self._wake_waiters, job_id)

    def _wake_waiters(self, job_id: str) -> None:
        event = self._waits.pop(job_id, None)
        if event is not None:
            event.set()

    async def WaitSegmentationJob(
        self, request: segmentation_pb2.WaitSegmentationJobRequest, context: Context
    ) -> segmentation_pb2.WaitSegmentationJobResponse:
        timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else WAIT_DEFAULT_S
        if timeout < 0:
            raise InvalidArgument("INVALID_TIMEOUT", "timeout must be >= 0", domain=DOMAIN)
        self._loop = asyncio.get_running_loop()
        deadline = self._loop.time() + min(timeout, WAIT_MAX_S)
        while True:
            # Register before reading, so a change between the read and the wait is not missed.
            event = self._waits.setdefault(request.job_id, asyncio.Event())
            job = await asyncio.to_thread(self.jobs.get, request.job_id)
            left = deadline - self._loop.time()
            if job.state in DONE_STATES or left <= 0:
                if self._waits.get(request.job_id) is event and not event.is_set():
                    del self._waits[request.job_id]  # (another waiter re-checks within 2 s)
                return segmentation_pb2.WaitSegmentationJobResponse(job=job_to_proto(job))
            try:
                await asyncio.wait_for(event.wait(), min(left, WAIT_RECHECK_S))
            except TimeoutError:
                pass

    async def SegmentSeries(
        self, request: segmentation_pb2.SegmentSeriesRequest, context: Context
    ) -> segmentation_pb2.SegmentSeriesResponse:
        if not request.case_id or not request.series_id or request.series_version < 1:
            raise InvalidArgument(
                "INVALID_REQUEST", "case_id, series_id and series_version >= 1 are required", domain=DOMAIN
            )
        served = await asyncio.to_thread(self.served_now)  # one snapshot: the default and the check agree
        ensemble = request.ensemble_version or served[0]
        self._check_served(ensemble, served)
        if not await asyncio.to_thread(self.blobs.exists, request.volume.digest):
            raise NotFound(
                "BLOB_NOT_FOUND",
                "volume blob not found",
                domain=DOMAIN,
                metadata={"digest": request.volume.digest[:80]},
            )
        organs = [int(o) for o in request.labelled_organs]
        if any(o not in ORGANS for o in organs):
            raise InvalidArgument("INVALID_ORGAN", "labelled_organs must be organ ids 1..9", domain=DOMAIN)
        traceparent = current_traceparent()
        job, created = await asyncio.to_thread(
            lambda: self.jobs.submit(
                case_id=request.case_id,
                series_id=request.series_id,
                series_version=request.series_version,
                ensemble_version=ensemble,
                volume_digest=request.volume.digest,
                volume_size=request.volume.size_bytes,
                labelled_organs=organs,
                traceparent=traceparent,
            )
        )
        if created:
            self.worker.wake.set()
        return segmentation_pb2.SegmentSeriesResponse(job=job_to_proto(job))

    async def GetSegmentationJob(
        self, request: segmentation_pb2.GetSegmentationJobRequest, context: Context
    ) -> segmentation_pb2.GetSegmentationJobResponse:
        job = await asyncio.to_thread(self.jobs.get, request.job_id)
        return segmentation_pb2.GetSegmentationJobResponse(job=job_to_proto(job))

    async def ListSegmentationJobs(
        self, request: segmentation_pb2.ListSegmentationJobsRequest, context: Context
    ) -> segmentation_pb2.ListSegmentationJobsResponse:
        jobs, token = await asyncio.to_thread(self.jobs.list, request.page_size, request.page_token, request.case_id)
        return segmentation_pb2.ListSegmentationJobsResponse(
            jobs=[job_to_proto(j) for j in jobs], next_page_token=token
        )

    async def CancelSegmentationJob(
        self, request: segmentation_pb2.CancelSegmentationJobRequest, context: Context
    ) -> segmentation_pb2.CancelSegmentationJobResponse:
        job = await asyncio.to_thread(self.jobs.cancel, request.job_id)
        return segmentation_pb2.CancelSegmentationJobResponse(job=job_to_proto(job))

    async def PurgeStudy(
        self, request: segmentation_pb2.PurgeStudyRequest, context: Context
    ) -> segmentation_pb2.PurgeStudyResponse:
        if not request.case_id:
            raise InvalidArgument(
                "INVALID_REQUEST", "case_id is required", domain=DOMAIN, metadata={"field": "case_id"}
            )
        counts, released = await asyncio.to_thread(self.jobs.purge_study, request.case_id)
        referenced = await asyncio.to_thread(self.jobs.referenced, list(request.check_digests))
        return segmentation_pb2.PurgeStudyResponse(
            deleted_rows=counts, released_digests=released, referenced_digests=referenced
        )

    def _check_served(self, ensemble: str, served: list[str]) -> None:
        if ensemble not in served:
            raise InvalidArgument(
                "UNKNOWN_ENSEMBLE",
                "unknown ensemble version",
                domain=DOMAIN,
                metadata={"ensemble_version": ensemble[:100], "known": ",".join(served)[:400]},
            )

    async def ActivateEnsembleVersion(
        self, request: segmentation_pb2.ActivateEnsembleVersionRequest, context: Context
    ) -> segmentation_pb2.ActivateEnsembleVersionResponse:
        act = self.activation
        if act is None or not act.versions_dir:
            raise FailedPrecondition("VERSIONS_NOT_CONFIGURED", "this service has no versions directory", domain=DOMAIN)
        caller = author_of(context)

        def record(name: str, card: str) -> None:
            # the database record every replica follows, before this replica's swap
            self.jobs.record_served_version(name, card, caller)

        with tracer.start_as_current_span("segmentation.activate") as span:
            span.set_attribute("atlasflow.ensemble_version", request.ensemble_version[:200])
            before, after, model = await asyncio.to_thread(
                lambda: act.registry.activate(
                    act.versions_dir, request.ensemble_version, act.loader, act.make_segmenter, record=record
                )
            )
        log.info(
            "ensemble version activated",
            extra={"fields": {"ensemble_version": after.default, "previous": before.default, "model": model}},
        )
        return segmentation_pb2.ActivateEnsembleVersionResponse(
            ensemble_version=after.default,
            model_name=model,
            previous_version=before.default,
            served_versions=list(after.versions),
            already_active=before is after,
        )

    async def ReinferCases(
        self, request: segmentation_pb2.ReinferCasesRequest, context: Context
    ) -> segmentation_pb2.ReinferCasesResponse:
        if not request.case_ids or len(request.case_ids) > MAX_REINFER_CASES:
            raise InvalidArgument(
                "INVALID_REQUEST",
                f"case_ids must hold 1..{MAX_REINFER_CASES} case ids",
                domain=DOMAIN,
                metadata={"field": "case_ids"},
            )
        self._check_served(request.ensemble_version, await asyncio.to_thread(self.served_now))
        traceparent = current_traceparent()

        def submit() -> tuple[list[Job], list[str]]:
            jobs, unknown, created = [], [], False
            for case_id in dict.fromkeys(request.case_ids):  # the given order, duplicates once
                last = self.jobs.latest_for_case(case_id)
                if last is None:
                    unknown.append(case_id)
                    continue
                job, new = self.jobs.submit(
                    case_id=case_id,
                    series_id=last.series_id,
                    series_version=last.series_version,
                    ensemble_version=request.ensemble_version,
                    volume_digest=last.volume_digest,
                    volume_size=last.volume_size,
                    labelled_organs=last.labelled_organs,
                    traceparent=traceparent,
                )
                jobs.append(job)
                created = created or new
            if created:
                self.worker.wake.set()
            return jobs, unknown

        jobs, unknown = await asyncio.to_thread(submit)
        return segmentation_pb2.ReinferCasesResponse(jobs=[job_to_proto(j) for j in jobs], unknown_case_ids=unknown)
