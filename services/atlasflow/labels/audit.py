"""Auditing the label service's calls (no grpc): every call leaves an audit record.

`audited` runs one call's domain work and records its audit record the way the trail expects:
writes get the event passed in and record it in their own transaction (version and job ids
filled in by the repository); reads (`read_ids` given) append their record afterwards, naming
what they returned; a failure appends a record with the error's reason and re-raises.
Blocking: the servicer runs it in a thread.

This is the labels domain trail (``LabelService.ListAuditRecords``): it names the label
versions and export job each call read or wrote, written in the write's own transaction. The
service-wide audit log (`atlasflow.common.audit`: who, roles, peer, TLS identity, outcome;
refused calls; FHIR AuditEvent export) records every audited labels call as well, from the
interceptor (`atlasflow.common.audit_server`); both are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from atlasflow.common.errors import AtlasflowError, Unauthenticated
from atlasflow.labels.repository import DOMAIN, AuditEvent, LabelRepository

T = TypeVar("T")
#: the principal of calls that carry none (only with authentication disabled)
ANONYMOUS = "anonymous"


def audited(
    repo: LabelRepository,
    principal: str,
    method: str,
    case_id: str,
    work: Callable[[AuditEvent], T],
    read_ids: Callable[[T], tuple[tuple[str, ...], str]] | None = None,
) -> T:
    """Run `work(audit_event)` and record the call (see the module docstring).

    principal: the caller ("" -> `ANONYMOUS`); method: the RPC name; read_ids: for reads,
    result -> (version ids, job id) to record."""
    event = AuditEvent(principal or ANONYMOUS, method, case_id)
    try:
        result = work(event)
    except AtlasflowError as exc:
        repo.record_audit(AuditEvent(event.principal, method, case_id, outcome=exc.reason))
        raise
    if read_ids is not None:
        versions, job = read_ids(result)
        repo.record_audit(AuditEvent(event.principal, method, case_id, versions, job))
    return result


def require_principal(repo: LabelRepository, principal: str, method: str, case_id: str) -> str:
    """`principal`, or Unauthenticated("PRINCIPAL_REQUIRED") after recording the refused call
    (as `ANONYMOUS`): revisions name their reviewer, so they need the caller's identity."""
    if principal:
        return principal
    repo.record_audit(AuditEvent(ANONYMOUS, method, case_id, outcome="PRINCIPAL_REQUIRED"))
    raise Unauthenticated(
        "PRINCIPAL_REQUIRED",
        f"{method} needs the caller's identity (a bearer token)",
        domain=DOMAIN,
    )
