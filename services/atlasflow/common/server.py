"""One function builds every atlasflow gRPC server (`atlasflow.common.app` runs it until SIGTERM).

`build_server` wires, in order: OpenTelemetry server spans (health checks filtered out), the
RED-metrics + error-mapping + authentication interceptor (every RPC but health and reflection
needs a bearer token that `atlasflow.common.auth.TokenVerifier` accepts, and a role that
`atlasflow.common.policy.POLICY` allows for that RPC: UNAUTHENTICATED / PERMISSION_DENIED
otherwise, before any handler runs), explicit message-size limits, the standard
grpc.health.v1 service and server reflection. Servicers stay thin: they convert messages and
call domain code; domain errors (`atlasflow.common.errors`) become a gRPC status with one
`google.rpc.ErrorInfo` detail here, once. Unexpected exceptions become INTERNAL with a generic
message: internals and stack traces never reach the client.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar, cast

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

from atlasflow.common.auth import Identity, TokenVerifier
from atlasflow.common.errors import AtlasflowError, Unauthenticated
from atlasflow.common.ids import check_message_ids
from atlasflow.common.metrics import Metrics
from atlasflow.common.policy import authorize, is_exempt
from atlasflow.common.tls import ServerTLS

log = logging.getLogger(__name__)

PRINCIPAL_METADATA_KEY = "x-atlasflow-principal"

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
"""The servicer context of any atlasflow RPC (request and response types are the servicer's business)."""
# grpc's stubs type a method handler's behaviours for the sync server; on grpc.aio they are
# coroutine functions (unary response) and async generators (streaming response).
_UnaryBehavior: TypeAlias = Callable[[Any, Context], Awaitable[Any]]
_StreamBehavior: TypeAlias = Callable[[Any, Context], AsyncIterator[Any]]


def status_for(err: AtlasflowError) -> status_pb2.Status:
    """google.rpc.Status with one ErrorInfo for a domain error."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=err.domain, metadata=err.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=getattr(code_pb2, err.code), message=err.message, details=[detail])


def error_info_of(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """Client side: the ErrorInfo detail of a failed call, if it carries one."""
    status = rpc_status.from_call(exc)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


#: The verified caller of the RPC being handled (set by the interceptor, read by `principal_of`).
_IDENTITY: ContextVar[Identity | None] = ContextVar("atlasflow_identity", default=None)


def principal_of(context: Context) -> str:
    """Who is calling: the verified token's subject. Only with authentication explicitly
    disabled (``AUTH_DISABLED``, isolated tests) the caller-set ``x-atlasflow-principal``
    metadata is used instead ('' if none)."""
    identity = _IDENTITY.get()
    if identity is not None:
        return identity.subject
    for key, value in context.invocation_metadata() or ():
        if key == PRINCIPAL_METADATA_KEY:
            return str(value)
    return ""


def author_of(context: Context) -> str:
    """Who a write is recorded as: the calling service's identity (``svc:<name>``) for a service
    token, else the token's subject (`principal_of`)."""
    identity = _IDENTITY.get()
    if identity is not None and identity.service:
        return identity.service
    return principal_of(context)


def roles_of(context: Context) -> frozenset[str]:
    """The verified caller's atlasflow roles (empty with authentication disabled): for a
    decision inside a handler beyond the policy table (an identified export) and the audit."""
    identity = _IDENTITY.get()
    return identity.roles if identity is not None else frozenset()


#: called with (method, context, the refusal, the verified identity if the token passed) for
#: every call refused UNAUTHENTICATED / PERMISSION_DENIED, or INVALID_ARGUMENT ``INVALID_ID`` for
#: its request message (a probe) (`atlasflow.common.audit_server`)
RefusalHook: TypeAlias = Callable[[str, Context, AtlasflowError, Identity | None], Awaitable[None]]


def bearer_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The bearer token in a call's ``authorization`` metadata ('' if none). More than one
    ``authorization`` entry is refused (INVALID_TOKEN): which one counts must not be a guess."""
    values = [v for k, v in metadata or () if k == "authorization"]
    if len(values) > 1:
        raise Unauthenticated(
            "INVALID_TOKEN",
            "the bearer token was not accepted",
            domain="atlasflow.auth",
            metadata={"cause": "several_authorization_headers"},
        )
    if not values:
        return ""
    text = values[0].decode() if isinstance(values[0], bytes) else str(values[0])
    scheme, _, token = text.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def rewrap_handler(
    handler: grpc.RpcMethodHandler[_Req, _Resp],
    *,
    unary: Callable[[_UnaryBehavior], _UnaryBehavior] | None = None,
    stream: Callable[[_StreamBehavior], Callable[[Any, Context], Any]] | None = None,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[_Req, _Resp]:
    """``handler`` with its behaviour wrapped, for interceptors: ``unary`` wraps unary-response
    behaviours (unary_unary, stream_unary), ``stream`` streaming-response ones (unary_stream,
    stream_stream); a kind whose wrapper is None is returned as it is. ``request_deserializer``
    replaces the handler's (a refused call's bytes are never parsed)."""
    deserializer = request_deserializer or handler.request_deserializer
    serializer = handler.response_serializer
    # The casts state what grpc.aio hands us (see _UnaryBehavior); the stubs describe the sync server.
    factories: tuple[tuple[Any, Any, Any], ...] = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler, unary),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler, unary),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler, stream),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler, stream),
    )
    for behavior, factory, wrap in factories:
        if behavior:
            if wrap is None:
                return handler
            return cast("grpc.RpcMethodHandler[_Req, _Resp]", factory(wrap(behavior), deserializer, serializer))
    return handler


def _ignore_request(_data: bytes) -> None:
    """The request deserializer of a refused call: its bytes are never parsed."""
    return None


#: the response-stream generators opened for the call being handled (`_StreamsInOneTask`
#: closes them in the call's task; None outside a response stream)
_CALL_STREAMS: ContextVar[list[AsyncIterator[Any]] | None] = ContextVar("atlasflow_call_streams", default=None)


def _close_with_call(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Register ``stream`` (an interceptor's response generator) to be closed by
    `_StreamsInOneTask` in the call's own task, even when the layer above it drops it unclosed."""
    opened = _CALL_STREAMS.get()
    if opened is not None:
        opened.append(stream)
    return stream


class _StreamsInOneTask(grpc.aio.ServerInterceptor):
    """Outermost: runs every response stream as a coroutine that writes each message
    (``context.write``) instead of handing grpc an async generator.

    grpc iterates a generator handler in its own task and, when the client cancels, cancels
    that task while it waits to send: the generators (OpenTelemetry's span, the identity of
    `_ErrorAndMetricsInterceptor`) are abandoned at a ``yield`` and later closed by the event
    loop's finalizer in another task, so their context tokens are reset in a different Context
    (a ValueError: "rpc crashed", "Failed to detach context"). Here the cancellation arrives at
    ``await context.write`` in this coroutine, which closes the generators in the same task.

    OpenTelemetry's stream wrapper does not close the generator it iterates: the generators
    below it register with `_close_with_call` and are closed here too, outermost first, while
    the call is still alive. Left to the loop's finalizer they ran after the call had ended, and
    the audit's ``context.peer()`` on the ended call segfaulted in cygrpc (the process died)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler

        def writing(behavior: _StreamBehavior) -> _UnaryBehavior:
            async def run(request_or_iterator: Any, context: Context) -> None:
                opened: list[AsyncIterator[Any]] = []
                token = _CALL_STREAMS.set(opened)
                try:
                    stream = behavior(request_or_iterator, context)
                    try:
                        async for item in stream:
                            await context.write(item)
                    finally:  # also on cancellation: close the generators in this task
                        for each in (stream, *opened):  # outermost first; closing twice is a no-op
                            aclose = getattr(each, "aclose", None)
                            if aclose is not None:
                                await aclose()
                finally:
                    _CALL_STREAMS.reset(token)

            return run

        # grpc.aio runs a coroutine handler as one that writes its responses (context.write)
        return rewrap_handler(handler, stream=writing)


class _ErrorAndMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorises every RPC (unless ``verifier`` is None: authentication
    disabled), maps domain errors to statuses and records RED metrics."""

    def __init__(self, metrics: Metrics, verifier: TokenVerifier | None, on_refusal: RefusalHook | None = None) -> None:
        self.metrics = metrics
        self.verifier = verifier
        self.on_refusal = on_refusal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc.health.v1.") or method.startswith("/grpc.reflection."):
            return handler
        short = method.rsplit("/", 1)[-1]
        metrics = self.metrics
        verifier = self.verifier
        identity: Identity | None = None
        refusal: AtlasflowError | None = None
        verified: list[Identity] = []  # the token's identity when authorisation refused it

        async def admit() -> Identity | None:
            """The caller's verified identity, checked against the policy (raises otherwise),
            from the call's metadata alone: before the request is read or parsed."""
            if verifier is None or is_exempt(method):
                return None
            token = bearer_of(handler_call_details.invocation_metadata)
            if not token:
                raise Unauthenticated(
                    "MISSING_TOKEN", "this call needs a bearer token", domain="atlasflow.auth", metadata={}
                )
            # PyJWT may fetch the issuer's JWKS (URL) or re-read it (file): off the event loop.
            identity = await asyncio.to_thread(verifier.verify, token)
            verified.append(identity)
            authorize(method, identity)
            return identity

        try:
            identity = await admit()
        except AtlasflowError as exc:
            refusal = exc
        # grpc types the deserializer by the handler's request type; a refused call's request
        # is never parsed (its behaviour raises before touching it), so None stands in for it.
        deserializer = cast(
            "Callable[[bytes], Any] | None", _ignore_request if refusal is not None else handler.request_deserializer
        )

        id_refusals: list[AtlasflowError] = []  # a request refused for a bad id: a probe

        def checked(request_or_iterator: Any) -> Any:
            """Ids are checked where they enter (`atlasflow.common.ids`): the request message,
            or each message of a request stream as the handler reads it. A request message
            refused here never reaches the handler (nor the audit interceptor): it is recorded
            like a refused token (`on_refusal`); a bad id in a stream's message ends the call
            inside the handler, whose own audit record (if audited) says so."""
            if isinstance(request_or_iterator, Message):
                try:
                    check_message_ids(request_or_iterator)
                except AtlasflowError as exc:
                    id_refusals.append(exc)
                    raise
                return request_or_iterator

            async def each() -> AsyncIterator[Any]:
                async for message in request_or_iterator:
                    check_message_ids(message)
                    yield message

            return each()

        def finish(t0: float, code: str) -> None:
            metrics.observe_rpc(short, code, time.perf_counter() - t0)

        async def handle_error(exc: BaseException, context: Context) -> None:
            if isinstance(exc, AtlasflowError):
                fields = {"rpc": short, "code": exc.code, "reason": exc.reason}
                # who knocked, and why they were turned away (a bad token or role, a bad id)
                if exc.domain == "atlasflow.auth" or any(exc is e for e in id_refusals):
                    fields |= {"peer": context.peer(), "cause": exc.metadata.get("cause", "")}
                    if self.on_refusal is not None:  # the audit log (rate-limited per peer)
                        await self.on_refusal(method, context, exc, verified[0] if verified else None)
                log.warning("rpc failed", extra={"fields": fields})
                await context.abort_with_status(rpc_status.to_status(status_for(exc)))
            internal = AtlasflowError("INTERNAL", "internal error", domain="atlasflow")
            log.error("rpc crashed", exc_info=exc, extra={"fields": {"rpc": short, "exc_type": type(exc).__name__}})
            await context.abort_with_status(rpc_status.to_status(status_for(internal)))

        def code_of(context: Context, exc: BaseException | None) -> str:
            if isinstance(exc, AtlasflowError):
                return exc.code
            c: grpc.StatusCode | int | None = context.code()  # None while no status is set yet
            if c is None:
                if exc is None:
                    return "OK"
                return "CANCELLED" if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else "INTERNAL"
            return c.name if isinstance(c, grpc.StatusCode) else str(c)

        def wrap_unary_response(behavior: _UnaryBehavior) -> _UnaryBehavior:  # unary_unary and stream_unary
            async def wrapper(request_or_iterator: Any, context: Context) -> Any:
                t0 = time.perf_counter()
                exc: BaseException | None = None
                try:
                    if refusal is not None:
                        raise refusal
                    reset = _IDENTITY.set(identity)
                    try:
                        return await behavior(checked(request_or_iterator), context)
                    finally:
                        _IDENTITY.reset(reset)
                except asyncio.CancelledError as e:  # the client cancelled (or the deadline passed)
                    exc = e
                    raise
                except (AtlasflowError, Exception) as e:  # noqa: BLE001
                    if isinstance(e, grpc.aio.AbortError):
                        raise
                    exc = e
                    await handle_error(e, context)
                finally:
                    finish(t0, code_of(context, exc))

            return wrapper

        def wrap_stream_response(behavior: _StreamBehavior) -> _StreamBehavior:  # unary_stream and stream_stream
            async def wrapper(request_or_iterator: Any, context: Context) -> AsyncIterator[Any]:
                t0 = time.perf_counter()
                exc: BaseException | None = None
                try:
                    if refusal is not None:
                        raise refusal
                    # The identity is set around each step of the handler, never across a
                    # `yield`: a stream the client cancels may be closed from another task
                    # (another Context), where a token set here cannot be reset.
                    stream = behavior(checked(request_or_iterator), context)
                    try:
                        while True:
                            reset = _IDENTITY.set(identity)
                            try:
                                item = await anext(stream)
                            except StopAsyncIteration:
                                break
                            finally:
                                _IDENTITY.reset(reset)
                            yield item
                    finally:  # close the handler's generator now, in this task
                        aclose = getattr(stream, "aclose", None)
                        if aclose is not None:
                            await aclose()
                except (asyncio.CancelledError, GeneratorExit) as e:  # the client cancelled: closed at a yield
                    exc = e
                    raise
                except Exception as e:  # noqa: BLE001
                    if isinstance(e, grpc.aio.AbortError):
                        raise
                    exc = e
                    await handle_error(e, context)
                finally:
                    finish(t0, code_of(context, exc))

            def opened(request_or_iterator: Any, context: Context) -> AsyncIterator[Any]:
                # OpenTelemetry's wrapper above never closes this generator: `_StreamsInOneTask` does
                return _close_with_call(wrapper(request_or_iterator, context))

            return opened

        return rewrap_handler(
            handler, unary=wrap_unary_response, stream=wrap_stream_response, request_deserializer=deserializer
        )


@dataclass
class BuiltServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: list[str]
    on_stop: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)
    #: the plaintext grpc.health.v1-only listener (``health_port``), if any
    health_server: grpc.aio.Server | None = None
    health_port: int = 0
    #: the listener's TLS (None: plaintext)
    tls: ServerTLS | None = None

    async def start(self) -> None:
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.set_serving(False)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.server.stop(grace)
        for cb in reversed(self.on_stop):
            res = cb()
            if inspect.isawaitable(res):
                await res


def build_server(
    *,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    metrics: Metrics,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = 64 * 1024 * 1024,
    tracer_provider: Any = None,
    verifier: TokenVerifier | None,
    max_concurrent_rpcs: int = 64,
    tls: ServerTLS | None = None,
    health_port: int = 0,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    on_refusal: RefusalHook | None = None,
) -> BuiltServer:
    """Build (not start) a grpc.aio server. `register` adds servicers and returns the full
    service names it registered (for health and reflection). Port 0 picks a free port.
    ``max_concurrent_rpcs``: calls in progress at once; one more is answered RESOURCE_EXHAUSTED
    at once (grpc's own limit, before any handler) instead of queueing without bound.
    ``verifier``: checks every call's bearer token; None disables authentication (explicitly:
    `atlasflow.common.settings.ServiceSettings.verifier` returns None only with AUTH_DISABLED).
    ``tls``: the listener's TLS (mutual when it names a client CA; files re-read when they
    change, `atlasflow.common.tls`); None listens in plaintext (logged as a warning).
    ``health_port``: also serve grpc.health.v1 alone, in plaintext, on that port (probes that
    cannot speak TLS); 0: no such listener.
    ``interceptors``: run inside authentication, after it admitted the call (the audit);
    ``on_refusal``: told of every call refused UNAUTHENTICATED / PERMISSION_DENIED, and of a
    request message refused ``INVALID_ID`` before its handler."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Idle and dead peers do not hold connections forever: a connection without calls for
        # 10 min is closed (GOAWAY); the server pings every 2 min and drops a peer that does
        # not answer in 20 s; a client may not ping more often than every 30 s (ping floods).
        ("grpc.max_connection_idle_ms", 10 * 60 * 1000),
        ("grpc.keepalive_time_ms", 2 * 60 * 1000),
        ("grpc.keepalive_timeout_ms", 20 * 1000),
        ("grpc.http2.min_ping_interval_without_data_ms", 30 * 1000),
    ]
    server = grpc.aio.server(
        interceptors=[
            _StreamsInOneTask(),  # outermost: a cancelled stream is closed in its own task
            aio_server_interceptor(tracer_provider=tracer_provider, filter_=filters.negate(filters.health_check())),
            _ErrorAndMetricsInterceptor(metrics, verifier, on_refusal),
            *interceptors,  # inside authentication: they see the verified caller (the audit)
        ],
        options=options,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    if tls is not None:
        bound = server.add_secure_port(f"{host}:{port}", tls.credentials())
    else:
        log.warning(
            "gRPC listener in plaintext: no TLS_CERT_FILE/TLS_KEY_FILE (tokens and data travel unencrypted)",
            extra={"fields": {"host": host}},
        )
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    built = BuiltServer(server, health_servicer, bound, names, tls=tls)
    if health_port:
        # health only, no interceptors: it answers SERVING/NOT_SERVING and nothing else
        health_only = grpc.aio.server(options=options, maximum_concurrent_rpcs=8)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_only)
        built.health_port = health_only.add_insecure_port(f"{host}:{health_port}")
        if built.health_port == 0:
            raise OSError(f"cannot bind the health port {host}:{health_port}")
        built.health_server = health_only
    return built
