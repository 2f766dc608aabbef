"""Ingest's public gRPC upload client (IngestService.UploadInstances): stream DICOM files in
chunks with a checksum each, resumably. Used by `atlasflow send`, by `ingest.retrieve`'s C-GET
path, and by tests and benchmarks; it imports only `atlasflow.common`, the generated
`atlasflow.ingest.v1` stubs and (lazily, for `derive_uids`) ingest's pure `content_key`.

Every instance is uploaded under an `upload_id` derived from its bytes (``sha256-<hex>``): the
server makes each chunk durable before reading the next. Before sending an instance the client
asks GetUploadStatus (one round trip) and starts at the committed offset; an instance already
complete is not sent again (its receipt comes from the status). After a dropped connection
(server restart, network, a cancelled call) a new stream does the same for every instance
without a receipt; a later run of the same command (another process) resumes the same way.
Identical bytes give the same upload_id, which makes a re-upload idempotent.

`assign_uids=True` rewrites files whose (0020,000D) StudyInstanceUID, (0020,000E)
SeriesInstanceUID or (0008,0018) SOPInstanceUID are empty (de-identified exports such as
TotalSegmentator's example series) with stable UIDs derived on the client (`derive_uids`).
Without it the server refuses such files with reason MISSING_UID (`UploadError.reason`).

    send_files(paths, target, commit=False) -> list[InstanceReceipt]
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from atlasflow.common.auth import TokenSource
from atlasflow.common.clients import sync_channel
from atlasflow.common.tls import ClientTLS
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc

CHUNK_BYTES = 1 << 20
#: Namespace of the UIDs `derive_uids` makes (2.25.<uuid5>, PS3.5 B.2).
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:atlasflow:assigned-uids")
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


class UploadError(Exception):
    """An upload failed for good (refused by the server, or out of retries). `reason` is the
    server's ErrorInfo reason (e.g. MISSING_UID, NOT_CT) or the gRPC status code name."""

    def __init__(self, reason: str, message: str, metadata: dict[str, str] | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})


@dataclass
class UploadStats:
    """What a `send_files` call did: streams opened, bytes sent, instances resumed at a
    non-zero committed offset, instances whose receipt came from GetUploadStatus."""

    streams: int = 0
    bytes_sent: int = 0
    resumed: int = 0
    recovered_receipts: int = 0
    errors: list[str] = field(default_factory=list)


def upload_id_of(data: bytes) -> str:
    """The default upload_id of an instance: ``sha256-<hex of its bytes>``."""
    return "sha256-" + hashlib.sha256(data).hexdigest()


def upload_requests(paths: Sequence[Path]) -> Iterator[ingest_pb2.UploadInstancesRequest]:
    """Non-resumable request stream (no upload_id): the original protocol."""
    for path in paths:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        ref = path.name
        if not data:
            yield ingest_pb2.UploadInstancesRequest(client_ref=ref, last_chunk=True, sha256=digest)
            continue
        for start in range(0, len(data), CHUNK_BYTES):
            last = start + CHUNK_BYTES >= len(data)
            yield ingest_pb2.UploadInstancesRequest(
                client_ref=ref, chunk=data[start : start + CHUNK_BYTES], last_chunk=last, sha256=digest if last else ""
            )


def resumable_requests(
    ref: str, data: bytes, upload_id: str, start: int = 0, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[ingest_pb2.UploadInstancesRequest]:
    """The messages of one instance from byte `start` (the server's committed offset). The
    last one carries `last_chunk` and the SHA-256 (an empty chunk when `start` is the end)."""
    digest = hashlib.sha256(data).hexdigest()
    pos = start
    while True:
        end = min(pos + chunk_bytes, len(data))
        last = end >= len(data)
        yield ingest_pb2.UploadInstancesRequest(
            client_ref=ref,
            chunk=data[pos:end],
            last_chunk=last,
            sha256=digest if last else "",
            upload_id=upload_id,
            offset=pos,
        )
        if last:
            return
        pos = end


# --------------------------------------------------------------------------- assigned UIDs


def _uid(*parts: object) -> str:
    return "2.25." + str(uuid.uuid5(UID_NAMESPACE, "|".join(map(str, parts))).int)


def derive_uids(data: bytes) -> bytes:
    """Fill empty Study/Series/SOP Instance UIDs with stable derived ones; other files are
    returned unchanged.

    Derivation (2.25.<uuid5>): the study from (0020,0052) FrameOfReferenceUID; the series from
    the frame of reference + geometry ((0020,0037) ImageOrientationPatient rounded to 1e-4,
    (0028,0010)/(0028,0011) Rows/Columns, (0028,0030) PixelSpacing); the SOP instance from
    those + the SHA-256 of the data set's content (`content_key`: encoding-independent). The
    same files give the same UIDs on every run and every machine; slices of one acquisition
    (one frame of reference and geometry) share a series. An empty (0008,0016) SOPClassUID is
    taken from (0002,0002) MediaStorageSOPClassUID; (0002,0003) follows the new SOP UID.
    """
    import pydicom

    from atlasflow.ingest.identity import content_key

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    if all(str(ds.get(k, "") or "").strip() for k in keys):
        return data
    frame = str(ds.get("FrameOfReferenceUID", "") or "")
    iop = [round(float(v), 4) for v in (ds.get("ImageOrientationPatient") or [])]
    spacing = [round(float(v), 6) for v in (ds.get("PixelSpacing") or [])]
    geometry = (iop, ds.get("Rows"), ds.get("Columns"), spacing)
    derived = {
        "StudyInstanceUID": _uid("study", frame or geometry),
        "SeriesInstanceUID": _uid("series", frame, geometry),
        "SOPInstanceUID": _uid("sop", frame, geometry, content_key(ds) or hashlib.sha256(data).hexdigest()),
    }
    for k in keys:
        if not str(ds.get(k, "") or "").strip():
            setattr(ds, k, derived[k])
    meta = ds.file_meta
    if not str(ds.get("SOPClassUID", "") or "") and meta.get("MediaStorageSOPClassUID"):
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# --------------------------------------------------------------------------------- client


def _error(exc: grpc.RpcError) -> UploadError:
    from atlasflow.common.server import error_info_of

    info = error_info_of(exc)
    if info is not None:
        return UploadError(info.reason, exc.details() or "", dict(info.metadata))
    return UploadError(exc.code().name, exc.details() or "")


def send_files(
    paths: Sequence[Path],
    target: str,
    *,
    commit: bool = False,
    resumable: bool = True,
    assign_uids: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    max_attempts: int = 5,
    retry_wait_s: float = 0.5,
    stats: UploadStats | None = None,
    load: Callable[[Path], bytes] | None = None,
    token: TokenSource | None = None,
    tls: ClientTLS | None = None,
) -> list[ingest_pb2.InstanceReceipt]:
    """Upload DICOM files; returns one receipt per file, in order, each instance durable.

    Resumable (default): on a retryable failure (UNAVAILABLE, CANCELLED, ABORTED e.g.
    OFFSET_MISMATCH, ...) up to `max_attempts` streams are opened, each continuing every
    unfinished instance at the server's committed offset (from offset 0, starting it over on
    the replica this channel reaches, when the committed bytes are on another ingest replica:
    UPLOAD_ON_OTHER_REPLICA). A refusal (INVALID_ARGUMENT: e.g.
    MISSING_UID, NOT_CT) raises `UploadError` at once. `commit`: CommitSeries each series
    afterwards. `load`: reads a file's bytes (default `Path.read_bytes`, after `derive_uids`
    when `assign_uids`). `token`: the caller's bearer token (role connector or admin); default
    the file named by ``ATLASFLOW_TOKEN_FILE``. `tls`: the channel's TLS; default
    ``ATLASFLOW_TLS_*`` (`atlasflow.common.tls.default_client_tls`).
    """
    stats = stats if stats is not None else UploadStats()
    read = load or (lambda p: derive_uids(p.read_bytes()) if assign_uids else p.read_bytes())
    with sync_channel(target, token=token, tls=tls) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        if not resumable:
            stats.streams += 1
            try:
                response = stub.UploadInstances(upload_requests(paths), timeout=600)
            except grpc.RpcError as exc:
                raise _error(exc) from None
            receipts = list(response.receipts)
        else:
            receipts = _send_resumable(stub, list(paths), read, chunk_bytes, max_attempts, retry_wait_s, stats)
        if commit:
            for series_id in dict.fromkeys(r.series_id for r in receipts):
                stub.CommitSeries(ingest_pb2.CommitSeriesRequest(series_id=series_id), timeout=600)
    return receipts


def _send_resumable(
    stub: ingest_pb2_grpc.IngestServiceStub,
    paths: list[Path],
    read: Callable[[Path], bytes],
    chunk_bytes: int,
    max_attempts: int,
    retry_wait_s: float,
    stats: UploadStats,
) -> list[ingest_pb2.InstanceReceipt]:
    done: dict[int, ingest_pb2.InstanceReceipt] = {}
    ids: dict[int, str] = {}
    # uploads whose committed bytes are on another ingest replica than the one this channel
    # reaches (UPLOAD_ON_OTHER_REPLICA): sent again from offset 0, which starts them over here
    elsewhere: set[str] = set()

    def committed(i: int) -> int | None:
        """The server's committed offset for instance i; None when it is complete (its
        receipt is then taken from the status)."""
        try:
            st = stub.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=ids[i]), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return 0
            raise
        if st.complete:
            done[i] = st.receipt
            stats.recovered_receipts += 1
            return None
        stats.resumed += st.committed_offset > 0
        return int(st.committed_offset)

    def stream(pending: list[int]) -> Iterator[ingest_pb2.UploadInstancesRequest]:
        for i in pending:
            data = read(paths[i])
            ids[i] = upload_id_of(data)
            start = committed(i)  # one round trip per instance: resume where the server is
            if start is None:
                continue
            if ids[i] in elsewhere:
                elsewhere.discard(ids[i])
                start = 0
            for msg in resumable_requests(paths[i].name, data, ids[i], start, chunk_bytes):
                stats.bytes_sent += len(msg.chunk)
                yield msg

    for attempt in range(max_attempts):
        pending = [i for i in range(len(paths)) if i not in done]
        if not pending:
            break
        if attempt:
            time.sleep(retry_wait_s * attempt)
        stats.streams += 1
        try:
            response = stub.UploadInstances(stream(pending), timeout=600)
        except grpc.RpcError as exc:
            err = _error(exc)
            stats.errors.append(err.reason)
            if err.reason == "UPLOAD_ON_OTHER_REPLICA":
                elsewhere.add(err.metadata.get("upload_id", ""))
            if exc.code() not in _RETRYABLE or attempt == max_attempts - 1:
                raise err from None
            continue
        by_id = {r.upload_id: r for r in response.receipts}
        for i in pending:
            if i not in done:
                done[i] = by_id[ids[i]]
    missing = [paths[i].name for i in range(len(paths)) if i not in done]
    if missing:
        raise UploadError("UNAVAILABLE", f"{len(missing)} instances not uploaded")
    return [done[i] for i in range(len(paths))]


def send_directory(
    directory: Path,
    target: str,
    *,
    commit: bool = False,
    assign_uids: bool = False,
    token: TokenSource | None = None,
    tls: ClientTLS | None = None,
) -> list[ingest_pb2.InstanceReceipt]:
    paths = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    return send_files(paths, target, commit=commit, assign_uids=assign_uids, token=token, tls=tls)
