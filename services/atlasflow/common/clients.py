"""gRPC channels between services and from clients: tracing, message limits, retries, token.

Every channel carries the OpenTelemetry client interceptor, so the W3C trace context of the
current span travels in the request metadata and the callee's server span joins the trace.
With a `TokenSource`, every call also carries ``authorization: Bearer <token>`` (unless the
call sets its own, e.g. a reviewer's token on a CLI call). With a `ClientTLS`, the channel is
TLS (mutual when it carries a client certificate; `atlasflow.common.tls`).

A TLS channel follows its certificate files: at most every `RELOAD_CHECK_S` a call looks at
their stamps, and when they changed (a cert-manager renewal, a rotated Secret) and the new key
matches the new certificate, the next calls go to a new channel built with the new files
(`_Rotation`). The replaced channel is closed after `RETIRED_GRACE_S` (its calls finish) or
with the channel. A renewal half written keeps the previous certificate until it is complete.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors, client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

from atlasflow.common.auth import TokenSource, default_token_source
from atlasflow.common.tls import PLAINTEXT, ClientTLS, default_client_tls

log = logging.getLogger(__name__)

#: how often (seconds) a TLS channel looks at its certificate files' stamps
RELOAD_CHECK_S = 5.0
#: a channel replaced after a renewal is closed this long after (its calls finish first)
RETIRED_GRACE_S = 3600.0

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


_C = TypeVar("_C", grpc.Channel, grpc.aio.Channel)


class _Rotation(Generic[_C]):
    """The current inner channel of a TLS client whose files may change: rebuilt with the new
    files when their stamps changed and they check (`ClientTLS.checked_credentials`)."""

    def __init__(self, tls: ClientTLS, build: Callable[[grpc.ChannelCredentials], _C]) -> None:
        self.tls = tls
        self.build: Callable[[grpc.ChannelCredentials], _C] = build
        self.lock = threading.Lock()
        self.stamp = tls.stamp()
        self.channel: _C = build(tls.credentials())
        self.retired: list[_C] = []
        self.checked_at = time.monotonic()

    def current(self) -> _C:
        if time.monotonic() - self.checked_at < RELOAD_CHECK_S:
            return self.channel
        with self.lock:
            now = time.monotonic()
            if now - self.checked_at < RELOAD_CHECK_S:
                return self.channel
            self.checked_at = now
            try:
                stamp = self.tls.stamp()
                if stamp == self.stamp:
                    return self.channel
                credentials = self.tls.checked_credentials()
            except (OSError, ValueError) as exc:  # half-written renewal: keep the previous files
                log.warning("client TLS files not reloaded", extra={"fields": {"error": type(exc).__name__}})
                return self.channel
            self.retired.append(self.channel)
            self.channel, self.stamp = self.build(credentials), stamp
            log.info("client TLS certificate reloaded", extra={"fields": {"cert_file": self.tls.cert_file}})
            return self.channel


class _RotatingCallable:
    """A multicallable of a rotating channel: each call goes to the current channel's own
    multicallable (made once per inner channel)."""

    def __init__(self, current: Callable[[], Any], kind: str, method: str, kwargs: dict[str, Any]) -> None:
        self._current, self._kind, self._method, self._kwargs = current, kind, method, kwargs
        self._made: tuple[Any, Any] = (None, None)

    def _target(self) -> Any:
        channel = self._current()
        made_for, made = self._made
        if made_for is not channel:
            made = getattr(channel, self._kind)(self._method, **self._kwargs)
            self._made = (channel, made)
        return made

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._target()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # with_call, future (blocking channels)
        return getattr(self._target(), name)


class _RotatingFactories:
    """The multicallable factories of a rotating channel (both kinds): each returns a
    `_RotatingCallable` over the channel's ``_current``."""

    def _current(self) -> Any:
        raise NotImplementedError

    def _rotating(self, kind: str, method: str, *args: Any, **kwargs: Any) -> Any:
        names = ("request_serializer", "response_deserializer", "_registered_method")
        return _RotatingCallable(self._current, kind, method, {**dict(zip(names, args)), **kwargs})

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._rotating("unary_unary", method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._rotating("unary_stream", method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._rotating("stream_unary", method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._rotating("stream_stream", method, *args, **kwargs)


class _RotatingAioChannel(_RotatingFactories, grpc.aio.Channel):
    """An async channel that follows its TLS files (see the module docstring)."""

    def __init__(self, rotation: _Rotation[grpc.aio.Channel]) -> None:
        self._rotation = rotation

    def _retire_later(self) -> None:
        # close channels replaced since the last look, after the grace, on the running loop
        rotation = self._rotation
        while rotation.retired:
            old = rotation.retired.pop()

            def close(channel: grpc.aio.Channel = old) -> None:
                asyncio.ensure_future(channel.close())

            asyncio.get_running_loop().call_later(RETIRED_GRACE_S, close)

    def _current(self) -> grpc.aio.Channel:
        channel = self._rotation.current()
        if self._rotation.retired:
            self._retire_later()
        return channel

    async def __aenter__(self) -> _RotatingAioChannel:
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        for channel in (*self._rotation.retired, self._rotation.channel):
            await channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._current().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._current().wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._current().channel_ready()


class _RotatingChannel(_RotatingFactories, grpc.Channel):
    """A blocking channel that follows its TLS files (see the module docstring)."""

    def __init__(self, rotation: _Rotation[grpc.Channel]) -> None:
        self._rotation = rotation

    def _current(self) -> grpc.Channel:
        channel = self._rotation.current()
        while self._rotation.retired:
            timer = threading.Timer(RETIRED_GRACE_S, self._rotation.retired.pop().close)
            timer.daemon = True
            timer.start()
        return channel

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        self._current().subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Any) -> None:
        self._rotation.channel.unsubscribe(callback)

    def close(self) -> None:
        for channel in (*self._rotation.retired, self._rotation.channel):
            channel.close()

    def __enter__(self) -> _RotatingChannel:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self.close()


def aio_channel(
    target: str,
    max_message_bytes: int = 64 * 1024 * 1024,
    token: TokenSource | None = None,
    tls: ClientTLS = PLAINTEXT,
) -> grpc.aio.Channel:
    """Async channel for service-to-service calls (idempotent RPCs retried on UNAVAILABLE);
    ``token``: the caller's bearer token (a service's own, `ServiceSettings.token_source`);
    ``tls``: the caller's TLS (a service's own, `ServiceSettings.client_tls`; followed when its files change)."""
    interceptors: list[Any] = list(aio_client_interceptors())
    if token:
        interceptors.append(_AioToken(token))
    options = channel_options(max_message_bytes)
    if tls.enabled:
        return _RotatingAioChannel(
            _Rotation(
                tls,
                lambda credentials: grpc.aio.secure_channel(
                    target, credentials, options=options + tls.options(), interceptors=interceptors
                ),
            )
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
    `ServiceSettings.client_tls`. A TLS channel follows its files when they change."""
    token = default_token_source() if token is None else token
    tls = default_client_tls() if tls is None else tls
    options = channel_options(max_message_bytes)
    channel: grpc.Channel
    if tls.enabled:
        channel = _RotatingChannel(
            _Rotation(
                tls, lambda credentials: grpc.secure_channel(target, credentials, options=options + tls.options())
            )
        )
    else:
        channel = grpc.insecure_channel(target, options=options)
    if token:
        channel = grpc.intercept_channel(channel, _SyncToken(token))
    traced: grpc.Channel = intercept_channel(channel, client_interceptor())
    return traced
