"""The audit log on the wire (transport): the interceptor that records audited calls and
refusals, and the `AuditService` every service serves (`atlasflow.common.audit` is the store).

`AuditInterceptor` runs inside the authentication interceptor (`atlasflow.common.server`), so
it sees the verified caller; for every RPC whose `atlasflow.common.audit.AUDITED` category is
not None it records one record after the handler: the caller (subject and roles), the peer and
TLS client identity, the ids the request named (for client-streaming uploads: those seen in
the messages the handler read) and the outcome (status code, ErrorInfo reason).
Refused calls never reach it: the authentication interceptor hands them to `on_refusal`, which
records them through `atlasflow.common.audit.RefusalThrottle` (rate-limited per peer).

Writes run off the event loop (``asyncio.to_thread``). Failure policy (docs/security.md):

- fail closed for audited calls: the record is written before a unary answer is sent; when it
  cannot be written the call fails UNAVAILABLE ``AUDIT_UNAVAILABLE`` and nothing is returned.
  A streamed answer (``StreamSeriesInstances``, ``ExportAuditRecords``) first checks that the
  log can be written (no data leaves otherwise), and is recorded when it ends; a write failure
  then ends the call UNAVAILABLE ``AUDIT_UNAVAILABLE`` (the data already sent is logged at
  ERROR). A failed call whose record cannot be written keeps its own status (nothing left).
  A cancellation (the client's, mid-write) never withdraws a record being written
  (`AuditRecorder.write` finishes it, then the cancellation goes on).
- fail open for refusals: the call is refused anyway; a refusal that cannot be recorded is
  logged at ERROR (a flood must not turn an audit outage into a denial of service).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf.message import Message

from atlasflow.common.audit import (
    AUTH,
    AuditLog,
    AuditQuery,
    AuditRecord,
    RefusalThrottle,
    action_of,
    export_lines,
    targets_of,
)
from atlasflow.common.auth import Identity
from atlasflow.common.errors import AtlasflowError, InvalidArgument, Unavailable
from atlasflow.common.server import principal_of, rewrap_handler, roles_of
from atlasflow.common.v1 import audit_pb2, audit_pb2_grpc

log = logging.getLogger(__name__)

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_T = TypeVar("_T")
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
_UnaryBehavior: TypeAlias = Callable[[Any, Context], Awaitable[Any]]
_StreamBehavior: TypeAlias = Callable[[Any, Context], AsyncIterator[Any]]

SERVICE_NAME: str = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name
#: bytes per ExportAuditRecords message
EXPORT_CHUNK_BYTES = 64 * 1024


def client_identity_of(context: Context) -> str:
    """The TLS client certificate's identity (its SAN or common name), '' without mTLS."""
    try:
        ids = context.peer_identities()
    except Exception:  # noqa: BLE001 - no security context on an insecure channel
        return ""
    return ",".join(i.decode(errors="replace") if isinstance(i, bytes) else str(i) for i in ids or ())


def peer_of(context: Context) -> tuple[str, str]:
    """(peer address, TLS client identity) of a running call. Read them before the call can
    end: on a call that has ended, cygrpc's ``peer()`` dereferences a released call (segfault)."""
    return context.peer() or "", client_identity_of(context)


def outcome_of(exc: BaseException | None, context: Context) -> tuple[str, str, str]:
    """(status code name, ErrorInfo reason, cause) of a call that ended with ``exc``."""
    if exc is None:
        return "OK", "", ""
    if isinstance(exc, AtlasflowError):
        return exc.code, exc.reason, exc.metadata.get("cause", "")
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED", "", ""
    if isinstance(exc, grpc.aio.AbortError):
        code: grpc.StatusCode | int | None = context.code()
        return (code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"), "", ""
    return "INTERNAL", "", ""


async def _uncancellable(aw: Awaitable[_T]) -> _T:
    """Await ``aw`` to its end even when the awaiting task is cancelled (once or again), then
    raise the cancellation (a failure of ``aw`` meanwhile is logged: the caller is gone)."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled() and task.exception() is not None:
            log.error("audit record of a cancelled call not written", exc_info=task.exception())
        raise asyncio.CancelledError
    return task.result()


class AuditRecorder:
    """Writes one service's audit records (off the event loop) into its `AuditLog`."""

    def __init__(self, audit_log: AuditLog, service: str, throttle: RefusalThrottle | None = None) -> None:
        self.log = audit_log
        self.service = service
        self.throttle = throttle or RefusalThrottle()

    def record_of(
        self,
        action: str,
        method: str,
        context: Context,
        outcome: tuple[str, str, str],
        targets: list[tuple[str, str]],
        principal: str,
        roles: tuple[str, ...],
        peer: tuple[str, str] | None = None,
    ) -> AuditRecord:
        """``peer``: the call's (peer, TLS client identity) as read while it ran (`peer_of`);
        None reads them from ``context`` now, which the call must still be running for."""
        code, reason, cause = outcome
        address, client_identity = peer if peer is not None else peer_of(context)
        return AuditRecord(
            service=self.service,
            action=action,
            method=method,
            principal=principal,
            roles=roles,
            outcome=code,
            reason=reason,
            cause=cause,
            peer=address,
            client_identity=client_identity,
            targets=tuple(targets),
        )

    async def write(self, record: AuditRecord) -> None:
        """Append ``record``; raises Unavailable("AUDIT_UNAVAILABLE") when it cannot.

        A cancellation (the client cancels while the record of its call is being written, the
        server stops) never withdraws the write: it is shielded and awaited to its end, and the
        cancellation is raised after it. Unshielded, a write still queued for a worker thread
        (a loaded machine) was dropped with the cancellation, and the call had no record."""
        try:
            await _uncancellable(asyncio.to_thread(self.log.append, record))
        except AtlasflowError:
            raise
        except Exception:  # noqa: BLE001 - any store failure is an audit outage
            raise Unavailable(
                "AUDIT_UNAVAILABLE", "the audit log cannot be written", domain="atlasflow.audit"
            ) from None

    async def check_writable(self) -> None:
        """Raise Unavailable("AUDIT_UNAVAILABLE") unless the log answers (before streaming data)."""
        try:
            await asyncio.to_thread(self.log.list, AuditQuery(), 1)
        except Exception:  # noqa: BLE001
            raise Unavailable(
                "AUDIT_UNAVAILABLE", "the audit log cannot be written", domain="atlasflow.audit"
            ) from None

    async def refused(self, method: str, context: Context, exc: AtlasflowError, identity: Identity | None) -> None:
        """Record a refused call (rate-limited per peer); never raises."""
        record = self.record_of(
            AUTH,
            method,
            context,
            outcome_of(exc, context),
            [],
            identity.subject if identity is not None else "",
            tuple(sorted(identity.roles)) if identity is not None else (),
        )
        for r in self.throttle.admit(record):
            try:
                await self.write(r)
            except Exception:  # noqa: BLE001 - fail open for refusals (module docstring)
                log.error("audit record of a refused call not written", extra={"fields": {"rpc": method}})

    async def close(self) -> None:
        """Write the pending aggregates of refused calls, then close the log."""
        for r in self.throttle.flush():
            try:
                await self.write(r)
            except Exception:  # noqa: BLE001
                log.error("audit aggregate of refused calls not written", extra={"fields": {"rpc": r.method}})
        await asyncio.to_thread(self.log.close)


class AuditInterceptor(grpc.aio.ServerInterceptor):
    """Records every audited call after its handler (see the module docstring)."""

    def __init__(self, recorder: AuditRecorder) -> None:
        self.recorder = recorder

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        action = action_of(method)
        if handler is None or action is None:
            return handler
        recorder = self.recorder

        def noted(request_or_iterator: Any, targets: list[tuple[str, str]]) -> Any:
            if request_or_iterator is None or isinstance(request_or_iterator, Message):
                targets_of(request_or_iterator, targets)
                return request_or_iterator

            async def each() -> AsyncIterator[Any]:
                async for message in request_or_iterator:
                    targets_of(message, targets)
                    yield message

            return each()

        def caller(context: Context) -> tuple[str, tuple[str, ...], tuple[str, str]]:
            """(subject, roles, (peer, TLS client identity)), read when the handler starts: the
            identity is set around each step of a handler, not while a cancelled stream is
            closed, and the peer must not be read from a call that has ended (`peer_of`)."""
            return principal_of(context), tuple(sorted(roles_of(context) or ())), peer_of(context)

        async def record(
            context: Context,
            exc: BaseException | None,
            targets: list[tuple[str, str]],
            who: tuple[str, tuple[str, ...], tuple[str, str]],
        ) -> None:
            """Write the call's record; on a failed call a write failure is only logged."""
            rec = recorder.record_of(action, method, context, outcome_of(exc, context), targets, *who)
            if exc is None:
                await recorder.write(rec)  # fail closed: raises AUDIT_UNAVAILABLE
                return
            try:
                await recorder.write(rec)
            except Exception:  # noqa: BLE001 - the call failed anyway; keep its status
                log.error("audit record of a failed call not written", extra={"fields": {"rpc": method}})

        def wrap_unary_response(behavior: _UnaryBehavior) -> _UnaryBehavior:
            async def wrapper(request_or_iterator: Any, context: Context) -> Any:
                targets: list[tuple[str, str]] = []
                who = caller(context)
                try:
                    result = await behavior(noted(request_or_iterator, targets), context)
                except BaseException as exc:
                    await record(context, exc, targets, who)
                    raise
                await record(context, None, targets, who)
                return result

            return wrapper

        def wrap_stream_response(behavior: _StreamBehavior) -> _StreamBehavior:
            async def wrapper(request_or_iterator: Any, context: Context) -> AsyncIterator[Any]:
                targets: list[tuple[str, str]] = []
                who = caller(context)
                sent = 0
                try:
                    # no data leaves while the log is down (a call cancelled here is recorded too)
                    await recorder.check_writable()
                    stream = behavior(noted(request_or_iterator, targets), context)
                    try:
                        async for item in stream:
                            sent += 1
                            yield item
                    finally:  # the handler's generator ends now, in this task, before the record
                        aclose = getattr(stream, "aclose", None)
                        if aclose is not None:
                            await aclose()
                except BaseException as exc:  # GeneratorExit too: the client cancelled
                    await record(context, exc, targets, who)
                    raise
                try:
                    await record(context, None, targets, who)
                except AtlasflowError:
                    log.error(
                        "audit record of a streamed answer not written after it was sent",
                        extra={"fields": {"rpc": method, "messages_sent": sent}},
                    )
                    raise

            return wrapper

        return rewrap_handler(handler, unary=wrap_unary_response, stream=wrap_stream_response)


# ------------------------------------------------------------------------------- AuditService

_FORMATS = {
    audit_pb2.AUDIT_FORMAT_UNSPECIFIED: "fhir-ndjson",
    audit_pb2.AUDIT_FORMAT_FHIR_NDJSON: "fhir-ndjson",
    audit_pb2.AUDIT_FORMAT_FHIR_BUNDLE: "fhir-bundle",
    audit_pb2.AUDIT_FORMAT_ATNA_JSON: "atna-json",
}


def query_of(f: audit_pb2.AuditFilter) -> AuditQuery:
    return AuditQuery(
        since=f.start_time.ToDatetime(tzinfo=UTC) if f.HasField("start_time") else None,
        until=f.end_time.ToDatetime(tzinfo=UTC) if f.HasField("end_time") else None,
        principal=f.principal,
        action=f.action,
        outcome=f.outcome,
    ).check()


def record_to_proto(r: AuditRecord) -> audit_pb2.AuditRecord:
    msg = audit_pb2.AuditRecord(
        record_id=r.record_id,
        service=r.service,
        action=r.action,
        method=r.method,
        principal=r.principal,
        roles=list(r.roles),
        peer=r.peer,
        client_identity=r.client_identity,
        targets=[audit_pb2.AuditTarget(kind=k, value=v) for k, v in r.targets],
        outcome=r.outcome,
        reason=r.reason,
        cause=r.cause,
        suppressed=r.suppressed,
        prev_hash=r.prev_hash,
        hash=r.hash,
    )
    msg.time.FromDatetime(r.time.astimezone(UTC).replace(tzinfo=None))
    return msg


def _take(pieces: Any, limit: int) -> bytes:
    """The next up-to-``limit`` bytes of text pieces (b'' at the end); blocking."""
    out: list[bytes] = []
    size = 0
    for piece in pieces:
        data = piece.encode()
        out.append(data)
        size += len(data)
        if size >= limit:
            break
    return b"".join(out)


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """`atlasflow.common.v1.AuditService` on one service's log (admin only: the policy)."""

    def __init__(self, audit_log: AuditLog) -> None:
        self.log = audit_log

    async def ListAuditRecords(
        self, request: audit_pb2.ListAuditRecordsRequest, context: Context
    ) -> audit_pb2.ListAuditRecordsResponse:
        query = query_of(request.filter)
        records, token = await asyncio.to_thread(self.log.list, query, request.page_size, request.page_token)
        return audit_pb2.ListAuditRecordsResponse(records=[record_to_proto(r) for r in records], next_page_token=token)

    async def ExportAuditRecords(
        self, request: audit_pb2.ExportAuditRecordsRequest, context: Context
    ) -> AsyncIterator[audit_pb2.ExportAuditRecordsResponse]:
        fmt = _FORMATS.get(request.format)
        if fmt is None:
            raise InvalidArgument(
                "INVALID_AUDIT_FORMAT",
                "unknown audit export format",
                domain="atlasflow.audit",
                metadata={"format": str(int(request.format))},
            )
        pieces = export_lines(self.log.scan(query_of(request.filter)), fmt)
        while True:
            chunk = await asyncio.to_thread(_take, pieces, EXPORT_CHUNK_BYTES)
            if not chunk:
                return
            yield audit_pb2.ExportAuditRecordsResponse(data=chunk)


# -------------------------------------------------------------------------------- the wiring


def audit_location(settings: object) -> str:
    """Where a service keeps its audit log: its PostgreSQL database when it has one
    (``DATABASE_URL``, labels), else ``<DATA_DIR>/audit.sqlite3`` beside its own database."""
    url = str(getattr(settings, "database_url", "") or "")
    if url:
        return url
    return str(Path(str(getattr(settings, "data_dir", "."))) / "audit.sqlite3")


def service_of(settings: object) -> str:
    """The service a settings object belongs to: ``atlasflow.<service>.settings`` -> ``<service>``."""
    parts = type(settings).__module__.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "atlasflow" else "atlasflow"


@dataclass
class ServiceAudit:
    """A service's audit: its log's recorder, the interceptor, and the AuditService."""

    recorder: AuditRecorder
    interceptor: AuditInterceptor

    def register(
        self, register: Callable[[grpc.aio.Server], Iterable[str]]
    ) -> Callable[[grpc.aio.Server], Iterable[str]]:
        """``register`` plus the AuditService on this service's log."""
        add: Callable[[AuditServicer, grpc.aio.Server], None] = audit_pb2_grpc.add_AuditServiceServicer_to_server
        audit_log = self.recorder.log

        def both(server: grpc.aio.Server) -> list[str]:
            names = list(register(server))
            add(AuditServicer(audit_log), server)
            return [*names, SERVICE_NAME]

        return both


def service_audit(settings: object) -> ServiceAudit:
    """Open the service's audit log (`audit_location`) and build its parts."""
    recorder = AuditRecorder(AuditLog(audit_location(settings)), service_of(settings))
    return ServiceAudit(recorder, AuditInterceptor(recorder))
