"""Label gRPC servicer and the export worker (transport + orchestration).

DICOM SEG in exports: `IngestSourceInstances` fetches a CT volume's source instances from the
ingest service (IngestService.StreamSeriesInstances by volume digest, headers only); the
export worker builds each case's SEG with `atlasflow.labels.export.build_case_seg`, writes it
with the case, C-STOREs it to the job's PACS destination and commits the case's outcome to the
label repository (`record_export_outcome`). The job's SEG options live in the job's row
(`ExportJobRecord.options`, written with the job).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

import grpc
import pydicom
from google.protobuf import timestamp_pb2
from opentelemetry import trace

from atlasflow.common.blobstore import BlobStore
from atlasflow.common.clients import sync_channel
from atlasflow.common.errors import AtlasflowError, DataLoss, InvalidArgument, NotFound, Unauthenticated, Unavailable
from atlasflow.common.metrics import Metrics
from atlasflow.common.server import error_info_of, principal_of
from atlasflow.common.v1 import common_pb2
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.labels.dicom_seg import send_c_store
from atlasflow.labels.export import (
    SEG_FAILED,
    SEG_SEND_FAILED,
    SEG_SENT,
    ExportOptions,
    PacsDestination,
    SegOutcome,
    build_case_seg,
    export_case,
    write_manifest,
)
from atlasflow.labels.repository import (
    AuditEvent,
    AuditRecord,
    ExportJobRecord,
    LabelRepository,
    LabelVersionRecord,
    Provenance,
)
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.labels.writer import LabelWriter, MaskRevision

T = TypeVar("T")
log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
DOMAIN = "atlasflow.labels"
NIFTI_GZ = "application/x-nifti+gzip"

_SOURCE_TO_PROTO = {
    "ai": labels_pb2.LABEL_SOURCE_AI,
    "radiologist": labels_pb2.LABEL_SOURCE_RADIOLOGIST,
    "original": labels_pb2.LABEL_SOURCE_ORIGINAL,
}
_SOURCE_FROM_PROTO = {v: k for k, v in _SOURCE_TO_PROTO.items()}
_OP_STATE = {
    "QUEUED": common_pb2.OPERATION_STATE_QUEUED,
    "RUNNING": common_pb2.OPERATION_STATE_RUNNING,
    "SUCCEEDED": common_pb2.OPERATION_STATE_SUCCEEDED,
    "FAILED": common_pb2.OPERATION_STATE_FAILED,
    "CANCELLED": common_pb2.OPERATION_STATE_CANCELLED,
}


def _ts(dt) -> timestamp_pb2.Timestamp:  # type: ignore[no-untyped-def]
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def provenance_to_proto(p: Provenance) -> labels_pb2.Provenance:
    return labels_pb2.Provenance(
        source=_SOURCE_TO_PROTO[p.source],
        model_version=p.model_version,
        job_id=p.job_id,
        reviewer=p.reviewer,
        weights_trained=p.weights_trained,
    )


def version_to_proto(r: LabelVersionRecord) -> labels_pb2.LabelVersion:
    spacing = [sum(r.affine[row * 4 + col] ** 2 for row in range(3)) ** 0.5 for col in range(3)]
    return labels_pb2.LabelVersion(
        version_id=r.version_id,
        case_id=r.case_id,
        parent_version_id=r.parent_version_id,
        label_map=common_pb2.BlobRef(digest=r.label_map_digest, size_bytes=r.label_map_size, media_type=NIFTI_GZ),
        ct=common_pb2.BlobRef(digest=r.ct_digest, size_bytes=r.ct_size, media_type=NIFTI_GZ),
        provenance=provenance_to_proto(r.provenance),
        organs=list(r.organs),
        create_time=_ts(r.create_time),
        geometry=common_pb2.VolumeGeometry(shape=list(r.shape), affine=list(r.affine), spacing_mm=spacing),
        organ_provenance=[
            labels_pb2.OrganProvenance(
                organ=oid, provenance=provenance_to_proto(op.provenance), version_id=op.version_id
            )
            for oid, op in sorted(r.organ_provenance.items())
        ],
    )


def audit_to_proto(r: AuditRecord) -> labels_pb2.AuditRecord:
    return labels_pb2.AuditRecord(
        record_id=r.record_id,
        time=_ts(r.time),
        principal=r.principal,
        method=r.method,
        case_id=r.case_id,
        version_ids=list(r.version_ids),
        job_id=r.job_id,
        outcome=r.outcome,
    )


_SEG_STATE = {
    "WRITTEN": labels_pb2.DICOM_SEG_STATE_WRITTEN,
    "SENT": labels_pb2.DICOM_SEG_STATE_SENT,
    "SEND_FAILED": labels_pb2.DICOM_SEG_STATE_SEND_FAILED,
    "REFUSED": labels_pb2.DICOM_SEG_STATE_REFUSED,
    "FAILED": labels_pb2.DICOM_SEG_STATE_FAILED,
}


def seg_outcome_to_proto(o: SegOutcome) -> labels_pb2.DicomSegOutcome:
    return labels_pb2.DicomSegOutcome(
        case_id=o.case_id,
        version_id=o.version_id,
        state=_SEG_STATE[o.state],
        path=o.path,
        sha256=o.sha256,
        organs=list(o.organs),
        referenced_instance_count=o.referenced_instance_count,
        reason=o.reason,
        reason_metadata=o.reason_metadata,
        c_store_status=o.c_store_status,
    )


def export_to_proto(j: ExportJobRecord, outcomes: Sequence[SegOutcome] = ()) -> labels_pb2.ExportJob:
    options = ExportOptions.from_dict(j.options)
    msg = labels_pb2.ExportJob(
        job_id=j.job_id,
        state=_OP_STATE[j.state],
        destination_uri=j.destination_uri,
        progress=labels_pb2.ExportProgress(cases_done=j.cases_done, cases_total=j.cases_total),
        error_reason=j.error_reason,
        create_time=_ts(j.create_time),
        include_dicom_seg=options.include_dicom_seg,
        dicom_seg_outcomes=[seg_outcome_to_proto(o) for o in outcomes],
    )
    if options.pacs is not None:
        msg.pacs_destination.CopyFrom(
            labels_pb2.DicomDestination(
                host=options.pacs.host,
                port=options.pacs.port,
                called_ae_title=options.pacs.called_ae,
                calling_ae_title=options.pacs.calling_ae,
            )
        )
    return msg


def export_options_of(request: labels_pb2.ExportDatasetRequest) -> ExportOptions:
    """The request's SEG options, validated (InvalidArgument INVALID_PACS_DESTINATION)."""
    pacs = None
    if request.HasField("pacs_destination"):
        if not request.include_dicom_seg:
            raise InvalidArgument(
                "INVALID_PACS_DESTINATION",
                "pacs_destination needs include_dicom_seg",
                domain=DOMAIN,
                metadata={"field": "include_dicom_seg"},
            )
        d = request.pacs_destination
        pacs = PacsDestination(d.host, d.port, d.called_ae_title, d.calling_ae_title or "ATLASFLOW")
        pacs.validate()
    return ExportOptions(include_dicom_seg=request.include_dicom_seg, pacs=pacs)


class IngestSourceInstances:
    """Callable: volume digest -> the source CT instances (headers only: everything before
    (7FE0,0010) PixelData) of the series version that assembled that volume, fetched from the
    ingest service by IngestService.StreamSeriesInstances. Each instance's bytes are checked
    against the sha256 the stream sends.

    Raises NotFound("SOURCE_SERIES_NOT_FOUND") when ingest assembled no such volume,
    Unavailable("INGEST_UNAVAILABLE") when ingest does not answer, DataLoss("INGEST_STREAM_BROKEN")
    on a malformed stream, Unavailable("INGEST_ERROR") (metadata "code", "reason") otherwise.
    """

    def __init__(self, target: str, max_message_bytes: int = 64 * 1024 * 1024, timeout_s: float = 300.0) -> None:
        self.target = target
        self.max_message_bytes = max_message_bytes
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None

    def _stub(self) -> ingest_pb2_grpc.IngestServiceStub:
        with self._lock:
            if self._channel is None:
                self._channel = sync_channel(self.target, self.max_message_bytes)
            return ingest_pb2_grpc.IngestServiceStub(self._channel)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def __call__(self, volume_digest: str) -> list[pydicom.Dataset]:
        request = ingest_pb2.StreamSeriesInstancesRequest(volume_digest=volume_digest, headers_only=True)
        datasets: list[pydicom.Dataset] = []
        expected = -1
        current, buf = 0, bytearray()

        def broken(what: str) -> DataLoss:
            return DataLoss(
                "INGEST_STREAM_BROKEN",
                "the ingest instance stream is malformed",
                domain=DOMAIN,
                metadata={"problem": what},
            )

        try:
            for msg in self._stub().StreamSeriesInstances(request, timeout=self.timeout_s):
                if expected < 0:
                    expected = msg.instance_count
                if msg.instance_index != current or msg.offset != len(buf):
                    raise broken("ORDER")
                buf += msg.chunk
                if not msg.last_chunk:
                    continue
                if hashlib.sha256(buf).hexdigest() != msg.sha256:
                    raise broken("CHECKSUM")
                datasets.append(pydicom.dcmread(io.BytesIO(bytes(buf))))
                current, buf = current + 1, bytearray()
        except grpc.RpcError as exc:
            info = error_info_of(exc)
            reason = info.reason if info is not None else ""
            if exc.code() == grpc.StatusCode.NOT_FOUND and reason == "VOLUME_NOT_FOUND":
                raise NotFound(
                    "SOURCE_SERIES_NOT_FOUND",
                    "the CT volume was not assembled by the ingest service: no source instances",
                    domain=DOMAIN,
                ) from None
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable("INGEST_UNAVAILABLE", "the ingest service did not answer", domain=DOMAIN) from None
            raise Unavailable(
                "INGEST_ERROR",
                "the ingest service failed to send the source instances",
                domain=DOMAIN,
                metadata={"code": exc.code().name, "reason": reason},
            ) from None
        if buf or len(datasets) != expected:
            raise broken("COUNT")
        return datasets


def destination_path(uri: str, export_root: Path | None = None) -> Path:
    """The local directory of a file:// destination; inside `export_root` when one is set.

    InvalidArgument("INVALID_DESTINATION") unless `uri` is file:///absolute/dir without a
    query or fragment (labels.proto, ExportDatasetRequest.destination_uri);
    InvalidArgument("DESTINATION_NOT_ALLOWED") outside `export_root`.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path:
        raise InvalidArgument(
            "INVALID_DESTINATION",
            "destination_uri must be file:///absolute/dir in this deployment",
            domain=DOMAIN,
            metadata={"scheme": parsed.scheme[:20]},
        )
    if parsed.query or parsed.fragment or "?" in uri or "#" in uri:
        raise InvalidArgument(
            "INVALID_DESTINATION",
            "destination_uri must not carry a query or fragment",
            domain=DOMAIN,
            metadata={"field": "destination_uri"},
        )
    path = Path(unquote(parsed.path)).resolve()
    if export_root is not None and not path.is_relative_to(export_root):
        raise InvalidArgument(
            "DESTINATION_NOT_ALLOWED",
            "destination must lie inside the service's export directory",
            domain=DOMAIN,
            metadata={"export_dir": str(export_root)},
        )
    return path


SourceFetcher = Callable[[str], Sequence[pydicom.Dataset]]


class Exporter:
    """Runs export jobs one at a time; a restart resumes QUEUED/RUNNING ones from the start
    (case files are rewritten atomically, so a resumed export converges to the same files;
    a SEG keeps its UIDs, derived from the label version).

    sources: fetches a CT volume's source instances (DICOM SEG exports; `IngestSourceInstances`
    in the service). Each case's SEG outcome is committed to the repository
    (`record_export_outcome`) as soon as the case is written (and sent), so a crash loses none;
    a resumed job replaces a case's outcome when it exports the case again."""

    def __init__(
        self, repo: LabelRepository, blobs: BlobStore, metrics: Metrics, sources: SourceFetcher | None = None
    ) -> None:
        self.repo = repo
        self.blobs = blobs
        self.metrics = metrics
        self.sources = sources
        self.wake = asyncio.Event()

    def _fetch_sources(self, volume_digest: str) -> Sequence[pydicom.Dataset]:
        if self.sources is None:
            raise Unavailable("INGEST_UNAVAILABLE", "no ingest service is configured", domain=DOMAIN)
        return self.sources(volume_digest)

    def _send(self, seg: pydicom.Dataset, pacs: PacsDestination, outcome: SegOutcome) -> None:
        """C-STORE `seg`; success or warning statuses (0x0000, 0xBxxx) make `outcome` SENT."""
        try:
            status = send_c_store(seg, pacs.host, pacs.port, called_ae=pacs.called_ae, calling_ae=pacs.calling_ae)
        except AtlasflowError as exc:
            outcome.state, outcome.reason = SEG_SEND_FAILED, exc.reason
            return
        except Exception as exc:  # noqa: BLE001 - pynetdicom: no accepted context, socket errors
            outcome.state, outcome.reason = SEG_SEND_FAILED, "PACS_UNAVAILABLE"
            outcome.reason_metadata = {"error": type(exc).__name__}
            return
        outcome.c_store_status = status
        if status == 0 or 0xB000 <= status <= 0xBFFF:
            outcome.state = SEG_SENT
        else:
            outcome.state, outcome.reason = SEG_SEND_FAILED, "PACS_REFUSED"
            outcome.reason_metadata = {"status": f"0x{status:04X}"}

    def run_job(self, job: ExportJobRecord) -> None:
        with tracer.start_as_current_span("labels.export") as span:
            span.set_attribute("atlasflow.export_job_id", job.job_id)
            span.set_attribute("atlasflow.cases_total", job.cases_total)
            try:
                options = ExportOptions.from_dict(job.options)
                span.set_attribute("atlasflow.include_dicom_seg", options.include_dicom_seg)
                out = destination_path(job.destination_uri)
                out.mkdir(parents=True, exist_ok=True)
                if job.state == "QUEUED":
                    self.repo.update_export_job(job.job_id, state="RUNNING", cases_done=0)
                entries = []
                for done, (case_id, version_id) in enumerate(job.versions, start=1):
                    record = self.repo.get_version(version_id)
                    label_map = self.blobs.get(record.label_map_digest)
                    organ_provenance = {o: op.provenance for o, op in record.organ_provenance.items()}
                    organ_versions = {o: op.version_id for o, op in record.organ_provenance.items()}
                    seg = seg_bytes = outcome = None
                    if options.include_dicom_seg:
                        seg, seg_bytes, outcome = build_case_seg(
                            self._fetch_sources,
                            record.ct_digest,
                            label_map,
                            record.provenance,
                            version_id,
                            case_id=case_id,
                            organ_provenance=organ_provenance,
                            organ_versions=organ_versions,
                        )
                    entry = export_case(
                        out,
                        case_id,
                        self.blobs.get(record.ct_digest),
                        label_map,
                        record.provenance,
                        version_id,
                        organ_provenance=organ_provenance,
                        organ_versions=organ_versions,
                        case_id=case_id,
                        dicom_seg=seg_bytes,
                        dicom_seg_outcome=outcome.to_dict() if outcome is not None else None,
                    )
                    if outcome is not None:
                        if seg_bytes is not None:
                            outcome.path = entry["dicom_seg"]["path"]
                            outcome.sha256 = entry["dicom_seg"]["sha256"]
                            if seg is not None and options.pacs is not None:
                                self._send(seg, options.pacs, outcome)
                            entry["dicom_seg"] = outcome.to_dict()
                        self.repo.record_export_outcome(job.job_id, case_id, outcome.to_dict())
                        self.metrics.count(f"dicom_seg_{outcome.state.lower()}")
                        if outcome.state in (SEG_FAILED, SEG_SEND_FAILED) or outcome.reason:
                            log.warning(
                                "export: DICOM SEG of a case not written or not sent",
                                extra={
                                    "fields": {
                                        "job_id": job.job_id,
                                        "case_id": case_id,
                                        "state": outcome.state,
                                        "reason": outcome.reason,
                                    }
                                },
                            )
                    entries.append(entry)
                    self.repo.update_export_job(job.job_id, cases_done=done)
                write_manifest(out, entries)
                self.repo.update_export_job(job.job_id, state="SUCCEEDED")
                self.metrics.count("exports_succeeded")
            except AtlasflowError as exc:
                log.error("export failed", extra={"fields": {"job_id": job.job_id, "reason": exc.reason}})
                self.repo.update_export_job(job.job_id, state="FAILED", error_reason=exc.reason)
            except OSError as exc:
                log.error("export failed", extra={"fields": {"job_id": job.job_id, "exc_type": type(exc).__name__}})
                self.repo.update_export_job(job.job_id, state="FAILED", error_reason="DESTINATION_WRITE_FAILED")

    async def run(self) -> None:
        while True:
            for job in self.repo.list_export_jobs(("QUEUED", "RUNNING")):
                await asyncio.to_thread(self.run_job, job)
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), 2.0)
            except TimeoutError:
                pass


ANONYMOUS = "anonymous"


class LabelServicer(labels_pb2_grpc.LabelServiceServicer):
    """Thin transport: converts messages, calls LabelWriter / the repository, and records an
    audit record for every call (writes inside their own transaction, reads and failures
    after the fact)."""

    def __init__(
        self, repo: LabelRepository, blobs: BlobStore, exporter: Exporter, export_root: Path | None = None
    ) -> None:
        self.repo = repo
        self.blobs = blobs
        self.exporter = exporter
        self.export_root = export_root
        self.writer = LabelWriter(repo, blobs)

    async def _audited(
        self,
        context,
        method: str,
        case_id: str,  # type: ignore[no-untyped-def]
        work: Callable[[AuditEvent], T],
        read_ids: Callable[[T], tuple[tuple[str, ...], str]] | None = None,
    ) -> T:
        """Run `work(audit_event)` in a thread. Writes pass the event to the repository (same
        transaction); for reads (`read_ids` given: result -> (version ids, job id)) the record
        is appended afterwards. A failure is recorded with its reason and re-raised."""
        event = AuditEvent(principal_of(context) or ANONYMOUS, method, case_id)
        try:
            result = await asyncio.to_thread(work, event)
        except AtlasflowError as exc:
            await asyncio.to_thread(
                self.repo.record_audit, AuditEvent(event.principal, method, case_id, outcome=exc.reason)
            )
            raise
        if read_ids is not None:
            versions, job = read_ids(result)
            await asyncio.to_thread(self.repo.record_audit, AuditEvent(event.principal, method, case_id, versions, job))
        return result

    async def CreateLabelVersion(self, request, context):  # type: ignore[no-untyped-def]
        if request.provenance.source not in _SOURCE_FROM_PROTO:
            raise InvalidArgument("INVALID_PROVENANCE", "provenance.source is required", domain=DOMAIN)
        p = request.provenance
        provenance = Provenance(_SOURCE_FROM_PROTO[p.source], p.model_version, p.job_id, p.reviewer, p.weights_trained)
        record = await self._audited(
            context,
            "CreateLabelVersion",
            request.case_id,
            lambda audit: self.writer.create(
                request.case_id,
                request.label_map.digest,
                request.ct.digest,
                provenance,
                request.request_id,
                request.expected_parent_version_id,
                list(request.labelled_organs),
                audit=audit,
            ),
        )
        return labels_pb2.CreateLabelVersionResponse(version=version_to_proto(record))

    async def ReviseLabels(self, request, context):  # type: ignore[no-untyped-def]
        reviewer = principal_of(context)
        if not reviewer:
            await asyncio.to_thread(
                self.repo.record_audit,
                AuditEvent(ANONYMOUS, "ReviseLabels", request.case_id, outcome="PRINCIPAL_REQUIRED"),
            )
            raise Unauthenticated(
                "PRINCIPAL_REQUIRED",
                "ReviseLabels needs the reviewer's identity in metadata x-atlasflow-principal",
                domain=DOMAIN,
            )
        revisions = []
        for r in request.revisions:
            kind = r.WhichOneof("mask")
            revisions.append(
                MaskRevision(
                    int(r.organ),
                    mask_digest=r.mask_blob.digest if kind == "mask_blob" else "",
                    xor_delta=bytes(r.xor_delta) if kind == "xor_delta" else None,
                )
            )
        record = await self._audited(
            context,
            "ReviseLabels",
            request.case_id,
            lambda audit: self.writer.revise(
                request.case_id,
                request.expected_parent_version_id,
                revisions,
                request.request_id,
                reviewer,
                audit=audit,
            ),
        )
        return labels_pb2.ReviseLabelsResponse(version=version_to_proto(record))

    async def GetLabelVersion(self, request, context):  # type: ignore[no-untyped-def]
        record = await self._audited(
            context,
            "GetLabelVersion",
            "",
            lambda _: self.repo.get_version(request.version_id),
            lambda r: ((r.version_id,), ""),
        )
        return labels_pb2.GetLabelVersionResponse(version=version_to_proto(record))

    async def ListLabelVersions(self, request, context):  # type: ignore[no-untyped-def]
        records, token = await self._audited(
            context,
            "ListLabelVersions",
            request.case_id,
            lambda _: self.repo.list_versions(request.case_id or None, request.page_size, request.page_token),
            lambda result: (tuple(r.version_id for r in result[0]), ""),
        )
        return labels_pb2.ListLabelVersionsResponse(
            versions=[version_to_proto(r) for r in records], next_page_token=token
        )

    async def ExportDataset(self, request, context):  # type: ignore[no-untyped-def]
        def work(audit: AuditEvent) -> ExportJobRecord:
            destination_path(request.destination_uri, self.export_root)
            options = export_options_of(request)
            return self.repo.create_export_job(
                list(request.case_ids), request.destination_uri, audit=audit, options=options.to_dict()
            )

        job = await self._audited(context, "ExportDataset", "", work)
        self.exporter.wake.set()
        return labels_pb2.ExportDatasetResponse(job=export_to_proto(job))

    def _outcomes(self, job: ExportJobRecord) -> list[SegOutcome]:
        if not ExportOptions.from_dict(job.options).include_dicom_seg:
            return []
        return [SegOutcome.from_dict(o.outcome) for o in self.repo.list_export_outcomes(job.job_id)]

    async def GetExportJob(self, request, context):  # type: ignore[no-untyped-def]
        job = await self._audited(
            context, "GetExportJob", "", lambda _: self.repo.get_export_job(request.job_id), lambda j: ((), j.job_id)
        )
        outcomes = await asyncio.to_thread(self._outcomes, job)
        return labels_pb2.GetExportJobResponse(job=export_to_proto(job, outcomes))

    async def ListAuditRecords(self, request, context):  # type: ignore[no-untyped-def]
        records, token = await asyncio.to_thread(
            self.repo.list_audit_records, request.case_id, request.principal, request.page_size, request.page_token
        )
        return labels_pb2.ListAuditRecordsResponse(records=[audit_to_proto(r) for r in records], next_page_token=token)
