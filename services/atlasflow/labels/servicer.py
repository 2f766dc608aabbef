"""LabelService gRPC servicer: converts a request, calls the label domain, converts the answer.

Writes go through `atlasflow.labels.writer.LabelWriter`, reads to the repository, exports are
queued in the repository and run by the export worker (atlasflow.labels.worker.Exporter, woken
here). Every call is audited (`atlasflow.labels.audit.audited`). Domain and repository calls
block (SQL, blob and file I/O), so each runs in a thread (`asyncio.to_thread`), never on the
event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import cast

from google.protobuf import timestamp_pb2, unknown_fields
from prometheus_client import CollectorRegistry, Histogram

from atlasflow.common.blobstore import BlobStore
from atlasflow.common.errors import (
    AtlasflowError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from atlasflow.common.metrics import Metrics
from atlasflow.common.server import Context, author_of, principal_of, roles_of
from atlasflow.common.v1 import common_pb2
from atlasflow.labels.audit import audited, require_principal
from atlasflow.labels.case_seg import build_case_seg
from atlasflow.labels.deid import DATES_FULL, DATES_MODIFIED, DATES_REMOVED, DeidOptions
from atlasflow.labels.export_jobs import SEG_REFUSED, ExportOptions, PacsDestination, SegOutcome, job_seg_outcomes
from atlasflow.labels.export_store import S3Exports, check_destination
from atlasflow.labels.repository import (
    DOMAIN,
    AuditEvent,
    AuditRecord,
    ExportJobRecord,
    LabelRepository,
    LabelVersionRecord,
    Provenance,
)
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.labels.worker import Exporter
from atlasflow.labels.writer import LabelWriter, MaskRevision

NIFTI_GZ = "application/x-nifti+gzip"
#: bytes per StreamLabelVersionSeg message
SEG_CHUNK_BYTES = 1 << 20


def _organ(organ_id: int) -> common_pb2.Organ:
    return cast("common_pb2.Organ", organ_id)  # AbdomenAtlas ids are the Organ enum's values


def _organs(organ_ids: Iterable[int]) -> list[common_pb2.Organ]:
    return [_organ(o) for o in organ_ids]


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


def _ts(dt: datetime) -> timestamp_pb2.Timestamp:
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
        organs=_organs(r.organs),
        create_time=_ts(r.create_time),
        geometry=common_pb2.VolumeGeometry(shape=list(r.shape), affine=list(r.affine), spacing_mm=spacing),
        organ_provenance=[
            labels_pb2.OrganProvenance(
                organ=_organ(oid), provenance=provenance_to_proto(op.provenance), version_id=op.version_id
            )
            for oid, op in sorted(r.organ_provenance.items())
        ],
        review_seconds=r.review_seconds,
        organ_review_seconds=[
            labels_pb2.OrganReviewTime(organ=_organ(oid), seconds=s)
            for oid, s in sorted(r.organ_review_seconds.items())
        ],
        organ_changed_ml=[
            labels_pb2.OrganChangedVolume(organ=_organ(oid), ml=ml) for oid, ml in sorted(r.organ_changed_ml.items())
        ],
    )


def review_seconds_histogram(registry: CollectorRegistry) -> Histogram:
    """``atlasflow_review_seconds{scope="case"|"organ"}``: the reviewer's time of each stored
    revision (the method's key figure: human minutes per case), observed once per new version."""
    return Histogram(
        "atlasflow_review_seconds",
        "Time a reviewer spent per stored revision: the whole case or one organ, seconds",
        ["scope"],
        buckets=(5, 15, 30, 60, 120, 180, 300, 600, 900, 1800, 3600),
        registry=registry,
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
        organs=_organs(o.organs),
        referenced_instance_count=o.referenced_instance_count,
        reason=o.reason,
        reason_metadata=o.reason_metadata,
        c_store_status=o.c_store_status,
    )


_DATES_TO_PROTO = {
    DATES_REMOVED: labels_pb2.DEIDENTIFICATION_DATES_REMOVED,
    DATES_MODIFIED: labels_pb2.DEIDENTIFICATION_DATES_MODIFIED,
    DATES_FULL: labels_pb2.DEIDENTIFICATION_DATES_FULL,
}
_DATES_FROM_PROTO = {v: k for k, v in _DATES_TO_PROTO.items()} | {
    labels_pb2.DEIDENTIFICATION_DATES_UNSPECIFIED: DATES_REMOVED
}
#: the audit method of an identified export (who, what, when, outcome: the labels audit trail)
IDENTIFIED_EXPORT_METHOD = "ExportDataset/IDENTIFIED"
#: ExportDatasetRequest field 4, the removed host:port DicomDestination
_REMOVED_PACS_FIELD = 4


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
        pacs_destination_id=options.pacs_destination_id,
        identity=(
            labels_pb2.EXPORT_IDENTITY_IDENTIFIED if options.identified else labels_pb2.EXPORT_IDENTITY_DEIDENTIFIED
        ),
    )
    if not options.identified:
        msg.deidentification.CopyFrom(
            labels_pb2.DeidentificationOptions(
                dates=_DATES_TO_PROTO[options.deid.dates], clean_descriptors=options.deid.clean_descriptors
            )
        )
    return msg


def export_options_of(
    request: labels_pb2.ExportDatasetRequest, destinations: Mapping[str, PacsDestination]
) -> ExportOptions:
    """The request's export options, validated: InvalidArgument
    PACS_DESTINATION_BY_ADDRESS_REMOVED (the removed field 4 is set), INVALID_PACS_DESTINATION /
    UNKNOWN_PACS_DESTINATION (`ExportOptions.checked`), INVALID_ARGUMENT (an unknown enum value,
    or de-identification options on an identified export)."""
    unknown = unknown_fields.UnknownFieldSet(request)
    if any(unknown[i].field_number == _REMOVED_PACS_FIELD for i in range(len(unknown))):
        raise InvalidArgument(
            "PACS_DESTINATION_BY_ADDRESS_REMOVED",
            "pacs_destination (host:port) was removed: name a configured destination by pacs_destination_id",
            domain=DOMAIN,
            metadata={"field": "pacs_destination"},
        )
    if (
        request.identity
        not in (
            labels_pb2.EXPORT_IDENTITY_UNSPECIFIED,
            labels_pb2.EXPORT_IDENTITY_DEIDENTIFIED,
            labels_pb2.EXPORT_IDENTITY_IDENTIFIED,
        )
        or request.deidentification.dates not in _DATES_FROM_PROTO
    ):
        raise InvalidArgument(
            "INVALID_ARGUMENT", "unknown identity or dates value", domain=DOMAIN, metadata={"field": "identity"}
        )
    identified = request.identity == labels_pb2.EXPORT_IDENTITY_IDENTIFIED
    deid = None
    if request.HasField("deidentification"):
        d = request.deidentification
        deid = DeidOptions(_DATES_FROM_PROTO[d.dates], d.clean_descriptors)
    return ExportOptions.checked(
        request.include_dicom_seg, request.pacs_destination_id, destinations, identified=identified, deid=deid
    )


def check_export_allowed(options: ExportOptions, roles: frozenset[str]) -> None:
    """PermissionDenied("IDENTIFIED_EXPORT_NOT_ALLOWED") for an identified export by a caller
    without the admin role (no roles without a verified token: authentication disabled)."""
    if options.identified and "admin" not in roles:
        raise PermissionDenied(
            "IDENTIFIED_EXPORT_NOT_ALLOWED", "an identified export needs the admin role", domain=DOMAIN
        )


class LabelServicer(labels_pb2_grpc.LabelServiceServicer):
    """Thin transport: converts messages, calls LabelWriter / the repository in a thread, and
    records an audit record for every call (writes inside their own transaction, reads and
    failures after the fact; `atlasflow.labels.audit`)."""

    def __init__(
        self,
        repo: LabelRepository,
        blobs: BlobStore,
        exporter: Exporter,
        export_root: Path | None = None,
        pacs_destinations: Mapping[str, PacsDestination] | None = None,
        *,
        export_s3: S3Exports | None = None,
    ) -> None:
        self.repo = repo
        self.blobs = blobs
        self.exporter = exporter
        # no export root: file:// exports are refused; no export_s3: s3:// ones (neither: none;
        # EXPORT_NOT_CONFIGURED)
        self.export_root = export_root
        self.export_s3 = export_s3
        self.pacs_destinations = dict(pacs_destinations or {})
        self.writer = LabelWriter(repo, blobs)
        # ReviseLabels only from the reviewer holding the case's lease (labels/ranking_leases.py;
        # the app sets it; None only where a test builds the servicer without a ranking service)
        self.leases: Callable[[str, str], Awaitable[None]] | None = None
        # atlasflow_review_seconds (review_seconds_histogram; the app sets it on its registry)
        self.review_histogram: Histogram | None = None
        # atlasflow_stage_duration_seconds{stage="label_write"} (the app sets it)
        self.metrics: Metrics | None = None

    async def CreateLabelVersion(
        self, request: labels_pb2.CreateLabelVersionRequest, context: Context
    ) -> labels_pb2.CreateLabelVersionResponse:
        if request.provenance.source not in _SOURCE_FROM_PROTO:
            raise InvalidArgument("INVALID_PROVENANCE", "provenance.source is required", domain=DOMAIN)
        p = request.provenance
        # the author is the verified caller, never the request's claim: a service's identity
        # (svc:segmentation for the AI versions) or the person's token subject (an admin's import)
        author = author_of(context) or p.reviewer
        t0 = time.perf_counter()
        provenance = Provenance(_SOURCE_FROM_PROTO[p.source], p.model_version, p.job_id, author, p.weights_trained)
        record = await asyncio.to_thread(
            audited,
            self.repo,
            principal_of(context),
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
        if self.metrics is not None:
            self.metrics.observe_stage("label_write", time.perf_counter() - t0)
        return labels_pb2.CreateLabelVersionResponse(version=version_to_proto(record))

    async def ReviseLabels(
        self, request: labels_pb2.ReviseLabelsRequest, context: Context
    ) -> labels_pb2.ReviseLabelsResponse:
        reviewer = await asyncio.to_thread(
            require_principal, self.repo, principal_of(context), "ReviseLabels", request.case_id
        )
        if self.leases is not None:
            # only the holder of the case's lease in ranking (FAILED_PRECONDITION LEASE_NOT_HELD)
            try:
                await self.leases(request.case_id, reviewer)
            except AtlasflowError as exc:  # the refused revision stays in the audit trail
                refused = AuditEvent(reviewer, "ReviseLabels", request.case_id, outcome=exc.reason)
                await asyncio.to_thread(self.repo.record_audit, refused)
                raise
        revisions = []
        for r in request.revisions:
            kind = r.WhichOneof("mask")
            revisions.append(
                MaskRevision(
                    int(r.organ),
                    mask_digest=r.mask_blob.digest if kind == "mask_blob" else "",
                    xor_delta=bytes(r.xor_delta) if kind == "xor_delta" else None,
                    review_seconds=r.review_seconds,
                )
            )
        # a repeated request_id returns the version made first: its time is not counted twice
        t0 = time.perf_counter()
        repeat = (
            await asyncio.to_thread(self.repo.version_for_request, request.request_id) if request.request_id else None
        )
        record = await asyncio.to_thread(
            audited,
            self.repo,
            reviewer,
            "ReviseLabels",
            request.case_id,
            lambda audit: self.writer.revise(
                request.case_id,
                request.expected_parent_version_id,
                revisions,
                request.request_id,
                reviewer,
                audit=audit,
                review_seconds=request.review_seconds,
            ),
        )
        if self.review_histogram is not None and repeat is None:
            if record.review_seconds > 0:
                self.review_histogram.labels("case").observe(record.review_seconds)
            for seconds in record.organ_review_seconds.values():
                self.review_histogram.labels("organ").observe(seconds)
        if self.metrics is not None:
            self.metrics.observe_stage("label_write", time.perf_counter() - t0)
        return labels_pb2.ReviseLabelsResponse(version=version_to_proto(record))

    async def GetLabelVersion(
        self, request: labels_pb2.GetLabelVersionRequest, context: Context
    ) -> labels_pb2.GetLabelVersionResponse:
        record = await asyncio.to_thread(
            audited,
            self.repo,
            principal_of(context),
            "GetLabelVersion",
            "",
            lambda _: self.repo.get_version(request.version_id),
            lambda r: ((r.version_id,), ""),
        )
        return labels_pb2.GetLabelVersionResponse(version=version_to_proto(record))

    async def ListLabelVersions(
        self, request: labels_pb2.ListLabelVersionsRequest, context: Context
    ) -> labels_pb2.ListLabelVersionsResponse:
        records, token = await asyncio.to_thread(
            audited,
            self.repo,
            principal_of(context),
            "ListLabelVersions",
            request.case_id,
            lambda _: self.repo.list_versions(request.case_id or None, request.page_size, request.page_token),
            lambda result: (tuple(r.version_id for r in result[0]), ""),
        )
        return labels_pb2.ListLabelVersionsResponse(
            versions=[version_to_proto(r) for r in records], next_page_token=token
        )

    async def ExportDataset(
        self, request: labels_pb2.ExportDatasetRequest, context: Context
    ) -> labels_pb2.ExportDatasetResponse:
        roles = roles_of(context)
        identified = request.identity == labels_pb2.EXPORT_IDENTITY_IDENTIFIED

        def work(audit: AuditEvent) -> ExportJobRecord:
            if self.export_root is None and self.export_s3 is None:
                raise FailedPrecondition(
                    "EXPORT_NOT_CONFIGURED",
                    "exports are not configured on this server (labels EXPORT_DIR, EXPORT_S3_PREFIXES)",
                    domain=DOMAIN,
                )
            check_destination(request.destination_uri, self.export_root, self.export_s3)
            options = export_options_of(request, self.pacs_destinations)
            check_export_allowed(options, roles)
            return self.repo.create_export_job(
                list(request.case_ids), request.destination_uri, audit=audit, options=options.to_dict()
            )

        # an identified export is recorded under its own method name (accepted with its job and
        # versions, or refused with the reason): the one place to switch to a common audit
        method = IDENTIFIED_EXPORT_METHOD if identified else "ExportDataset"
        job = await asyncio.to_thread(audited, self.repo, principal_of(context), method, "", work)
        self.exporter.wake.set()
        return labels_pb2.ExportDatasetResponse(job=export_to_proto(job))

    async def GetExportJob(
        self, request: labels_pb2.GetExportJobRequest, context: Context
    ) -> labels_pb2.GetExportJobResponse:
        job = await asyncio.to_thread(
            audited,
            self.repo,
            principal_of(context),
            "GetExportJob",
            "",
            lambda _: self.repo.get_export_job(request.job_id),
            lambda j: ((), j.job_id),
        )
        outcomes = await asyncio.to_thread(job_seg_outcomes, self.repo, job)
        return labels_pb2.GetExportJobResponse(job=export_to_proto(job, outcomes))

    async def ListAuditRecords(
        self, request: labels_pb2.ListAuditRecordsRequest, context: Context
    ) -> labels_pb2.ListAuditRecordsResponse:
        records, token = await asyncio.to_thread(
            self.repo.list_audit_records, request.case_id, request.principal, request.page_size, request.page_token
        )
        return labels_pb2.ListAuditRecordsResponse(records=[audit_to_proto(r) for r in records], next_page_token=token)

    async def PurgeStudy(
        self, request: labels_pb2.PurgeStudyRequest, context: Context
    ) -> labels_pb2.PurgeStudyResponse:
        if not request.case_id:
            raise InvalidArgument(
                "INVALID_REQUEST", "case_id is required", domain=DOMAIN, metadata={"field": "case_id"}
            )
        # the audit trail keeps the purge itself (audit records are never purged)
        counts, released = await asyncio.to_thread(
            audited,
            self.repo,
            principal_of(context),
            "PurgeStudy",
            request.case_id,
            lambda _: self.repo.purge_study(request.case_id),
            lambda _result: ((), ""),
        )
        referenced = await asyncio.to_thread(self.repo.referenced, list(request.check_digests))
        return labels_pb2.PurgeStudyResponse(
            deleted_rows=counts, released_digests=released, referenced_digests=referenced
        )

    async def StreamLabelVersionSeg(
        self, request: labels_pb2.StreamLabelVersionSegRequest, context: Context
    ) -> AsyncIterator[labels_pb2.StreamLabelVersionSegResponse]:
        if bool(request.case_id) == bool(request.version_id):
            raise InvalidArgument(
                "INVALID_ARGUMENT",
                "exactly one of case_id and version_id is required",
                domain=DOMAIN,
                metadata={"field": "case_id" if not request.case_id else "version_id"},
            )
        record, data = await asyncio.to_thread(
            audited,
            self.repo,
            principal_of(context),
            "StreamLabelVersionSeg",
            request.case_id,
            lambda _: self._seg_of(request.case_id, request.version_id, request.headers_only),
            lambda result: ((result[0].version_id,), ""),
        )
        sha = hashlib.sha256(data).hexdigest()
        for offset in range(0, max(len(data), 1), SEG_CHUNK_BYTES):
            last = offset + SEG_CHUNK_BYTES >= len(data)
            msg = labels_pb2.StreamLabelVersionSegResponse(
                offset=offset,
                chunk=data[offset : offset + SEG_CHUNK_BYTES],
                last_chunk=last,
                sha256=sha if last else "",
            )
            if offset == 0:
                msg.version.CopyFrom(version_to_proto(record))
                msg.size_bytes = len(data)
            yield msg

    def _seg_of(self, case_id: str, version_id: str, headers_only: bool) -> tuple[LabelVersionRecord, bytes]:
        """(the version, its identified DICOM SEG as Part-10 bytes; without PixelData when
        ``headers_only``), built like an identified export's (`build_case_seg`); a SEG that
        cannot be made raises the export outcome's reason (see the proto)."""
        if version_id:
            record = self.repo.get_version(version_id)
        else:
            head = self.repo.head(case_id)
            if head is None:
                raise NotFound(
                    "CASE_NOT_FOUND", "case has no label version", domain=DOMAIN, metadata={"case_id": case_id[:80]}
                )
            record = head
        sources = self.exporter.sources
        if sources is None:
            raise Unavailable("INGEST_UNAVAILABLE", "no ingest service is configured", domain=DOMAIN)
        seg, data, outcome = build_case_seg(
            sources,
            record.ct_digest,
            self.blobs.get(record.label_map_digest),
            record.provenance,
            record.version_id,
            case_id=record.case_id,
            organ_provenance={o: op.provenance for o, op in record.organ_provenance.items()},
            organ_versions={o: op.version_id for o, op in record.organ_provenance.items()},
        )
        if seg is None or data is None:
            meta = dict(outcome.reason_metadata)
            if outcome.reason == "SOURCE_SERIES_NOT_FOUND":
                raise NotFound(outcome.reason, "the CT has no stored source instances", domain=DOMAIN, metadata=meta)
            if outcome.state == SEG_REFUSED or outcome.reason == "DICOM_SEG_ERROR":
                raise FailedPrecondition(
                    outcome.reason, "no DICOM SEG can be made of this label version", domain=DOMAIN, metadata=meta
                )
            raise Unavailable(outcome.reason, "the source instances could not be fetched", domain=DOMAIN, metadata=meta)
        if headers_only:
            del seg.PixelData
            buf = io.BytesIO()
            seg.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
        return record, data
