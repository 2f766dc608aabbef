"""gRPC channels between services and from clients: tracing, message limits, retries, token.

Every channel carries the OpenTelemetry client interceptor, so the W3C trace context of the
current span travels in the request metadata and the callee's server span joins the trace.
With a `TokenSource`, every call also carries ``authorization: Bearer <token>`` (unless the
call sets its own, e.g. a reviewer's token on a CLI call). With a `ClientTLS`, the channel is
TLS (mutual when it carries a client certificate; `atlasflow.common.tls`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors, client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

from atlasflow.common.auth import TokenSource, default_token_source
from atlasflow.common.tls import PLAINTEXT, ClientTLS, default_client_tls

_RETRY_POLICY = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def channel_options(max_message_bytes: int = 64 * 1024 * 1024) -> list[tuple[str, object]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _RETRY_POLICY),
    ]


def _with_token(metadata: Any, token: TokenSource) -> tuple[tuple[str, str | bytes], ...]:
    items = tuple(metadata or ())
    if any(k == "authorization" for k, _ in items):
        return items
    return (*items, *token.metadata())


class _AioToken(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call of an asyncio channel."""

    def __init__(self, token: TokenSource) -> None:
        self.token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*_with_token(details.metadata, self.token)),
            details.credentials,
            details.wait_for_ready,
        )

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(details), request_iterator)

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(details), request_iterator)


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: Any) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call of a blocking channel."""

    def __init__(self, token: TokenSource) -> None:
        self.token = token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _SyncDetails(details, _with_token(details.metadata, self.token))

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def aio_channel(
    target: str,
    max_message_bytes: int = 64 * 1024 * 1024,
    token: TokenSource | None = None,
    tls: ClientTLS = PLAINTEXT,
) -> grpc.aio.Channel:
    """Async channel for service-to-service calls (idempotent RPCs retried on UNAVAILABLE);
    ``token``: the caller's bearer token (a service's own, `ServiceSettings.token_source`);
    ``tls``: the caller's TLS (a service's own, `ServiceSettings.client_tls`; files read now)."""
    interceptors: list[Any] = list(aio_client_interceptors())
    if token:
        interceptors.append(_AioToken(token))
    options = channel_options(max_message_bytes)
    if tls.enabled:
        return grpc.aio.secure_channel(
            target, tls.credentials(), options=options + tls.options(), interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def raw_channel(target: str, tls: ClientTLS, max_message_bytes: int = 64 * 1024 * 1024) -> grpc.Channel:
    """A blocking channel with TLS (or `PLAINTEXT`) and nothing else: no token, no tracing, no
    retries (tests that set every call's metadata themselves, health checks)."""
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if tls.enabled:
        return grpc.secure_channel(target, tls.credentials(), options=opts + tls.options())
    return grpc.insecure_channel(target, options=opts)


def sync_channel(
    target: str,
    max_message_bytes: int = 64 * 1024 * 1024,
    token: TokenSource | None = None,
    tls: ClientTLS | None = None,
) -> grpc.Channel:
    """Blocking channel for the CLI, tests and the services' worker threads. ``token``: the
    caller's bearer token; None (a command-line client) takes `default_token_source`
    (``ATLASFLOW_TOKEN_FILE``); a service passes its own, `ServiceSettings.token_source`.
    ``tls``: the caller's TLS; None (a command-line client) takes `default_client_tls`
    (``ATLASFLOW_TLS_CA_FILE`` / ``_CERT_FILE`` / ``_KEY_FILE``); a service passes its own,
    `ServiceSettings.client_tls`. The files are read when the channel is built."""
    token = default_token_source() if token is None else token
    tls = default_client_tls() if tls is None else tls
    options = channel_options(max_message_bytes)
    if tls.enabled:
        channel = grpc.secure_channel(target, tls.credentials(), options=options + tls.options())
    else:
        channel = grpc.insecure_channel(target, options=options)
    if token:
        channel = grpc.intercept_channel(channel, _SyncToken(token))
    traced: grpc.Channel = intercept_channel(channel, client_interceptor())
    return traced
