"""The gateway's gRPC side: one channel per service, calls made with the user's token, and the
one place where a gRPC status becomes an HTTP status.

No call here carries the gateway's own (service) token: every call forwards the logged-in
user's bearer token, so each service's policy (`atlasflow.common.policy`) decides what the user
may do, and each service's audit names the user.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from starlette.responses import JSONResponse

from atlasflow.common.clients import aio_channel
from atlasflow.gateway.settings import GatewaySettings
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2_grpc
from atlasflow.segmentation.v1 import segmentation_pb2_grpc

#: gRPC status -> HTTP status (AIP-193 / google.rpc.Code's HTTP mapping)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
}
_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}
#: a unary call's deadline, seconds
CALL_TIMEOUT_S = 60.0
#: one STOW-RS instance's UploadInstances deadline, seconds
UPLOAD_TIMEOUT_S = 600.0


def metadata_for(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that makes a gRPC call the user's."""
    return (("authorization", f"Bearer {token}"),)


@dataclass(frozen=True)
class HttpError:
    """An error as the HTTP client sees it: status, reason (ErrorInfo), message, metadata."""

    status: int
    reason: str
    message: str
    metadata: dict[str, str]

    def response(self) -> JSONResponse:
        body = {
            "error": {"status": self.status, "reason": self.reason, "message": self.message, "metadata": self.metadata}
        }
        headers = {"WWW-Authenticate": 'Bearer realm="atlasflow"'} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _rich_status(exc: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status in the trailers, read directly (no consistency check: the code it
    carries is the service's own even where the call's code arrived as UNKNOWN)."""
    trailers = exc.trailing_metadata() if isinstance(exc, (grpc.Call, grpc.aio.AioRpcError)) else None
    for key, value in trailers or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def http_error_of(exc: grpc.RpcError) -> HttpError:
    """The HTTP form of a failed gRPC call (the service's ErrorInfo reason and metadata kept;
    the message only for client errors, never an internal one)."""
    # grpc.aio.AioRpcError is no grpc.Call: both carry code(), details() and trailers
    call = isinstance(exc, (grpc.Call, grpc.aio.AioRpcError))
    code = exc.code() if call else grpc.StatusCode.UNKNOWN
    rich = _rich_status(exc)
    info = None
    if rich is not None:
        if code == grpc.StatusCode.UNKNOWN:
            code = _BY_VALUE.get(rich.code, code)
        for detail in rich.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
    status = HTTP_STATUS.get(code, 500)
    reason = info.reason if info is not None else code.name
    metadata = dict(info.metadata) if info is not None else {}
    details = (exc.details() or "") if call else ""
    message = (details or code.name) if status < 500 else f"upstream service error ({code.name})"
    return HttpError(status, reason, message, metadata)


def to_json(message: Any) -> dict[str, Any]:
    """A protobuf message as JSON (lowerCamelCase names, enums by name, defaults included)."""
    out: dict[str, Any] = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    return out


class Backends:
    """Stubs of the four services on channels without a token of their own."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._channels: dict[str, grpc.aio.Channel] = {}

    def open(self) -> None:
        """Build the channels: on the server's event loop (an asyncio channel belongs to one)."""
        settings = self.settings
        size = settings.max_message_bytes
        self._channels = {
            name: aio_channel(target, size, tls=settings.client_tls())
            for name, target in (
                ("ingest", settings.ingest_target),
                ("segmentation", settings.segmentation_target),
                ("ranking", settings.ranking_target),
                ("labels", settings.labels_target),
            )
        }
        self.ingest = ingest_pb2_grpc.IngestServiceStub(self._channels["ingest"])
        self.segmentation = segmentation_pb2_grpc.SegmentationServiceStub(self._channels["segmentation"])
        self.ranking = ranking_pb2_grpc.RankingServiceStub(self._channels["ranking"])
        self.labels = labels_pb2_grpc.LabelServiceStub(self._channels["labels"])

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()

    async def unary(self, method: Any, request: Any, token: str) -> Any:
        """One unary call as the user (``method``: a stub's bound method)."""
        return await method(request, metadata=metadata_for(token), timeout=CALL_TIMEOUT_S)

    def stream_instances(self, token: str, series_id: str, *, headers_only: bool) -> Any:
        """StreamSeriesInstances of the latest version of ``series_id``, as the user: the call
        (an async iterator of StreamSeriesInstancesResponse; ``cancel()`` stops it early)."""
        return self.ingest.StreamSeriesInstances(
            ingest_pb2.StreamSeriesInstancesRequest(series_id=series_id, headers_only=headers_only),
            metadata=metadata_for(token),
        )

    def stream_seg(self, token: str, case_id: str, *, headers_only: bool) -> Any:
        """labels StreamLabelVersionSeg of the case's head version, as the user (an async
        iterator of StreamLabelVersionSegResponse)."""
        return self.labels.StreamLabelVersionSeg(
            labels_pb2.StreamLabelVersionSegRequest(case_id=case_id, headers_only=headers_only),
            metadata=metadata_for(token),
            timeout=UPLOAD_TIMEOUT_S,
        )

    async def upload(
        self, token: str, requests: list[ingest_pb2.UploadInstancesRequest]
    ) -> ingest_pb2.UploadInstancesResponse:
        """UploadInstances as the user (the same reception path as C-STORE)."""

        async def gen() -> AsyncIterator[ingest_pb2.UploadInstancesRequest]:
            for r in requests:
                yield r

        resp: ingest_pb2.UploadInstancesResponse = await self.ingest.UploadInstances(
            gen(), metadata=metadata_for(token), timeout=UPLOAD_TIMEOUT_S
        )
        return resp
