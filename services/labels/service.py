"""Label gRPC servicer and the export worker (transport + orchestration)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

import grpc
from google.protobuf import timestamp_pb2
from opentelemetry import trace

from atlasflow.common.blobstore import BlobStore
from atlasflow.common.errors import AtlasflowError, InvalidArgument, Unauthenticated
from atlasflow.common.metrics import Metrics
from atlasflow.common.server import principal_of
from atlasflow.common.v1 import common_pb2
from atlasflow.labels.export import export_case, write_manifest
from atlasflow.labels.repository import (AuditEvent, AuditRecord, ExportJobRecord,
                                         LabelRepository, LabelVersionRecord, Provenance)
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.labels.writer import LabelWriter, MaskRevision

T = TypeVar("T")
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


def provenance_to_proto(p: Provenance) -> labels_pb2.Provenance:
    return labels_pb2.Provenance(source=_SOURCE_TO_PROTO[p.source],
                                 model_version=p.model_version, job_id=p.job_id,
                                 reviewer=p.reviewer, weights_trained=p.weights_trained)


def version_to_proto(r: LabelVersionRecord) -> labels_pb2.LabelVersion:
    spacing = [sum(r.affine[row * 4 + col] ** 2 for row in range(3)) ** 0.5 for col in range(3)]
    return labels_pb2.LabelVersion(
        version_id=r.version_id, case_id=r.case_id, parent_version_id=r.parent_version_id,
        label_map=common_pb2.BlobRef(digest=r.label_map_digest, size_bytes=r.label_map_size,
                                     media_type=NIFTI_GZ),
        ct=common_pb2.BlobRef(digest=r.ct_digest, size_bytes=r.ct_size, media_type=NIFTI_GZ),
        provenance=provenance_to_proto(r.provenance),
        organs=list(r.organs), create_time=_ts(r.create_time),
        geometry=common_pb2.VolumeGeometry(shape=list(r.shape), affine=list(r.affine),
                                           spacing_mm=spacing),
        organ_provenance=[labels_pb2.OrganProvenance(
            organ=oid, provenance=provenance_to_proto(op.provenance), version_id=op.version_id)
            for oid, op in sorted(r.organ_provenance.items())])


def audit_to_proto(r: AuditRecord) -> labels_pb2.AuditRecord:
    return labels_pb2.AuditRecord(
        record_id=r.record_id, time=_ts(r.time), principal=r.principal, method=r.method,
        case_id=r.case_id, version_ids=list(r.version_ids), job_id=r.job_id, outcome=r.outcome)


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
                        organ_provenance={o: op.provenance
                                          for o, op in record.organ_provenance.items()},
                        organ_versions={o: op.version_id
                                        for o, op in record.organ_provenance.items()},
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


ANONYMOUS = "anonymous"


class LabelServicer(labels_pb2_grpc.LabelServiceServicer):
    """Thin transport: converts messages, calls LabelWriter / the repository, and records an
    audit record for every call (writes inside their own transaction, reads and failures
    after the fact)."""

    def __init__(self, repo: LabelRepository, blobs: BlobStore, exporter: Exporter,
                 export_root: Path | None = None) -> None:
        self.repo = repo
        self.blobs = blobs
        self.exporter = exporter
        self.export_root = export_root
        self.writer = LabelWriter(repo, blobs)

    async def _audited(self, context, method: str, case_id: str,  # type: ignore[no-untyped-def]
                       work: Callable[[AuditEvent], T],
                       read_ids: Callable[[T], tuple[tuple[str, ...], str]] | None = None) -> T:
        """Run `work(audit_event)` in a thread. Writes pass the event to the repository (same
        transaction); for reads (`read_ids` given: result -> (version ids, job id)) the record
        is appended afterwards. A failure is recorded with its reason and re-raised."""
        event = AuditEvent(principal_of(context) or ANONYMOUS, method, case_id)
        try:
            result = await asyncio.to_thread(work, event)
        except AtlasflowError as exc:
            await asyncio.to_thread(self.repo.record_audit, AuditEvent(
                event.principal, method, case_id, outcome=exc.reason))
            raise
        if read_ids is not None:
            versions, job = read_ids(result)
            await asyncio.to_thread(self.repo.record_audit, AuditEvent(
                event.principal, method, case_id, versions, job))
        return result

    async def CreateLabelVersion(self, request, context):  # type: ignore[no-untyped-def]
        if request.provenance.source not in _SOURCE_FROM_PROTO:
            raise InvalidArgument("INVALID_PROVENANCE", "provenance.source is required",
                                  domain=DOMAIN)
        p = request.provenance
        provenance = Provenance(_SOURCE_FROM_PROTO[p.source], p.model_version, p.job_id,
                                p.reviewer, p.weights_trained)
        record = await self._audited(
            context, "CreateLabelVersion", request.case_id,
            lambda audit: self.writer.create(
                request.case_id, request.label_map.digest, request.ct.digest, provenance,
                request.request_id, request.expected_parent_version_id,
                list(request.labelled_organs), audit=audit))
        return labels_pb2.CreateLabelVersionResponse(version=version_to_proto(record))

    async def ReviseLabels(self, request, context):  # type: ignore[no-untyped-def]
        reviewer = principal_of(context)
        if not reviewer:
            await asyncio.to_thread(self.repo.record_audit, AuditEvent(
                ANONYMOUS, "ReviseLabels", request.case_id, outcome="PRINCIPAL_REQUIRED"))
            raise Unauthenticated("PRINCIPAL_REQUIRED",
                                  "ReviseLabels needs the reviewer's identity in metadata "
                                  "x-atlasflow-principal", domain=DOMAIN)
        revisions = []
        for r in request.revisions:
            kind = r.WhichOneof("mask")
            revisions.append(MaskRevision(
                int(r.organ), mask_digest=r.mask_blob.digest if kind == "mask_blob" else "",
                xor_delta=bytes(r.xor_delta) if kind == "xor_delta" else None))
        record = await self._audited(
            context, "ReviseLabels", request.case_id,
            lambda audit: self.writer.revise(request.case_id, request.expected_parent_version_id,
                                             revisions, request.request_id, reviewer,
                                             audit=audit))
        return labels_pb2.ReviseLabelsResponse(version=version_to_proto(record))

    async def GetLabelVersion(self, request, context):  # type: ignore[no-untyped-def]
        record = await self._audited(
            context, "GetLabelVersion", "", lambda _: self.repo.get_version(request.version_id),
            lambda r: ((r.version_id,), ""))
        return labels_pb2.GetLabelVersionResponse(version=version_to_proto(record))

    async def ListLabelVersions(self, request, context):  # type: ignore[no-untyped-def]
        records, token = await self._audited(
            context, "ListLabelVersions", request.case_id,
            lambda _: self.repo.list_versions(request.case_id or None, request.page_size,
                                              request.page_token),
            lambda result: (tuple(r.version_id for r in result[0]), ""))
        return labels_pb2.ListLabelVersionsResponse(
            versions=[version_to_proto(r) for r in records], next_page_token=token)

    async def ExportDataset(self, request, context):  # type: ignore[no-untyped-def]
        def work(audit: AuditEvent) -> ExportJobRecord:
            destination_path(request.destination_uri, self.export_root)
            return self.repo.create_export_job(list(request.case_ids), request.destination_uri,
                                               audit=audit)

        job = await self._audited(context, "ExportDataset", "", work)
        self.exporter.wake.set()
        return labels_pb2.ExportDatasetResponse(job=export_to_proto(job))

    async def GetExportJob(self, request, context):  # type: ignore[no-untyped-def]
        job = await self._audited(
            context, "GetExportJob", "", lambda _: self.repo.get_export_job(request.job_id),
            lambda j: ((), j.job_id))
        return labels_pb2.GetExportJobResponse(job=export_to_proto(job))

    async def ListAuditRecords(self, request, context):  # type: ignore[no-untyped-def]
        records, token = await asyncio.to_thread(
            self.repo.list_audit_records, request.case_id, request.principal,
            request.page_size, request.page_token)
        return labels_pb2.ListAuditRecordsResponse(
            records=[audit_to_proto(r) for r in records], next_page_token=token)
