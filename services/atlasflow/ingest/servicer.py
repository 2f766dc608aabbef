"""The IngestService gRPC servicer: converts requests, calls the domain, converts answers.

Uploads go through `atlasflow.ingest.reception.Reception` (the same path as C-STORE); blocking
work (SQLite, file I/O, hashing) runs in a thread, never on the event loop. An instance is never
buffered whole in memory past `atlasflow.ingest.uploads.MEMORY_MAX_BYTES`: its chunks go to a
spool file as they arrive (`atlasflow.ingest.uploads.StreamedInstance`), and one that would
exceed the size limit is refused (INSTANCE_TOO_LARGE) before its chunk is taken. The chunk framing of
UploadInstances (which message ends an instance, resumable offsets) is transport and lives here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import timestamp_pb2
from opentelemetry import trace

from atlasflow.common.errors import InvalidArgument, NotFound, Unavailable
from atlasflow.common.ids import check_id
from atlasflow.common.server import principal_of
from atlasflow.common.v1 import common_pb2
from atlasflow.ingest.deletion import Deletion, Deletions
from atlasflow.ingest.headers import dicom_header_bytes
from atlasflow.ingest.identity import atlas_id
from atlasflow.ingest.reception import Receipt, Reception
from atlasflow.ingest.store import IngestStore, SeriesVersion, resolve_series_version
from atlasflow.ingest.uploads import StreamedInstance, too_large
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.ingest.worker import Assembler

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

DOMAIN = "atlasflow.ingest"
#: default per-instance size limit (setting ``max_instance_mb``)
MAX_INSTANCE_BYTES = 2 * 1024 * 1024 * 1024
STREAM_CHUNK_BYTES = 1024 * 1024
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


def upload_key(principal: str, upload_id: str) -> str:
    """The stored key of a caller's resumable upload: upload ids are per caller (the token's
    subject), so one connector can neither read the status of another's upload nor append to
    it, and two connectors choosing the same id (e.g. a content hash) do not collide. The
    client only ever sees its own ``upload_id``."""
    return f"{hashlib.sha256(principal.encode()).hexdigest()[:16]}.{upload_id}"


def receipt_to_proto(receipt: Receipt) -> ingest_pb2.InstanceReceipt:
    return ingest_pb2.InstanceReceipt(
        client_ref=receipt.client_ref,
        series_id=receipt.series_id,
        duplicate=receipt.duplicate,
        conflict=receipt.conflict,
        upload_id=receipt.upload_id,
    )


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    #: DeleteStudy / GetDeletion (`atlasflow.ingest.deletion`), set by `atlasflow.ingest.app`;
    #: `wake_outbox` hurries the hand-offs a new deletion queued
    deletions: Deletions | None = None
    wake_outbox: Callable[[], None] = staticmethod(lambda: None)

    def __init__(
        self,
        store: IngestStore,
        reception: Reception,
        assembler: Assembler,
        *,
        max_instance_bytes: int = MAX_INSTANCE_BYTES,
    ) -> None:
        self.store = store
        self.reception = reception
        self.uploads = reception.uploads
        self.assembler = assembler
        self.max_instance_bytes = max_instance_bytes

    async def UploadInstances(
        self, request_iterator: AsyncIterator[ingest_pb2.UploadInstancesRequest], context: grpc.aio.ServicerContext
    ) -> ingest_pb2.UploadInstancesResponse:
        receipts: list[ingest_pb2.InstanceReceipt] = []
        current_ref: str | None = None
        current_upload = ""
        # a whole instance: in memory while small, else spooled to a file as it arrives
        streamed: StreamedInstance | None = None
        owner = principal_of(context)
        floor = self.reception.disk_floor
        try:
            async for msg in request_iterator:
                if current_ref is not None and (msg.client_ref != current_ref or msg.upload_id != current_upload):
                    raise InvalidArgument(
                        "INCOMPLETE_INSTANCE",
                        "an instance's chunks ended without last_chunk",
                        domain=DOMAIN,
                        metadata={"client_ref": current_ref[:200]},
                    )
                if current_ref is None and msg.upload_id:
                    self.uploads.check_upload_id(msg.upload_id)
                current_ref, current_upload = msg.client_ref, msg.upload_id
                if current_upload:
                    key = upload_key(owner, current_upload)
                    # Resumable: each chunk is durable before the next message is read; one
                    # past the size limit is refused before it is written.
                    if msg.chunk or msg.offset:
                        try:
                            await asyncio.to_thread(
                                self.uploads.write,
                                key,
                                msg.offset,
                                msg.chunk,
                                max_bytes=self.max_instance_bytes,
                                floor=floor,
                            )
                        except InvalidArgument as exc:
                            if exc.reason == "INSTANCE_TOO_LARGE":
                                await asyncio.to_thread(self.uploads.discard, key)
                                raise too_large(self.max_instance_bytes) from None
                            raise
                    if not msg.last_chunk:
                        continue
                    ref, current_ref = current_ref, None
                    receipt = await asyncio.to_thread(self.reception.finish_resumable, key, ref, msg.sha256.lower())
                    receipts.append(receipt_to_proto(dataclasses.replace(receipt, upload_id=current_upload)))
                    continue
                if streamed is None:
                    streamed = self.uploads.stream(self.max_instance_bytes, floor)
                # INSTANCE_TOO_LARGE before the chunk is taken: the stream ends, nothing more is read
                await asyncio.to_thread(streamed.append, msg.chunk)
                if not msg.last_chunk:
                    continue
                done, streamed = streamed, None
                ref, current_ref = current_ref, None
                receipt = await asyncio.to_thread(self.reception.receive_streamed, done, ref, msg.sha256.lower())
                receipts.append(receipt_to_proto(receipt))
        finally:
            if streamed is not None:  # refused, cancelled or cut mid-instance: its spool file goes
                await asyncio.to_thread(streamed.discard)
        if current_ref is not None:
            raise InvalidArgument(
                "INCOMPLETE_INSTANCE",
                "stream ended inside an instance",
                domain=DOMAIN,
                metadata={"client_ref": current_ref[:200]},
            )
        return ingest_pb2.UploadInstancesResponse(receipts=receipts)

    async def GetUploadStatus(
        self, request: ingest_pb2.GetUploadStatusRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.GetUploadStatusResponse:
        self.uploads.check_upload_id(request.upload_id)
        try:
            state = await asyncio.to_thread(self.uploads.status, upload_key(principal_of(context), request.upload_id))
        except NotFound:
            # another caller's upload of the same id is not this caller's business
            raise NotFound(
                "UPLOAD_NOT_FOUND",
                "no committed bytes for this upload_id",
                domain=DOMAIN,
                metadata={"upload_id": request.upload_id[:128]},
            ) from None
        msg = ingest_pb2.GetUploadStatusResponse(
            upload_id=request.upload_id, committed_offset=state.committed_offset, complete=state.complete
        )
        if state.complete:
            msg.receipt.CopyFrom(receipt_to_proto(Receipt(**{**state.receipt, "upload_id": request.upload_id})))
        return msg

    async def CommitSeries(
        self, request: ingest_pb2.CommitSeriesRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.CommitSeriesResponse:
        sv = await asyncio.to_thread(self.store.get_series, request.series_id)
        if sv.state == "RECEIVING":
            await asyncio.to_thread(self.assembler.assemble, sv)
            sv = await asyncio.to_thread(self.store.get_series, request.series_id)
        return ingest_pb2.CommitSeriesResponse(series=series_to_proto(sv))

    async def GetSeries(
        self, request: ingest_pb2.GetSeriesRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.GetSeriesResponse:
        sv = await asyncio.to_thread(self.store.get_series, request.series_id)
        return ingest_pb2.GetSeriesResponse(series=series_to_proto(sv))

    async def ListSeries(
        self, request: ingest_pb2.ListSeriesRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.ListSeriesResponse:
        items, token = await asyncio.to_thread(self.store.list_series, request.page_size, request.page_token)
        return ingest_pb2.ListSeriesResponse(series=[series_to_proto(s) for s in items], next_page_token=token)

    async def StreamSeriesInstances(
        self, request: ingest_pb2.StreamSeriesInstancesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ingest_pb2.StreamSeriesInstancesResponse]:
        sv = await asyncio.to_thread(
            resolve_series_version, self.store, request.series_id, request.series_version, request.volume_digest
        )
        digests = await asyncio.to_thread(self.store.instance_digests, sv.series_id, sv.version)
        if sv.state == "RECEIVING":  # acknowledged instances may still be in another replica's spool
            missing = await asyncio.to_thread(self.store.missing_blobs, digests)
            if missing:
                raise Unavailable(
                    "INSTANCES_ON_OTHER_REPLICA",
                    "instances of this series version are still in another ingest replica's spool;"
                    " retry in a few seconds",
                    domain=DOMAIN,
                    metadata={"series_id": sv.series_id[:80], "missing": str(len(missing))},
                )
        # A span, not the current context: the generator is suspended between messages.
        span = tracer.start_span("ingest.stream_instances")
        span.set_attribute("atlasflow.series_id", sv.series_id)
        span.set_attribute("atlasflow.series_version", sv.version)
        span.set_attribute("atlasflow.instance_count", len(digests))
        try:
            for index, digest in enumerate(digests):
                stored, data, sha = await asyncio.to_thread(self._instance_payload, digest, request.headers_only)
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

    def _instance_payload(self, digest: str, headers_only: bool) -> tuple[bytes, bytes, str]:
        """Blocking (run in a thread): the stored instance (verified), the bytes to stream (its
        header only when ``headers_only``) and their SHA-256 hex digest."""
        stored = self.store.blobs.get(digest)
        data = dicom_header_bytes(stored) if headers_only else stored
        return stored, data, hashlib.sha256(data).hexdigest()

    # ----------------------------------------------------------------------------- deletion

    def _deletions(self) -> Deletions:
        if self.deletions is None:
            raise Unavailable("DELETION_NOT_CONFIGURED", "study deletion is not configured", domain="atlasflow.ingest")
        return self.deletions

    async def DeleteStudy(
        self, request: ingest_pb2.DeleteStudyRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.DeleteStudyResponse:
        if bool(request.study_instance_uid) == bool(request.case_id):
            raise InvalidArgument(
                "INVALID_ARGUMENT",
                "exactly one of study_instance_uid and case_id is required",
                domain="atlasflow.ingest",
                metadata={"field": "case_id" if request.study_instance_uid else "study_instance_uid"},
            )
        if request.study_instance_uid:
            check_id("study_instance_uid", request.study_instance_uid)
            case_id = atlas_id("case", request.study_instance_uid)
        else:
            case_id = request.case_id
        deletions = self._deletions()
        deletion, created = await asyncio.to_thread(
            deletions.start, case_id, request.reason, principal_of(context) or "anonymous"
        )
        if created:
            self.wake_outbox()
        return ingest_pb2.DeleteStudyResponse(deletion=deletion_to_proto(deletion))

    async def GetDeletion(
        self, request: ingest_pb2.GetDeletionRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.GetDeletionResponse:
        if not request.deletion_id:
            raise InvalidArgument(
                "INVALID_ARGUMENT",
                "deletion_id is required",
                domain="atlasflow.ingest",
                metadata={"field": "deletion_id"},
            )
        deletion = await asyncio.to_thread(self._deletions().get, request.deletion_id)
        return ingest_pb2.GetDeletionResponse(deletion=deletion_to_proto(deletion))


_OP_STATE = {
    "QUEUED": common_pb2.OPERATION_STATE_QUEUED,
    "RUNNING": common_pb2.OPERATION_STATE_RUNNING,
    "SUCCEEDED": common_pb2.OPERATION_STATE_SUCCEEDED,
}


def deletion_to_proto(d: Deletion) -> ingest_pb2.Deletion:
    return ingest_pb2.Deletion(
        deletion_id=d.deletion_id,
        case_id=d.case_id,
        state=_OP_STATE[d.state],
        reason=d.reason,
        requested_by=d.requested_by,
        steps=[
            ingest_pb2.DeletionStep(
                service=s.service,
                state=_OP_STATE[s.state],
                counts=s.counts,
                last_error=s.last_error,
                done_time=_ts(s.done_time) if s.done_time else None,
            )
            for s in d.steps
        ],
        create_time=_ts(d.create_time),
        update_time=_ts(d.update_time),
    )
