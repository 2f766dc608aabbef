"""The segmentation service's background loops: the worker that runs jobs one at a time (load ->
Triton -> blobs -> result + hand-offs to labels and ranking) and the outbox handlers that
deliver those hand-offs (`labels_handoff`, `ranking_handoff`). Orchestration only: the math is
in pipeline.py and runs inside Triton."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt
from google.protobuf import json_format
from opentelemetry import context as otel_context
from opentelemetry import trace

from atlasflow.common.blobstore import BlobStore
from atlasflow.common.errors import AtlasflowError, InvalidArgument
from atlasflow.common.metrics import Metrics
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.organs import ORGANS
from atlasflow.common.outbox import OutboxRow
from atlasflow.common.telemetry import context_from_traceparent, current_traceparent
from atlasflow.common.v1 import common_pb2
from atlasflow.labels.v1 import labels_pb2
from atlasflow.method.findings import organ_findings
from atlasflow.method.learned import served_features
from atlasflow.method.prior import PopulationPrior
from atlasflow.method.strategy import DEFAULT_STRATEGY, RankingStrategy, get_strategy
from atlasflow.ranking.v1 import ranking_pb2
from atlasflow.segmentation.activation import EnsembleRegistry
from atlasflow.segmentation.jobs import Job, JobStore
from atlasflow.segmentation.outputs import PipelineOutput

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

DOMAIN = "atlasflow.segmentation"
LABELS_TOPIC = "labels.CreateLabelVersion"
RANKING_TOPIC = "ranking.SubmitAttention"
NIFTI_GZ = "application/x-nifti+gzip"


class Segmenter(Protocol):
    """Runs the ensemble pipeline on one CT (`TritonSegmenter`, or a fake in tests).

    ``volume_hu``: ``(X, Y, Z)`` int16 HU; ``affine``: ``(4, 4)`` voxel -> RAS mm;
    ``labelled_organs``: organ ids 1..9 the case's source labels. Returns outputs on the input
    grid (`PipelineOutput`)."""

    def segment(
        self, volume_hu: npt.NDArray[np.int16], affine: npt.NDArray[np.float64], labelled_organs: Sequence[int] = ()
    ) -> PipelineOutput: ...


HANDOFF_TIMEOUT_S = 60.0


def labels_handoff(labels: Any) -> Callable[[OutboxRow], Awaitable[None]]:
    """The outbox handler of `LABELS_TOPIC`: CreateLabelVersion with the stored request, 60 s
    deadline. labels: a LabelService stub on an asyncio channel."""

    async def deliver(row: OutboxRow) -> None:
        request = labels_pb2.CreateLabelVersionRequest.FromString(row.payload)
        await labels.CreateLabelVersion(request, timeout=HANDOFF_TIMEOUT_S)

    return deliver


def ranking_handoff(ranking: Any) -> Callable[[OutboxRow], Awaitable[None]]:
    """The outbox handler of `RANKING_TOPIC`: SubmitAttention with the stored request, 60 s
    deadline. ranking: a RankingService stub on an asyncio channel."""

    async def deliver(row: OutboxRow) -> None:
        request = ranking_pb2.SubmitAttentionRequest.FromString(row.payload)
        await ranking.SubmitAttention(request, timeout=HANDOFF_TIMEOUT_S)

    return deliver


def blob_ref(digest: str, size: int) -> common_pb2.BlobRef:
    """A gzip NIfTI blob reference."""
    return common_pb2.BlobRef(digest=digest, size_bytes=size, media_type=NIFTI_GZ)


class Worker:
    """Runs jobs one at a time in a thread: load -> Triton -> blobs -> result + hand-offs.

    ``segmenter``: one `Segmenter`, or a mapping ensemble version -> `Segmenter` (each job
    goes to its own ensemble's Triton model); ``members`` likewise (list or mapping).
    Triton unavailable (``UNAVAILABLE`` after the client's own connection retries): the job
    goes back to QUEUED in the work table with ``error_reason`` set and is tried again after
    ``min(max_backoff_s, retry_base_s * 2**(attempts - 1))`` seconds; after ``max_attempts``
    claims it FAILS with that reason (e.g. ``TRITON_UNAVAILABLE``). Other domain errors fail
    at once. ``poll_s``: how often an idle worker looks for due jobs. ``claim_gate``: asked
    before every claim; False = wait (`activation.ServedVersionFollower.may_claim`).
    ``bind_version``: serves a claimed job's ensemble version this replica does not serve yet
    (`activation.EnsembleRegistry.bind`).
    """

    def __init__(
        self,
        jobs: JobStore,
        blobs: BlobStore,
        segmenter: Segmenter | Mapping[str, Segmenter],
        metrics: Metrics,
        *,
        members: list[str] | Mapping[str, list[str]],
        max_attempts: int = 8,
        max_backoff_s: float = 60.0,
        retry_base_s: float = 2.0,
        poll_s: float = 1.0,
        on_handoff: Callable[[], None] = lambda: None,
        prior: PopulationPrior | Callable[[], PopulationPrior] | None = None,
        strategies: Mapping[str, RankingStrategy] | None = None,
        registry: EnsembleRegistry | None = None,
        claim_gate: Callable[[], bool] | None = None,
        bind_version: Callable[[str], None] | None = None,
    ) -> None:
        self.jobs = jobs
        # Asked before every claim: False = claim nothing now (this replica does not serve the
        # activated ensemble version: `activation.ServedVersionFollower.may_claim`).
        self.claim_gate = claim_gate
        # Serves a job's ensemble version that the registry does not have (a version activated
        # before this replica started or followed it; `activation.EnsembleRegistry.bind`), so a
        # job keeps the version it was created with on any replica.
        self.bind_version = bind_version
        # The served versions after ActivateEnsembleVersion (`activation.EnsembleRegistry`):
        # looked up per job, so a job keeps the version it was created with.
        self.registry = registry
        self.blobs = blobs
        self.segmenter = segmenter
        # Population statistics for the plausibility findings: a fixed prior, or a callable
        # asked before every job (app.py: `prior_source.RankingPrior`, the prior ranking learned
        # from stored labels);
        # the bundled prior by default.
        self.prior = prior or PopulationPrior.load()
        # Ranking strategy per ensemble version (the default strategy when not given): its
        # `score_base` is what an organ's score adds its plausibility penalties to (see
        # `_organ_attention`).
        self.strategies = dict(strategies or {})
        self.metrics = metrics
        self.members = members
        self.max_attempts = max_attempts
        self.max_backoff_s = max_backoff_s
        self.retry_base_s = retry_base_s
        self.poll_s = poll_s
        self.on_handoff = on_handoff
        self.wake = threading.Event()
        self.stopping = threading.Event()

    def _segmenter_for(self, ensemble: str) -> Segmenter:
        if self.registry is not None and ensemble in self.registry.state.segmenters:
            return cast("Segmenter", self.registry.state.segmenters[ensemble])
        known = isinstance(self.segmenter, Mapping) and ensemble in self.segmenter
        if self.registry is not None and self.bind_version is not None and not known:
            self.bind_version(ensemble)  # the version's own errors fail the job; UNAVAILABLE retries it
            return cast("Segmenter", self.registry.state.segmenters[ensemble])
        if isinstance(self.segmenter, Mapping):
            if ensemble not in self.segmenter:
                raise InvalidArgument(
                    "UNKNOWN_ENSEMBLE",
                    "no Triton model for this ensemble version",
                    domain=DOMAIN,
                    metadata={"ensemble_version": ensemble[:100]},
                )
            return self.segmenter[ensemble]
        return self.segmenter

    def _members_for(self, ensemble: str) -> list[str]:
        if self.registry is not None and ensemble in self.registry.state.members:
            return list(self.registry.state.members[ensemble])
        if isinstance(self.members, Mapping):
            return list(self.members.get(ensemble, []))
        return list(self.members)

    def _strategy_for(self, ensemble: str) -> RankingStrategy | None:
        if self.registry is not None and ensemble in self.registry.state.strategies:
            return self.registry.state.strategies[ensemble]
        return self.strategies.get(ensemble)

    def request_stop(self) -> None:
        """Make `run_forever` return after the job in hand (any thread)."""
        self.stopping.set()
        self.wake.set()

    def run_forever(self) -> None:
        while not self.stopping.is_set():
            job = self.jobs.claim() if self._may_claim() else None
            if job is None:
                self.metrics.set_queue_depth("segmentation_jobs", self.jobs.queued_count())
                self.wake.wait(self.poll_s)
                self.wake.clear()
                continue
            with self.jobs.keep_alive(job.job_id):  # renews the job's lease while it runs (replicas)
                self.run_one(job)

    def _may_claim(self) -> bool:
        if self.claim_gate is None:
            return True
        try:
            return self.claim_gate()
        except Exception as exc:  # noqa: BLE001 - the database unreachable: claim nothing, retry
            log.warning("claim gate failed", extra={"fields": {"exc_type": type(exc).__name__}})
            return False

    def run_one(self, job: Job) -> None:
        token = otel_context.attach(context_from_traceparent(job.traceparent))
        try:
            with tracer.start_as_current_span("segmentation.job") as span:
                span.set_attribute("atlasflow.job_id", job.job_id)
                span.set_attribute("atlasflow.series_id", job.series_id)
                span.set_attribute("atlasflow.attempt", job.attempts)
                try:
                    t_job = time.perf_counter()
                    self._run(job)
                    self.metrics.observe_stage("segmentation_job", time.perf_counter() - t_job)
                except AtlasflowError as exc:
                    span.set_attribute("atlasflow.error_reason", exc.reason)
                    if exc.code == "UNAVAILABLE" and job.attempts < self.max_attempts:
                        delay = min(self.max_backoff_s, self.retry_base_s * 2.0 ** max(job.attempts - 1, 0))
                        log.warning(
                            "segmentation backend unavailable, job requeued",
                            extra={
                                "fields": {
                                    "job_id": job.job_id,
                                    "reason": exc.reason,
                                    "retry_in_s": delay,
                                    "attempt": job.attempts,
                                }
                            },
                        )
                        self.jobs.retry_later(job.job_id, exc.reason, delay)
                    else:
                        log.error(
                            "segmentation job failed", extra={"fields": {"job_id": job.job_id, "reason": exc.reason}}
                        )
                        self.jobs.fail(job.job_id, exc.reason)
                        self.metrics.count("jobs_failed")
                except Exception as exc:  # noqa: BLE001
                    log.error(
                        "segmentation job crashed",
                        exc_info=exc,
                        extra={"fields": {"job_id": job.job_id, "exc_type": type(exc).__name__}},
                    )
                    self.jobs.fail(job.job_id, "INTERNAL")
                    self.metrics.count("jobs_failed")
        finally:
            otel_context.detach(token)

    def _organ_attention(
        self,
        organs: list[dict[str, Any]],
        labels: npt.NDArray[np.uint8],
        heatmap: npt.NDArray[np.uint8],
        affine: npt.NDArray[np.float64],
        labelled: list[int],
        strategy: RankingStrategy | None = None,
    ) -> list[ranking_pb2.OrganAttention]:
        """Attention statistics from Triton plus the plausibility findings (score, reasons,
        pointer) that `atlasflow.method.findings` derives from the native-grid outputs.

        Score = the strategy's `score_base` (heatmap ml for reference, attention ml for enhanced,
        as `method.strategy.rank_case` scores it) + plausibility penalties. An unlabelled organ with
        attention but no voxel in the ensemble's labels (e.g. a gall bladder only a minority of
        the models sees) has no geometry to assess: it is scored by its attention alone, with a
        reason saying so (no pointer: the combined heatmap does not separate organs there).
        With the `learned` strategy each organ also carries its `served_features`: ranking fits
        the site's model on them and the reviewers' decisions (atlasflow.ranking.learned)."""
        with tracer.start_as_current_span("segmentation.findings"):
            exact = {o["organ"]: (o["attention_ml"], o["heatmap_ml"]) for o in organs}
            prior = self.prior() if callable(self.prior) else self.prior
            findings = {f.organ: f for f in organ_findings(labels, heatmap, affine, prior, labelled, exact_ml=exact)}
        base = (strategy or get_strategy(DEFAULT_STRATEGY)).score_base
        learned = strategy is not None and strategy.name == "learned"  # ranking fits it on decisions
        out = []
        for o in organs:
            msg = ranking_pb2.OrganAttention(
                organ=o["organ"], attention_ml=o["attention_ml"], heatmap_ml=o["heatmap_ml"], volume_ml=o["volume_ml"]
            )
            f = findings.get(o["organ"])
            if learned:
                msg.features.update(served_features(o["attention_ml"], o["heatmap_ml"], o["volume_ml"], [f]))
            if f is not None:
                msg.score = float(o[base] + f.score - f.heatmap_ml)
                msg.reasons.extend(f.reasons)
                if f.pointer:
                    json_format.ParseDict(f.pointer, msg.pointer)
            elif o["organ"] not in labelled and o["attention_ml"] > 0:
                msg.score = float(o[base])
                msg.reasons.append(
                    f"{ORGANS[o['organ']]}: attention {o['attention_ml']:.1f} ml (heatmap "
                    f"{o['heatmap_ml']:.1f} ml); not in the ensemble's labels"
                )
            out.append(msg)
        return out

    def _run(self, job: Job) -> None:
        volume, affine = from_nifti_bytes(self.blobs.get(job.volume_digest))
        if volume.ndim != 3:
            raise InvalidArgument("INVALID_VOLUME", "volume must be 3-D", domain=DOMAIN)
        volume = np.asarray(volume, dtype=np.int16)
        segmenter = self._segmenter_for(job.ensemble_version)
        if self.jobs.cancel_if_requested(job.job_id):
            log.info("segmentation job cancelled before inference", extra={"fields": {"job_id": job.job_id}})
            return
        self.jobs.progress(job.job_id, "INFERENCE", 0.1)
        t0 = time.perf_counter()
        out = segmenter.segment(volume, affine, job.labelled_organs)
        seconds = time.perf_counter() - t0
        self.metrics.observe_stage("triton_call", seconds)
        self.jobs.progress(job.job_id, "POSTPROCESSING", 0.9)
        if out.labels.shape != volume.shape or out.heatmap.shape != volume.shape:
            raise InvalidArgument("INVALID_MODEL_OUTPUT", "model output is not on the CT grid", domain=DOMAIN)
        label_blob = self.blobs.put(to_nifti_bytes(out.labels.astype(np.uint8), affine))
        heat_blob = self.blobs.put(to_nifti_bytes(out.heatmap.astype(np.uint8), affine))
        organs = [
            {
                "organ": i,
                "volume_ml": float(out.organ_stats[i - 1, 0]),
                "attention_ml": float(out.organ_stats[i - 1, 1]),
                "heatmap_ml": float(out.organ_stats[i - 1, 2]),
                "component_count": int(out.organ_stats[i - 1, 3]),
            }
            for i in ORGANS
        ]
        result = {
            "label_map": label_blob.digest,
            "label_map_size": label_blob.size_bytes,
            "heatmap": heat_blob.digest,
            "heatmap_size": heat_blob.size_bytes,
            "organs": organs,
            "members": self._members_for(job.ensemble_version),
            "weights_trained": bool(out.weights_trained),
            "inference_seconds": seconds,
        }
        labels_req = labels_pb2.CreateLabelVersionRequest(
            case_id=job.case_id,
            label_map=blob_ref(label_blob.digest, label_blob.size_bytes),
            ct=blob_ref(job.volume_digest, job.volume_size),
            provenance=labels_pb2.Provenance(
                source=labels_pb2.LABEL_SOURCE_AI,
                model_version=job.ensemble_version,
                job_id=job.job_id,
                weights_trained=bool(out.weights_trained),
            ),
            request_id=job.job_id,
        )
        ranking_req = ranking_pb2.SubmitAttentionRequest(
            case_id=job.case_id,
            series_id=job.series_id,
            source_job_id=job.job_id,
            organs=self._organ_attention(
                organs,
                out.labels,
                out.heatmap,
                affine,
                job.labelled_organs,
                self._strategy_for(job.ensemble_version),
            ),
            heatmap=blob_ref(heat_blob.digest, heat_blob.size_bytes),
            labelled_organs=cast("list[common_pb2.Organ]", job.labelled_organs),  # organ ids: the enum's values
        )
        handed = self.jobs.succeed(
            job.job_id,
            result,
            [
                (LABELS_TOPIC, f"{job.job_id}:labels", labels_req.SerializeToString()),
                (RANKING_TOPIC, f"{job.job_id}:ranking", ranking_req.SerializeToString()),
            ],
            current_traceparent(),
        )
        if not handed:
            # cancelled during inference, purged, or this replica's lease was lost (another
            # replica took the job over after it expired and commits its own result)
            try:
                lost = self.jobs.get(job.job_id).state != "CANCELLED"
            except AtlasflowError:  # purged (JOB_NOT_FOUND): its study was deleted
                lost = False
            log.info(
                "segmentation job lease lost; result discarded"
                if lost
                else "segmentation job cancelled during inference; result discarded",
                extra={"fields": {"job_id": job.job_id}},
            )
            self.metrics.count("jobs_lease_lost" if lost else "jobs_cancelled")
            return
        log.info(
            "segmentation job finished",
            extra={"fields": {"job_id": job.job_id, "inference_s": round(seconds, 3), "handed_off": handed}},
        )
        self.metrics.count("jobs_succeeded")
        if handed:
            self.on_handoff()
