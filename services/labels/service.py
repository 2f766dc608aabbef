"""Label gRPC servicer and the export worker (transport + orchestration)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from urllib.parse import unquote, urlparse

import grpc
from google.protobuf import timestamp_pb2
from opentelemetry import trace

from atlasflow.common.blobstore import BlobInfo, BlobStore
from atlasflow.common.errors import AtlasflowError, InvalidArgument
from atlasflow.common.metrics import Metrics
from atlasflow.common.nifti import from_nifti_bytes
from atlasflow.common.v1 import common_pb2
from atlasflow.labels.export import export_case, write_manifest
from atlasflow.labels.repository import (ExportJobRecord, LabelRepository, LabelVersionRecord,
                                         Provenance)
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.labels.validate import validate_label_map

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
DOMAIN = "atlasflow.labels"
NIFTI_GZ = "application/x-nifti+gzip"

_SOURCE_TO_PROTO = {"ai": labels_pb2.LABEL_SOURCE_AI,
                    "radiologist": labels_pb2.LABEL_SOURCE_RADIOLOGIST,
                    "original": labels_pb2.LABEL_SOURCE_ORIGINAL}
_SOURCE_FROM_PROTO = {v: k for k, v in _SOURCE_TO_PROTO.items()}
_OP_STATE = {"QUEUED": common_pb2.OPERATION_STATE_QUEUED,
             "RUNNING": common_pb2.OPERATION_STATE_RUNNING,
             "SUCCEEDED": common_pb2.OPERATION_STATE_SUCCEEDED,
             "FAILED": common_pb2.OPERATION_STATE_FAILED,
             "CANCELLED": common_pb2.OPERATION_STATE_CANCELLED}


def _ts(dt) -> timestamp_pb2.Timestamp:  # type: ignore[no-untyped-def]
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def version_to_proto(r: LabelVersionRecord) -> labels_pb2.LabelVersion:
    p = r.provenance
    spacing = [sum(r.affine[row * 4 + col] ** 2 for row in range(3)) ** 0.5 for col in range(3)]
    return labels_pb2.LabelVersion(
        version_id=r.version_id, case_id=r.case_id, parent_version_id=r.parent_version_id,
        label_map=common_pb2.BlobRef(digest=r.label_map_digest, size_bytes=r.label_map_size,
                                     media_type=NIFTI_GZ),
        ct=common_pb2.BlobRef(digest=r.ct_digest, size_bytes=r.ct_size, media_type=NIFTI_GZ),
        provenance=labels_pb2.Provenance(
            source=_SOURCE_TO_PROTO[p.source], model_version=p.model_version, job_id=p.job_id,
            reviewer=p.reviewer, weights_trained=p.weights_trained),
        organs=list(r.organs), create_time=_ts(r.create_time),
        geometry=common_pb2.VolumeGeometry(shape=list(r.shape), affine=list(r.affine),
                                           spacing_mm=spacing))


def export_to_proto(j: ExportJobRecord) -> labels_pb2.ExportJob:
    return labels_pb2.ExportJob(
        job_id=j.job_id, state=_OP_STATE[j.state], destination_uri=j.destination_uri,
        progress=labels_pb2.ExportProgress(cases_done=j.cases_done, cases_total=j.cases_total),
        error_reason=j.error_reason, create_time=_ts(j.create_time))


def destination_path(uri: str, export_root: Path | None = None) -> Path:
    """The local directory of a file:// destination; inside `export_root` when one is set."""
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path:
        raise InvalidArgument("INVALID_DESTINATION",
                              "destination_uri must be file:///absolute/dir in this deployment",
                              domain=DOMAIN, metadata={"scheme": parsed.scheme[:20]})
    path = Path(unquote(parsed.path)).resolve()
    if export_root is not None and not path.is_relative_to(export_root):
        raise InvalidArgument("DESTINATION_NOT_ALLOWED",
                              "destination must lie inside the service's export directory",
                              domain=DOMAIN, metadata={"export_dir": str(export_root)})
    return path


class Exporter:
    """Runs export jobs one at a time; a restart resumes QUEUED/RUNNING ones from the start
    (case files are rewritten atomically, so a resumed export converges to the same bytes)."""

    def __init__(self, repo: LabelRepository, blobs: BlobStore, metrics: Metrics) -> None:
        self.repo = repo
        self.blobs = blobs
        self.metrics = metrics
        self.wake = asyncio.Event()

    def run_job(self, job: ExportJobRecord) -> None:
        with tracer.start_as_current_span("labels.export") as span:
            span.set_attribute("atlasflow.export_job_id", job.job_id)
            span.set_attribute("atlasflow.cases_total", job.cases_total)
            try:
                out = destination_path(job.destination_uri)
                out.mkdir(parents=True, exist_ok=True)
                if job.state == "QUEUED":
                    self.repo.update_export_job(job.job_id, state="RUNNING", cases_done=0)
                entries = []
                for done, (case_id, version_id) in enumerate(job.versions, start=1):
                    record = self.repo.get_version(version_id)
                    entries.append(export_case(
                        out, case_id, self.blobs.get(record.ct_digest),
                        self.blobs.get(record.label_map_digest), record.provenance, version_id,
                        case_id=case_id))
                    self.repo.update_export_job(job.job_id, cases_done=done)
                write_manifest(out, entries)
                self.repo.update_export_job(job.job_id, state="SUCCEEDED")
                self.metrics.count("exports_succeeded")
            except AtlasflowError as exc:
                log.error("export failed", extra={"fields": {"job_id": job.job_id,
                                                             "reason": exc.reason}})
                self.repo.update_export_job(job.job_id, state="FAILED", error_reason=exc.reason)
            except OSError as exc:
                log.error("export failed", extra={"fields": {"job_id": job.job_id,
                                                             "exc_type": type(exc).__name__}})
                self.repo.update_export_job(job.job_id, state="FAILED",
                                            error_reason="DESTINATION_WRITE_FAILED")

    async def run(self) -> None:
        while True:
            for job in self.repo.list_export_jobs(("QUEUED", "RUNNING")):
                await asyncio.to_thread(self.run_job, job)
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), 2.0)
            except asyncio.TimeoutError:
                pass


class LabelServicer(labels_pb2_grpc.LabelServiceServicer):
    def __init__(self, repo: LabelRepository, blobs: BlobStore, exporter: Exporter,
                 export_root: Path | None = None) -> None:
        self.repo = repo
        self.blobs = blobs
        self.exporter = exporter
        self.export_root = export_root

    def _create(self, request: labels_pb2.CreateLabelVersionRequest) -> LabelVersionRecord:
        if not request.request_id:
            raise InvalidArgument("INVALID_ARGUMENT", "request_id is required", domain=DOMAIN,
                                  metadata={"field": "request_id"})
        if request.provenance.source not in _SOURCE_FROM_PROTO:
            raise InvalidArgument("INVALID_PROVENANCE", "provenance.source is required",
                                  domain=DOMAIN)
        label_bytes = self.blobs.get(request.label_map.digest)
        ct_bytes = self.blobs.get(request.ct.digest)
        labels, label_affine = from_nifti_bytes(label_bytes)
        ct, ct_affine = from_nifti_bytes(ct_bytes)
        organs = validate_label_map(labels, label_affine, ct.shape, ct_affine)
        p = request.provenance
        return self.repo.create_version(
            request.case_id,
            BlobInfo(request.label_map.digest, len(label_bytes)),
            BlobInfo(request.ct.digest, len(ct_bytes)),
            Provenance(_SOURCE_FROM_PROTO[p.source], p.model_version, p.job_id, p.reviewer,
                       p.weights_trained),
            request.request_id, request.expected_parent_version_id,
            organs=organs, shape=ct.shape, affine=ct_affine.ravel())

    async def CreateLabelVersion(self, request, context):  # type: ignore[no-untyped-def]
        record = await asyncio.to_thread(self._create, request)
        return labels_pb2.CreateLabelVersionResponse(version=version_to_proto(record))

    async def GetLabelVersion(self, request, context):  # type: ignore[no-untyped-def]
        return labels_pb2.GetLabelVersionResponse(
            version=version_to_proto(self.repo.get_version(request.version_id)))

    async def ListLabelVersions(self, request, context):  # type: ignore[no-untyped-def]
        records, token = self.repo.list_versions(request.case_id or None, request.page_size,
                                                 request.page_token)
        return labels_pb2.ListLabelVersionsResponse(
            versions=[version_to_proto(r) for r in records], next_page_token=token)

    async def ExportDataset(self, request, context):  # type: ignore[no-untyped-def]
        destination_path(request.destination_uri, self.export_root)
        job = self.repo.create_export_job(list(request.case_ids), request.destination_uri)
        self.exporter.wake.set()
        return labels_pb2.ExportDatasetResponse(job=export_to_proto(job))

    async def GetExportJob(self, request, context):  # type: ignore[no-untyped-def]
        return labels_pb2.GetExportJobResponse(
            job=export_to_proto(self.repo.get_export_job(request.job_id)))
