"""The web gateway's own audit log (no grpc): the HTTP-level events the services cannot see,
in the common audit store (`atlasflow.common.audit.AuditLog`, ``<DATA_DIR>/audit.sqlite3``, or
PostgreSQL with ``DATABASE_URL``), served to admins at ``GET /api/v1/audit``.

What the services already record: every gRPC call the gateway makes, as the user (their token,
their subject): a DICOMweb WADO retrieve is ingest's ``StreamSeriesInstances`` record, a case's
labels are labels' ``ListLabelVersions``, and so on. What only the gateway sees, and records
here (service ``gateway``):

- logins (action ``auth``, method ``POST /login`` or ``GET /login/oidc/callback``): success
  with the user's subject and roles; failure with the reason (``LOGIN_FAILED``,
  ``OIDC_STATE_MISMATCH``, ...) and, for a password login, the user name tried (target
  ``username``); failures go through the refusal throttle (per client address and minute);
- blob downloads (``GET /api/v1/cases/{id}/ct.nii.gz``: ``pixel-read``; ``labels.nii.gz``:
  ``label-read``; ``attention.nii.gz``: ``pixel-read``), with the case id: the gRPC call
  before it named the blob, the bytes come from the blob store, which no service sees;
  recorded before the response starts (fail closed: 503 ``AUDIT_UNAVAILABLE`` otherwise);
- requests refused 401/403 before any service call (a missing, invalid or expired token, a
  missing CSRF header; action ``auth``, through the refusal throttle: fail open);
- reads of this log (``audit-read``, fail closed).

Each record has the client address (``ipv4:<host>:<port>`` of the TCP peer: behind an ingress,
the ingress's address unless uvicorn is told to trust its X-Forwarded-For).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from atlasflow.common.audit import (
    AUDIT_READ,
    AUTH,
    FORMATS,
    LABEL_READ,
    PIXEL_READ,
    AuditLog,
    AuditQuery,
    AuditRecord,
    RefusalThrottle,
    export_lines,
)
from atlasflow.common.auth import Identity
from atlasflow.common.errors import AtlasflowError, Unavailable

log = logging.getLogger(__name__)

SERVICE = "gateway"
#: blob download path suffix -> action
BLOB_ACTIONS = {"/ct.nii.gz": PIXEL_READ, "/labels.nii.gz": LABEL_READ, "/attention.nii.gz": PIXEL_READ}
#: who may read the gateway's audit log
AUDIT_ROLES = frozenset({"admin"})
_MAX_USERNAME = 64

Endpoint = Callable[[Request], Awaitable[Response]]


def peer_of(request: Request) -> str:
    """``ipv4:<host>:<port>`` (``ipv6:[<host>]:<port>``) of the HTTP client, '' if unknown."""
    client = request.client
    if client is None:
        return ""
    host, port = client.host, client.port
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _method(request: Request) -> str:
    return f"{request.method} {request.url.path}"[:200]


def _outcome_of(exc: BaseException) -> tuple[str, str]:
    """(gRPC status name, reason) of a failed request: a gRPC error (duck-typed), a domain
    error, anything else INTERNAL."""
    if isinstance(exc, AtlasflowError):
        return exc.code, exc.reason
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            return str(getattr(code(), "name", "UNKNOWN")), ""
        except Exception:  # noqa: BLE001
            pass
    status = getattr(exc, "status", None)
    reason = str(getattr(exc, "reason", "") or "")
    if status == 401:
        return "UNAUTHENTICATED", reason
    if status == 403:
        return "PERMISSION_DENIED", reason
    if isinstance(status, int) and 400 <= status < 500:
        return "INVALID_ARGUMENT", reason
    return "INTERNAL", reason


_HTTP_OUTCOMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def _unavailable() -> Unavailable:
    return Unavailable("AUDIT_UNAVAILABLE", "the audit log cannot be written", domain="atlasflow.audit")


class GatewayAudit:
    """The gateway's audit records (see the module docstring). ``caller(request)`` is the
    gateway's session check (`atlasflow.gateway.session.Sessions.caller`): it returns an object
    with ``.identity`` or raises the 401/403 error."""

    def __init__(
        self, audit_log: AuditLog, caller: Callable[[Request], Any], throttle: RefusalThrottle | None = None
    ) -> None:
        self.log = audit_log
        self.caller = caller
        self.throttle = throttle or RefusalThrottle()

    # ------------------------------------------------------------------ writing
    def record(
        self,
        request: Request,
        action: str,
        *,
        principal: str = "",
        roles: tuple[str, ...] = (),
        outcome: str = "OK",
        reason: str = "",
        cause: str = "",
        targets: tuple[tuple[str, str], ...] = (),
        method: str = "",
    ) -> AuditRecord:
        return AuditRecord(
            service=SERVICE,
            action=action,
            method=method or _method(request),
            principal=principal,
            roles=roles,
            outcome=outcome,
            reason=reason,
            cause=cause,
            peer=peer_of(request),
            targets=targets,
        )

    async def write(self, record: AuditRecord) -> None:
        """Append ``record`` (off the event loop); raises Unavailable AUDIT_UNAVAILABLE."""
        try:
            await asyncio.to_thread(self.log.append, record)
        except Exception:  # noqa: BLE001 - any store failure is an audit outage
            raise _unavailable() from None

    async def refused(self, record: AuditRecord) -> None:
        """Record a refusal through the throttle (per client address and minute); never raises."""
        for r in self.throttle.admit(record):
            try:
                await self.write(r)
            except AtlasflowError:
                log.error("audit record of a refused request not written", extra={"fields": {"method": r.method}})

    async def close(self) -> None:
        """Write the pending aggregates, then close the log."""
        for r in self.throttle.flush():
            try:
                await self.write(r)
            except AtlasflowError:
                log.error("audit aggregate of refused requests not written", extra={"fields": {"method": r.method}})
        await asyncio.to_thread(self.log.close)

    # ------------------------------------------------------------------ what is recorded
    async def auth_refused(self, request: Request, status: int, reason: str, cause: str) -> None:
        """A request refused 401/403 before any service call (the app's AuthError handler)."""
        outcome = "UNAUTHENTICATED" if status == 401 else "PERMISSION_DENIED"
        await self.refused(self.record(request, AUTH, outcome=outcome, reason=reason, cause=cause))

    def login(self, endpoint: Endpoint, identity_of: Callable[[Response], Awaitable[Identity | None]]) -> Endpoint:
        """``endpoint`` (a login) with its outcome recorded: a 2xx answer whose identity
        ``identity_of`` finds is a success, anything else a refusal."""

        async def audited(request: Request) -> Response:
            tried = await _username(request)
            response = await endpoint(request)
            identity = await identity_of(response) if 200 <= response.status_code < 300 else None
            if identity is not None:
                # fail closed: a login that cannot be recorded does not happen
                await self.write(
                    self.record(request, AUTH, principal=identity.subject, roles=tuple(sorted(identity.roles)))
                )
                return response
            if response.status_code == 404:  # this login is not configured here: no attempt
                return response
            reason, cause = _error_of(response)
            targets = (("username", tried[:_MAX_USERNAME]),) if tried else ()
            outcome = "UNAUTHENTICATED" if response.status_code == 401 else "UNAVAILABLE"
            await self.refused(self.record(request, AUTH, outcome=outcome, reason=reason, cause=cause, targets=targets))
            return response

        return audited

    def blob(self, endpoint: Endpoint, action: str) -> Endpoint:
        """A blob download with the case id, recorded before the response starts."""

        async def audited(request: Request) -> Response:
            case_id = str(request.path_params.get("case_id", ""))[:200]
            targets = (("case_id", case_id),) if case_id else ()
            try:
                response = await endpoint(request)
            except BaseException as exc:
                if getattr(exc, "status", None) in (401, 403):
                    raise  # an AuthError: recorded by the app's handler as a refusal
                outcome, reason = _outcome_of(exc)
                who = _identity_or_none(self.caller, request)
                try:
                    await self.write(
                        self.record(
                            request,
                            action,
                            principal=who.subject if who else "",
                            roles=tuple(sorted(who.roles)) if who else (),
                            outcome=outcome,
                            reason=reason,
                            targets=targets,
                        )
                    )
                except AtlasflowError:
                    log.error("audit record of a failed download not written", extra={"fields": {"case_id": case_id}})
                raise
            who = _identity_or_none(self.caller, request)
            record = self.record(
                request,
                action,
                principal=who.subject if who else "",
                roles=tuple(sorted(who.roles)) if who else (),
                targets=targets,
            )
            if response.status_code >= 400:  # answered with an error (no such volume): nothing left
                reason, cause = _error_of(response)
                record = replace(record, outcome=_HTTP_OUTCOMES.get(response.status_code, "UNKNOWN"), reason=reason)
                try:
                    await self.write(record)
                except AtlasflowError:
                    log.error("audit record of a failed download not written", extra={"fields": {"case_id": case_id}})
                return response
            await self.write(record)  # fail closed: the bytes leave only once recorded
            return response

        return audited

    # ------------------------------------------------------------------ reading (admins)
    async def list_records(self, request: Request) -> Response:
        """``GET /api/v1/audit``: admin only. Query: ``since``/``until`` (ISO 8601),
        ``principal``, ``action``, ``outcome``, ``page_size`` (default 50, at most 1000),
        ``page_token``; ``format``: ``json`` (default: a page of records) or an export of every
        matching record, oldest first (``fhir-ndjson``, ``fhir-bundle``, ``atna-json``)."""
        caller = self.caller(request)  # 401 without a valid token (the app's handler records it)
        identity: Identity = caller.identity
        roles = tuple(sorted(identity.roles))
        if not AUDIT_ROLES & identity.roles:
            await self.refused(
                self.record(
                    request,
                    AUTH,
                    principal=identity.subject,
                    roles=roles,
                    outcome="PERMISSION_DENIED",
                    reason="ROLE_NOT_ALLOWED",
                )
            )
            return _error(403, "ROLE_NOT_ALLOWED", "reading the gateway's audit log needs the admin role")
        q = request.query_params
        fmt = q.get("format", "json")
        try:
            query = AuditQuery(
                since=_time(q.get("since", ""), "since"),
                until=_time(q.get("until", ""), "until"),
                principal=q.get("principal", ""),
                action=q.get("action", ""),
                outcome=q.get("outcome", ""),
            ).check()
            if fmt != "json" and fmt not in FORMATS:
                return _error(400, "INVALID_AUDIT_FORMAT", f"format must be json or one of {', '.join(FORMATS)}")
            page_size = int(q.get("page_size", "50") or 50)
        except ValueError:
            return _error(400, "INVALID_ARGUMENT", "page_size must be an integer")
        except AtlasflowError as exc:
            return _error(400, exc.reason, exc.message, exc.metadata)
        await self.write(self.record(request, AUDIT_READ, principal=identity.subject, roles=roles))  # fail closed
        if fmt != "json":
            media = "application/fhir+ndjson" if fmt == "fhir-ndjson" else "application/json"
            pieces: Iterator[str] = export_lines(self.log.scan(query), fmt)
            return StreamingResponse(pieces, media_type=media)
        try:
            records, token = await asyncio.to_thread(self.log.list, query, page_size, q.get("page_token", ""))
        except AtlasflowError as exc:
            return _error(400 if exc.code == "INVALID_ARGUMENT" else 503, exc.reason, exc.message, exc.metadata)
        return JSONResponse(
            {
                "records": [{**r.content(), "seq": r.seq, "prev_hash": r.prev_hash, "hash": r.hash} for r in records],
                "next_page_token": token,
            }
        )

    def routes(self) -> list[Route]:
        return [Route("/api/v1/audit", self.list_records, methods=["GET"])]


def session_identity(verifier: Any, cookie: str) -> Callable[[Response], Awaitable[Identity | None]]:
    """The identity a login answer's session cookie (``cookie``) carries, verified like every
    request's token (None without one, or when it does not verify)."""

    async def identity_of(response: Response) -> Identity | None:
        if verifier is None:
            return None
        for name, value in response.raw_headers:
            if name.lower() != b"set-cookie":
                continue
            text = value.decode("latin-1")
            if text.startswith(cookie + "="):
                token = text[len(cookie) + 1 :].split(";", 1)[0].strip().strip('"')
                try:
                    identity: Identity = await asyncio.to_thread(verifier.verify, token)
                except Exception:  # noqa: BLE001
                    return None
                return identity
        return None

    return identity_of


def _identity_or_none(caller: Callable[[Request], Any], request: Request) -> Identity | None:
    try:
        identity: Identity = caller(request).identity
    except Exception:  # noqa: BLE001 - the handler already refused or answered
        return None
    return identity


def _time(text: str, name: str) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 time") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _error(status: int, reason: str, message: str, metadata: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "reason": reason, "message": message, "metadata": metadata or {}}},
        status_code=status,
    )


def _error_of(response: Response) -> tuple[str, str]:
    """(reason, cause) of a gateway error response (``{"error": {"reason", "metadata"}}``)."""
    import json

    try:
        doc = json.loads(bytes(response.body))
        err = doc.get("error", {})
        return str(err.get("reason", ""))[:64], str(err.get("metadata", {}).get("cause", ""))[:64]
    except Exception:  # noqa: BLE001 - not JSON (a page): the status says enough
        return f"HTTP_{response.status_code}", ""


async def _username(request: Request) -> str:
    """The user name a password login tried ('' for others): read from the JSON or form body,
    which Starlette keeps for the handler."""
    if request.method != "POST":
        return ""
    try:
        if request.headers.get("content-type", "").startswith("application/json"):
            doc = await request.json()
            return str(doc.get("username", "")) if isinstance(doc, dict) else ""
        form = await request.form()
        return str(form.get("username", ""))
    except Exception:  # noqa: BLE001 - the handler reports a bad body
        return ""
