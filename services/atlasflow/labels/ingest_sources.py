"""The source CT instances of a label version's CT, fetched from the ingest service.

DICOM SEG exports need the headers of the instances the CT volume was assembled from:
`IngestSourceInstances` asks the ingest service for them (IngestService.StreamSeriesInstances by
volume digest, headers only). The export worker (atlasflow.labels.worker.Exporter) calls it from
its job thread; it is a blocking gRPC client with its own channel.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pydicom

from atlasflow.common.auth import TokenSource
from atlasflow.common.clients import sync_channel
from atlasflow.common.errors import DataLoss, NotFound, Unavailable
from atlasflow.common.server import error_info_of
from atlasflow.common.tls import ClientTLS
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc

DOMAIN = "atlasflow.labels"

# The generated gRPC module carries no annotations: its stub, typed here.
_IngestStub: Callable[[grpc.Channel], Any] = ingest_pb2_grpc.IngestServiceStub


class IngestSourceInstances:
    """Callable: volume digest -> the source CT instances (headers only: everything before
    (7FE0,0010) PixelData) of the series version that assembled that volume, fetched from the
    ingest service by IngestService.StreamSeriesInstances. Each instance's bytes are checked
    against the sha256 the stream sends.

    Raises NotFound("SOURCE_SERIES_NOT_FOUND") when ingest assembled no such volume,
    Unavailable("INGEST_UNAVAILABLE") when ingest does not answer, DataLoss("INGEST_STREAM_BROKEN")
    on a malformed stream, Unavailable("INGEST_ERROR") (metadata "code", "reason") otherwise.
    """

    def __init__(
        self,
        target: str,
        max_message_bytes: int = 64 * 1024 * 1024,
        timeout_s: float = 300.0,
        token: TokenSource | None = None,
        tls: ClientTLS | None = None,
    ) -> None:
        self.target = target
        self.token = token
        self.tls = tls
        self.max_message_bytes = max_message_bytes
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None

    def _stub(self) -> Any:
        with self._lock:
            if self._channel is None:
                self._channel = sync_channel(self.target, self.max_message_bytes, token=self.token, tls=self.tls)
            return _IngestStub(self._channel)

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
