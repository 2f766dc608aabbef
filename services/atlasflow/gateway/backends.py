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
from grpc_status import rpc_status
from starlette.responses import JSONResponse

from atlasflow.common.clients import aio_channel
from atlasflow.common.server import error_info_of
from atlasflow.gateway.settings import GatewaySettings
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.labels.v1 import labels_pb2_grpc
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
_AUTH_REASONS = {"MISSING_TOKEN": 401, "INVALID_TOKEN": 401, "ROLE_NOT_ALLOWED": 403}
_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}
#: a unary call's deadline, seconds
CALL_TIMEOUT_S = 60.0


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


def http_error_of(exc: grpc.RpcError) -> HttpError:
    """The HTTP form of a failed gRPC call (the service's ErrorInfo reason and metadata kept;
    the message only for client errors, never an internal one)."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    rich = rpc_status.from_call(exc) if isinstance(exc, grpc.Call) else None
    if code == grpc.StatusCode.UNKNOWN and rich is not None:
        # a refused streaming call can surface as UNKNOWN while its google.rpc.Status says why
        code = _BY_VALUE.get(rich.code, code)
    status = HTTP_STATUS.get(code, 500)
    info = error_info_of(exc)
    reason = info.reason if info is not None else code.name
    if code == grpc.StatusCode.UNKNOWN and reason in _AUTH_REASONS:
        # the services' streaming RPCs report a refusal as UNKNOWN today (the ErrorInfo is right)
        status = _AUTH_REASONS[reason]
    metadata = dict(info.metadata) if info is not None else {}
    details = exc.details() if isinstance(exc, grpc.Call) else ""
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

    def stream_instances(
        self, token: str, series_id: str, *, headers_only: bool
    ) -> AsyncIterator[ingest_pb2.StreamSeriesInstancesResponse]:
        """StreamSeriesInstances of the latest version of ``series_id``, as the user."""
        call: AsyncIterator[ingest_pb2.StreamSeriesInstancesResponse] = self.ingest.StreamSeriesInstances(
            ingest_pb2.StreamSeriesInstancesRequest(series_id=series_id, headers_only=headers_only),
            metadata=metadata_for(token),
        )
        return call

    async def upload(
        self, token: str, requests: list[ingest_pb2.UploadInstancesRequest]
    ) -> ingest_pb2.UploadInstancesResponse:
        """UploadInstances as the user (the same reception path as C-STORE)."""

        async def gen() -> AsyncIterator[ingest_pb2.UploadInstancesRequest]:
            for r in requests:
                yield r

        resp: ingest_pb2.UploadInstancesResponse = await self.ingest.UploadInstances(
            gen(), metadata=metadata_for(token), timeout=600.0
        )
        return resp
