"""Client of IngestService.UploadInstances: stream DICOM files in chunks with a checksum each."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from atlasflow.common.clients import sync_channel
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc

CHUNK_BYTES = 1 << 20


def upload_requests(paths: Sequence[Path]) -> Iterator[ingest_pb2.UploadInstancesRequest]:
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
                client_ref=ref, chunk=data[start:start + CHUNK_BYTES], last_chunk=last,
                sha256=digest if last else "")


def send_files(paths: Sequence[Path], target: str, *, commit: bool = False
               ) -> list[ingest_pb2.InstanceReceipt]:
    with sync_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        response = stub.UploadInstances(upload_requests(paths), timeout=600)
        if commit:
            for series_id in dict.fromkeys(r.series_id for r in response.receipts):
                stub.CommitSeries(ingest_pb2.CommitSeriesRequest(series_id=series_id), timeout=600)
    return list(response.receipts)


def send_directory(directory: Path, target: str, *, commit: bool = False
                   ) -> list[ingest_pb2.InstanceReceipt]:
    paths = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    return send_files(paths, target, commit=commit)


class UploadError(Exception):
    """An upload failed for good (after retries, or refused by the server)."""
