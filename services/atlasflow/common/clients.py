"""gRPC channels between services and from clients: tracing, message limits, retries.

Every channel carries the OpenTelemetry client interceptor, so the W3C trace context of the
current span travels in the request metadata and the callee's server span joins the trace.
"""

from __future__ import annotations

import json

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors, client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

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


def aio_channel(target: str, max_message_bytes: int = 64 * 1024 * 1024) -> grpc.aio.Channel:
    """Async channel for service-to-service calls (idempotent RPCs retried on UNAVAILABLE)."""
    return grpc.aio.insecure_channel(
        target,
        options=channel_options(max_message_bytes),
        interceptors=aio_client_interceptors(),
    )


def sync_channel(target: str, max_message_bytes: int = 64 * 1024 * 1024) -> grpc.Channel:
    """Blocking channel for the CLI, tests and the segmentation worker thread."""
    channel = grpc.insecure_channel(target, options=channel_options(max_message_bytes))
    traced: grpc.Channel = intercept_channel(channel, client_interceptor())
    return traced
