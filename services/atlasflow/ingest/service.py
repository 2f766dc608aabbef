"""Ingest gRPC servicer and the series assembler (transport + orchestration, no imaging math)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf import timestamp_pb2
from opentelemetry import context as otel_context
from opentelemetry import trace
from pydicom import dcmread

from atlasflow.common.blobstore import BlobStore
from atlasflow.common.errors import AtlasflowError, InvalidArgument, NotFound
from atlasflow.common.metrics import Metrics
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.common.outbox import OutboxRow
from atlasflow.common.telemetry import context_from_traceparent, current_traceparent
from atlasflow.common.v1 import common_pb2
from atlasflow.ingest.assemble import REPAIR, assemble_series
from atlasflow.ingest.dicom import parse_instance
from atlasflow.ingest.scp import StoreScp
from atlasflow.ingest.store import IngestStore, SeriesVersion, UploadState, content_key
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

DOMAIN = "atlasflow.ingest"
SEGMENT_TOPIC = "segmentation.SegmentSeries"
MAX_INSTANCE_BYTES = 2 * 1024 * 1024 * 1024
STREAM_CHUNK_BYTES = 1024 * 1024
_DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}
_STATE = {
    "RECEIVING": ingest_pb2.SERIES_STATE_RECEIVING,
    "ASSEMBLED": ingest_pb2.SERIES_STATE_ASSEMBLED,
    "DISPATCHED": ingest_pb2.SERIES_STATE_DISPATCHED,
    "FAILED": ingest_pb2.SERIES_STATE_FAILED,
}


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def series_to_proto(sv: SeriesVersion) -> ingest_pb2.Series:
    msg = ingest_pb2.Series(
        series_id=sv.series_id,
        case_id=sv.case_id,
        version=sv.version,
        state=_STATE[sv.state],
        instance_count=sv.instance_count,
        failure_reason=sv.failure_reason,
        create_time=_ts(sv.create_time),
        update_time=_ts(sv.update_time),
        trace_id=sv.traceparent.split("-")[1] if sv.traceparent.count("-") == 3 else "",
        duplicate_count=sv.duplicate_count,
        conflict_count=sv.conflict_count,
    )
    if sv.volume_digest:
        msg.volume.CopyFrom(
            common_pb2.BlobRef(
                digest=sv.volume_digest, size_bytes=sv.volume_size, media_type="application/x-nifti+gzip"
            )
        )
    if sv.geometry:
        msg.geometry.CopyFrom(
            common_pb2.VolumeGeometry(
                shape=sv.geometry["shape"], affine=sv.geometry["affine"], spacing_mm=sv.geometry["spacing_mm"]
            )
        )
    return msg


def dicom_header_bytes(data: bytes) -> bytes:
    """The prefix of a DICOM Part-10 file up to (not including) the top-level (7FE0,0010)
    PixelData element (or (7FE0,0008/0009) Float/Double Float Pixel Data): File Meta plus every
    attribute before the pixel data, itself a readable Part-10 file. The whole file when it
    has no pixel data or uses a deflated transfer syntax (no byte offset to cut at)."""
    fp = io.BytesIO(data)
    ds = dcmread(fp, stop_before_pixels=True)
    if str(ds.file_meta.get("TransferSyntaxUID", "")) in _DEFLATED:
        return data
    offset = fp.tell()  # pydicom rewinds to the start of the pixel data element
    if offset >= len(data) or data[offset : offset + 2] not in (b"\xe0\x7f", b"\x7f\xe0"):
        return data
    return data[:offset]


def resolve_series_version(store: IngestStore, series_id: str, version: int, volume_digest: str) -> SeriesVersion:
    """The series version named by (series_id, version; 0 = latest) or by the digest of the
    volume it assembled. NotFound SERIES_NOT_FOUND / SERIES_VERSION_NOT_FOUND /
    VOLUME_NOT_FOUND; InvalidArgument unless exactly one selector is given."""
    if bool(series_id) == bool(volume_digest):
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            "exactly one of series_id and volume_digest is required",
            domain=DOMAIN,
            metadata={"field": "series_id" if not series_id else "volume_digest"},
        )
    if version < 0 or (volume_digest and version):
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            "series_version must be >= 0, and 0 with volume_digest",
            domain=DOMAIN,
            metadata={"field": "series_version"},
        )
    if volume_digest:
        return store.series_by_volume(volume_digest)  # NotFound VOLUME_NOT_FOUND
    if version == 0:
        return store.get_series(series_id)  # NotFound SERIES_NOT_FOUND
    return store.get_series_version(series_id, version)


class Assembler:
    """Turns quiet (or committed) series versions into volumes and queues the hand-off."""

    def __init__(self, store: IngestStore, blobs: BlobStore, metrics: Metrics, quiet_period_s: float) -> None:
        self.store = store
        self.blobs = blobs
        self.metrics = metrics
        self.quiet_period_s = quiet_period_s
        self.on_assembled = lambda: None

    def assemble(self, sv: SeriesVersion) -> None:
        """Blocking: run in a worker thread."""
        token = otel_context.attach(context_from_traceparent(sv.traceparent))
        try:
            with tracer.start_as_current_span("ingest.assemble") as span:
                span.set_attribute("atlasflow.series_id", sv.series_id)
                span.set_attribute("atlasflow.series_version", sv.version)
                try:
                    # Instances were validated on reception; here they are only read.
                    datasets = [
                        dcmread(io.BytesIO(self.blobs.get(d)))
                        for d in self.store.instance_digests(sv.series_id, sv.version)
                    ]
                    # Repairable geometry (gantry tilt, whole missing slices, multi-frame) is
                    # repaired with a warning and flagged `resampled` (DICOM SEG must refuse).
                    volume = assemble_series(datasets, policy=REPAIR)
                except AtlasflowError as exc:
                    log.warning(
                        "series assembly failed", extra={"fields": {"series_id": sv.series_id, "reason": exc.reason}}
                    )
                    self.store.mark_failed(sv.series_id, sv.version, exc.reason)
                    self.metrics.count("series_failed")
                    return
                del datasets
                nifti = to_nifti_bytes(volume.array, volume.affine)
                info = self.blobs.put(nifti)
                spacing = [float(x) for x in (volume.affine[:3, :3] ** 2).sum(axis=0) ** 0.5]
                geometry = {
                    "shape": [int(s) for s in volume.array.shape],
                    "affine": [float(x) for x in volume.affine.ravel()],
                    "spacing_mm": spacing,
                    "resampled": bool(volume.resampled),
                }
                span.set_attribute("atlasflow.resampled", bool(volume.resampled))
                request = segmentation_pb2.SegmentSeriesRequest(
                    case_id=sv.case_id,
                    series_id=sv.series_id,
                    series_version=sv.version,
                    volume=common_pb2.BlobRef(
                        digest=info.digest, size_bytes=info.size_bytes, media_type="application/x-nifti+gzip"
                    ),
                )
                self.store.mark_assembled(
                    sv.series_id,
                    sv.version,
                    info.digest,
                    info.size_bytes,
                    geometry,
                    SEGMENT_TOPIC,
                    request.SerializeToString(),
                    current_traceparent(),
                )
                for w in volume.warnings:
                    log.warning(
                        "series assembled with warning", extra={"fields": {"series_id": sv.series_id, "warning": w}}
                    )
                log.info(
                    "series assembled",
                    extra={"fields": {"series_id": sv.series_id, "version": sv.version, "shape": geometry["shape"]}},
                )
                self.metrics.count("series_assembled")
        finally:
            otel_context.detach(token)
        self.on_assembled()

    async def run(self) -> None:
        while True:
            # Spooled bytes -> blob store once reception is idle (keeps file creation, the
            # slow part of a blob put, out of a C-STORE burst; see atlasflow.ingest.store).
            await asyncio.to_thread(self.store.drain_if_idle, 1.0)
            for sv in self.store.due_for_assembly(self.quiet_period_s):
                await asyncio.to_thread(self.assemble, sv)
            self.metrics.set_queue_depth("series_open", self.store.receiving_count())
            await asyncio.sleep(0.5)


def segmentation_handoff(store: IngestStore, stub: segmentation_pb2_grpc.SegmentationServiceStub):
    async def deliver(row: OutboxRow) -> None:
        request = segmentation_pb2.SegmentSeriesRequest.FromString(row.payload)
        await stub.SegmentSeries(request, timeout=30)
        store.mark_dispatched(request.series_id, request.series_version)

    return deliver


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, store: IngestStore, scp: StoreScp, assembler: Assembler) -> None:
        self.store = store
        self.scp = scp
        self.assembler = assembler

    async def UploadInstances(
        self, request_iterator: AsyncIterator[ingest_pb2.UploadInstancesRequest], context: grpc.aio.ServicerContext
    ) -> ingest_pb2.UploadInstancesResponse:
        receipts: list[ingest_pb2.InstanceReceipt] = []
        current_ref: str | None = None
        current_upload = ""
        buf = bytearray()
        next_offset = 0
        async for msg in request_iterator:
            if current_ref is not None and (msg.client_ref != current_ref or msg.upload_id != current_upload):
                raise InvalidArgument(
                    "INCOMPLETE_INSTANCE",
                    "an instance's chunks ended without last_chunk",
                    domain=DOMAIN,
                    metadata={"client_ref": current_ref[:200]},
                )
            if current_ref is None and msg.upload_id:
                self.store.check_upload_id(msg.upload_id)
            current_ref, current_upload = msg.client_ref, msg.upload_id
            if current_upload:
                # Resumable: each chunk is durable before the next message is read.
                if msg.chunk or msg.offset:
                    state = await asyncio.to_thread(self.store.upload_write, current_upload, msg.offset, msg.chunk)
                    next_offset = state.committed_offset
                else:
                    state = await asyncio.to_thread(self._upload_state, current_upload)
                    next_offset = state.committed_offset
                if next_offset > MAX_INSTANCE_BYTES:
                    await asyncio.to_thread(self.store.upload_discard, current_upload)
                    raise InvalidArgument(
                        "INSTANCE_TOO_LARGE",
                        "instance exceeds the size limit",
                        domain=DOMAIN,
                        metadata={"limit_bytes": str(MAX_INSTANCE_BYTES)},
                    )
                if not msg.last_chunk:
                    continue
                ref, current_ref = current_ref, None
                receipt = await asyncio.to_thread(self._finish_upload, current_upload, ref, msg.sha256.lower())
                receipts.append(receipt)
                continue
            buf += msg.chunk
            if len(buf) > MAX_INSTANCE_BYTES:
                raise InvalidArgument(
                    "INSTANCE_TOO_LARGE",
                    "instance exceeds the size limit",
                    domain=DOMAIN,
                    metadata={"limit_bytes": str(MAX_INSTANCE_BYTES)},
                )
            if not msg.last_chunk:
                continue
            data = bytes(buf)
            buf.clear()
            ref, current_ref = current_ref, None
            if hashlib.sha256(data).hexdigest() != msg.sha256.lower():
                raise InvalidArgument(
                    "CHECKSUM_MISMATCH",
                    "instance bytes do not match sha256",
                    domain=DOMAIN,
                    metadata={"client_ref": ref[:200]},
                )
            receipt = await asyncio.to_thread(self._store, data, ref)
            receipts.append(receipt)
        if current_ref is not None:
            raise InvalidArgument(
                "INCOMPLETE_INSTANCE",
                "stream ended inside an instance",
                domain=DOMAIN,
                metadata={"client_ref": current_ref[:200]},
            )
        return ingest_pb2.UploadInstancesResponse(receipts=receipts)

    def _upload_state(self, upload_id: str) -> UploadState:
        try:
            return self.store.upload_status(upload_id)
        except NotFound:
            return UploadState(upload_id, 0, False, "", {})

    def _finish_upload(self, upload_id: str, ref: str, sha256: str) -> ingest_pb2.InstanceReceipt:
        """Last chunk of a resumable upload: verify, store, record the receipt (idempotent)."""
        state = self._upload_state(upload_id)
        if state.complete:
            if sha256 != state.sha256:
                raise InvalidArgument(
                    "UPLOAD_ID_REUSED",
                    "upload_id already completed with other bytes",
                    domain=DOMAIN,
                    metadata={"upload_id": upload_id[:128]},
                )
            return ingest_pb2.InstanceReceipt(**state.receipt)
        data = self.store.upload_read(upload_id) if state.committed_offset else b""
        if hashlib.sha256(data).hexdigest() != sha256:
            self.store.upload_discard(upload_id)
            raise InvalidArgument(
                "CHECKSUM_MISMATCH",
                "instance bytes do not match sha256",
                domain=DOMAIN,
                metadata={"client_ref": ref[:200], "upload_id": upload_id[:128]},
            )
        try:
            receipt = self._store(data, ref, upload_id)
        except InvalidArgument:
            self.store.upload_discard(upload_id)
            raise
        self.store.upload_complete(
            upload_id,
            sha256,
            {
                "client_ref": receipt.client_ref,
                "series_id": receipt.series_id,
                "duplicate": receipt.duplicate,
                "conflict": receipt.conflict,
                "upload_id": upload_id,
            },
        )
        return receipt

    async def GetUploadStatus(
        self, request: ingest_pb2.GetUploadStatusRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.GetUploadStatusResponse:
        self.store.check_upload_id(request.upload_id)
        state = await asyncio.to_thread(self.store.upload_status, request.upload_id)
        msg = ingest_pb2.GetUploadStatusResponse(
            upload_id=state.upload_id, committed_offset=state.committed_offset, complete=state.complete
        )
        if state.complete:
            msg.receipt.CopyFrom(ingest_pb2.InstanceReceipt(**state.receipt))
        return msg

    def _store(self, data: bytes, ref: str, upload_id: str = "") -> ingest_pb2.InstanceReceipt:
        ds, info = parse_instance(data)  # raises InvalidArgument with ErrorInfo
        with tracer.start_as_current_span("ingest.upload_instance"):
            stored = self.store.store_instance(
                data,
                info.study_uid,
                info.series_uid,
                info.sop_instance_uid,
                current_traceparent(),
                key=lambda: content_key(ds),
            )
        if stored.conflict:
            log.warning(
                "instance conflict: same SOP Instance UID, different content; first kept",
                extra={"fields": {"series_id": stored.series_id, "source": "grpc"}},
            )
            self.scp.metrics.count("instance_conflicts")
        self.scp.metrics.count("instances_stored")
        return ingest_pb2.InstanceReceipt(
            client_ref=ref,
            series_id=stored.series_id,
            duplicate=stored.duplicate,
            conflict=stored.conflict,
            upload_id=upload_id,
        )

    async def CommitSeries(
        self, request: ingest_pb2.CommitSeriesRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.CommitSeriesResponse:
        sv = self.store.get_series(request.series_id)
        if sv.state == "RECEIVING":
            await asyncio.to_thread(self.assembler.assemble, sv)
        return ingest_pb2.CommitSeriesResponse(series=series_to_proto(self.store.get_series(request.series_id)))

    async def GetSeries(
        self, request: ingest_pb2.GetSeriesRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.GetSeriesResponse:
        return ingest_pb2.GetSeriesResponse(series=series_to_proto(self.store.get_series(request.series_id)))

    async def ListSeries(
        self, request: ingest_pb2.ListSeriesRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.ListSeriesResponse:
        items, token = self.store.list_series(request.page_size, request.page_token)
        return ingest_pb2.ListSeriesResponse(series=[series_to_proto(s) for s in items], next_page_token=token)

    async def StreamSeriesInstances(
        self, request: ingest_pb2.StreamSeriesInstancesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ingest_pb2.StreamSeriesInstancesResponse]:
        sv = await asyncio.to_thread(
            resolve_series_version, self.store, request.series_id, request.series_version, request.volume_digest
        )
        digests = await asyncio.to_thread(self.store.instance_digests, sv.series_id, sv.version)
        # A span, not the current context: the generator is suspended between messages.
        span = tracer.start_span("ingest.stream_instances")
        span.set_attribute("atlasflow.series_id", sv.series_id)
        span.set_attribute("atlasflow.series_version", sv.version)
        span.set_attribute("atlasflow.instance_count", len(digests))
        try:
            for index, digest in enumerate(digests):
                stored = await asyncio.to_thread(self.store.blobs.get, digest)  # verified
                data = await asyncio.to_thread(dicom_header_bytes, stored) if request.headers_only else stored
                sha = hashlib.sha256(data).hexdigest()
                starts = range(0, max(len(data), 1), STREAM_CHUNK_BYTES)
                for start in starts:
                    msg = ingest_pb2.StreamSeriesInstancesResponse(
                        instance_index=index, offset=start, chunk=data[start : start + STREAM_CHUNK_BYTES]
                    )
                    if index == 0 and start == 0:
                        msg.series.CopyFrom(series_to_proto(sv))
                        msg.instance_count = len(digests)
                    if start == starts[-1]:
                        msg.last_chunk = True
                        msg.sha256 = sha
                        msg.headers_only = len(data) < len(stored)
                        msg.instance.CopyFrom(
                            common_pb2.BlobRef(digest=digest, size_bytes=len(stored), media_type="application/dicom")
                        )
                    yield msg
        finally:
            span.end()
