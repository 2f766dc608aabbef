"""One reception path for every instance, whichever way it arrives (no grpc).

DICOM C-STORE (`atlasflow.ingest.scp`) and the gRPC upload (`atlasflow.ingest.servicer`, whole
or resumable) both call `Reception`: validate (`atlasflow.ingest.dicom.parse_instance`) ->
durable write (`IngestStore.store_instance`: spool record fdatasync'd, row committed) ->
acknowledge (the caller answers only after `receive` returned) -> hand to assembly (the series
version is RECEIVING; `on_stored` is told, and the assembler picks it up after the quiet period).

Errors: a rejected instance raises the `AtlasflowError` of the check that failed
(`InvalidArgument` with the reasons documented in `atlasflow.ingest.dicom`), logged as
"instance rejected" with its source and reason (never patient data) and counted in
``instances_rejected``. A write that fails for lack of resources raises `OSError`. Each caller
maps these to its own answer: C-STORE to a DICOM status (`c_store_status`, 0xA700 Out of
Resources), gRPC to a status with an ErrorInfo (the server's error interceptor).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import trace
from pydicom.dataset import Dataset

from atlasflow.common.disk import DiskFloor
from atlasflow.common.errors import Aborted, AtlasflowError, InvalidArgument
from atlasflow.common.metrics import Metrics
from atlasflow.common.telemetry import context_from_traceparent, current_traceparent
from atlasflow.ingest.dicom import InstanceInfo, parse_instance, parse_instance_file
from atlasflow.ingest.identity import content_key
from atlasflow.ingest.store import IngestStore, StoredInstance
from atlasflow.ingest.uploads import MEMORY_MAX_BYTES, StreamedInstance, UploadStore, public_upload_id, sha256_of_file

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

DOMAIN = "atlasflow.ingest"


@dataclass(frozen=True)
class Source:
    """How an instance arrived: ``name`` for log lines, ``span`` names the reception span;
    ``join_series_trace``: the transport brings no trace of its own (C-STORE), so the span
    continues the trace of the instance's series (the first instance's trace)."""

    name: str
    span: str
    join_series_trace: bool


C_STORE = Source("c-store", "ingest.c_store", join_series_trace=True)
GRPC = Source("grpc", "ingest.upload_instance", join_series_trace=False)


@dataclass(frozen=True)
class Receipt:
    """The acknowledgement of one uploaded instance (fields of ``ingest.v1.InstanceReceipt``)."""

    client_ref: str
    series_id: str
    duplicate: bool
    conflict: bool
    upload_id: str = ""


class Reception:
    """Validate -> durable write -> acknowledge -> hand to assembly (see module doc).

    Blocking (SQLite, fdatasync): call from a worker thread, never on an event loop.
    ``on_stored(series_id)`` is called after every durable instance."""

    def __init__(
        self,
        store: IngestStore,
        metrics: Metrics,
        on_stored: Callable[[str], None] = lambda _s: None,
        disk_floor: DiskFloor | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.on_stored = on_stored
        # below the floor an instance is refused (DISK_FULL), never acknowledged and then lost
        self.disk_floor = disk_floor

    @property
    def uploads(self) -> UploadStore:
        return self.store.uploads

    def receive(self, data: bytes, source: Source) -> StoredInstance:
        """Validate and persist one instance; durable when it returns (then acknowledge it).

        Raises the check's `AtlasflowError` for a rejected instance, ResourceExhausted
        DISK_FULL below the free-disk floor, `OSError` when it could not be written."""
        ds, info = self._validated(lambda: parse_instance(data), len(data), source)
        stored = self._persist(
            lambda tp: self.store.store_instance(
                data,
                info.study_uid,
                info.series_uid,
                info.sop_instance_uid,
                new_traceparent=tp,
                key=lambda: content_key(ds),  # only for a re-sent SOP Instance UID
            ),
            info.series_uid,
            source,
        )
        return replace(stored, study_uid=info.study_uid, series_uid=info.series_uid)

    def receive_file(self, path: Path, sha256: str, source: Source) -> StoredInstance:
        """`receive` for an instance spooled in a file whose SHA-256 (hex) is `sha256`: one of at
        most `MEMORY_MAX_BYTES` is read and takes the spool path; a larger one is validated
        from a memory map (`parse_instance_file`) and the file itself becomes the blob
        (`IngestStore.store_instance_file`: renamed, not copied), so it is never whole in
        memory. A large file is gone once stored (it is the blob); a small or rejected one stays
        (the caller's)."""
        size = path.stat().st_size
        if size <= MEMORY_MAX_BYTES:
            return self.receive(path.read_bytes(), source)
        ds, info = self._validated(lambda: parse_instance_file(path), size, source)
        return self._persist(
            lambda tp: self.store.store_instance_file(
                path,
                sha256,
                info.study_uid,
                info.series_uid,
                info.sop_instance_uid,
                new_traceparent=tp,
                key=lambda: content_key(ds),
            ),
            info.series_uid,
            source,
        )

    def _validated(
        self, parse: Callable[[], tuple[Dataset, InstanceInfo]], size: int, source: Source
    ) -> tuple[Dataset, InstanceInfo]:
        """`parse` (logged and counted when it rejects), then the free-disk floor."""
        try:
            ds, info = parse()
        except AtlasflowError as exc:
            log.warning(
                "instance rejected",
                extra={"fields": {"source": source.name, "reason": exc.reason, "size_bytes": size}},
            )
            self.metrics.count("instances_rejected")
            raise
        if self.disk_floor is not None:
            try:
                self.disk_floor.check()
            except AtlasflowError as exc:
                log.error("instance refused: disk below the free-space floor", extra={"fields": {**exc.metadata}})
                self.metrics.count("instances_refused_disk_full")
                raise
        return ds, info

    def _persist(self, write: Callable[[str], StoredInstance], series_uid: str, source: Source) -> StoredInstance:
        """`write(traceparent)` in the reception span; logs, counts, tells `on_stored`."""
        parent = self.store.series_traceparent(series_uid) if source.join_series_trace else ""
        token = otel_context.attach(context_from_traceparent(parent)) if parent else None
        try:
            with tracer.start_as_current_span(source.span) as span:
                try:
                    stored = write(current_traceparent())
                except OSError:
                    log.error("instance not stored: out of resources", extra={"fields": {"source": source.name}})
                    raise
                span.set_attribute("atlasflow.series_id", stored.series_id)
                span.set_attribute("atlasflow.duplicate", stored.duplicate)
        finally:
            if token is not None:
                otel_context.detach(token)
        if stored.conflict:
            log.warning(
                "instance conflict: same SOP Instance UID, different content; first kept",
                extra={"fields": {"series_id": stored.series_id, "source": source.name}},
            )
            self.metrics.count("instance_conflicts")
        self.metrics.count("instances_stored")
        self.on_stored(stored.series_id)
        return stored

    def receive_upload(self, data: bytes | bytearray, ref: str, sha256: str) -> Receipt:
        """A whole instance uploaded in one stream: its SHA-256 must be ``sha256`` (hex, lower
        case), else InvalidArgument CHECKSUM_MISMATCH; then `receive`. ``data`` may be the
        servicer's receive buffer (a bytearray): it is copied here, off the event loop."""
        if hashlib.sha256(data).hexdigest() != sha256:
            raise InvalidArgument(
                "CHECKSUM_MISMATCH",
                "instance bytes do not match sha256",
                domain=DOMAIN,
                metadata={"client_ref": ref[:200]},
            )
        stored = self.receive(bytes(data), GRPC)
        return Receipt(ref, stored.series_id, stored.duplicate, stored.conflict)

    def receive_streamed(self, instance: StreamedInstance, ref: str, sha256: str) -> Receipt:
        """A whole instance of an upload stream (`StreamedInstance`, in memory or spooled to a
        file): its SHA-256 must be ``sha256`` (hex, lower case), else InvalidArgument
        CHECKSUM_MISMATCH; then `receive` or `receive_file`. The instance is discarded after."""
        try:
            instance.close()
            if instance.sha256 != sha256:
                raise InvalidArgument(
                    "CHECKSUM_MISMATCH",
                    "instance bytes do not match sha256",
                    domain=DOMAIN,
                    metadata={"client_ref": ref[:200]},
                )
            if instance.path is None:
                stored = self.receive(bytes(instance.buffer or b""), GRPC)
            else:
                stored = self.receive_file(instance.path, instance.sha256, GRPC)
        finally:
            instance.discard()
        return Receipt(ref, stored.series_id, stored.duplicate, stored.conflict)

    def finish_resumable(self, upload_id: str, ref: str, sha256: str) -> Receipt:
        """Last chunk of a resumable upload: verify the committed bytes against ``sha256``,
        `receive` them, record the receipt (idempotent: a completed upload answers its receipt
        again). InvalidArgument UPLOAD_ID_REUSED when a completed upload id comes with other
        bytes; CHECKSUM_MISMATCH (and a rejected instance) discard the upload; Unavailable
        UPLOAD_ON_OTHER_REPLICA (nothing discarded) when another replica holds its bytes."""
        state = self.uploads.state(upload_id)
        if state.complete:
            if sha256 != state.sha256:
                raise InvalidArgument(
                    "UPLOAD_ID_REUSED",
                    "upload_id already completed with other bytes",
                    domain=DOMAIN,
                    metadata={"upload_id": public_upload_id(upload_id)[:128]},
                )
            return Receipt(**state.receipt)
        self.uploads.check_here(state)  # UPLOAD_ON_OTHER_REPLICA: its bytes are on another replica
        path = self.uploads.path(upload_id)
        if state.committed_offset and not path.exists():
            # the file became a blob but the process died before the upload was completed
            self.uploads.discard(upload_id)
            raise Aborted(
                "UPLOAD_RESTART",
                "the upload's bytes are gone; send it again from offset 0",
                domain=DOMAIN,
                metadata={"upload_id": public_upload_id(upload_id)[:128]},
            )
        if state.committed_offset:
            with open(path, "r+b") as f:  # bytes past the committed offset were never committed
                f.truncate(state.committed_offset)
        else:
            path.write_bytes(b"")
        if sha256_of_file(path) != sha256:
            self.uploads.discard(upload_id)
            raise InvalidArgument(
                "CHECKSUM_MISMATCH",
                "instance bytes do not match sha256",
                domain=DOMAIN,
                metadata={"client_ref": ref[:200], "upload_id": public_upload_id(upload_id)[:128]},
            )
        try:
            stored = self.receive_file(path, sha256, GRPC)
        except InvalidArgument:
            self.uploads.discard(upload_id)
            raise
        receipt = Receipt(ref, stored.series_id, stored.duplicate, stored.conflict, upload_id)
        self.uploads.complete(
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
