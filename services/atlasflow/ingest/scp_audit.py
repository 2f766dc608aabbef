"""The DICOM SCP's audit records (no grpc): one record per association in the service's common
audit log (`atlasflow.common.audit.AuditLog`, the one the gRPC API writes; docs/security.md
"Audit").

An association's record (action ``import``, method ``dicom/A-ASSOCIATE``), written when its
connection closes:

- who: ``principal`` = ``aet:<calling AE title>`` for an accepted association (the title the
  allow-list admitted; no token exists in DIMSE), '' for a rejected one (like a missing
  token: the title is the caller's claim); ``peer`` = ``ipv4:<address>:<port>``;
  ``client_identity`` = the TLS client certificate's subject (``CN=...,O=...``) on the DICOM
  TLS listener with a client CA;
- what (``targets``): ``calling_ae``, ``called_ae``, ``instances_stored`` and, when some
  were refused, ``instances_refused`` (counts, as text), then each ``study_uid``,
  ``series_uid``, ``case_id`` and ``series_id`` of the stored instances, once each (at most
  `atlasflow.common.audit.MAX_TARGETS` in all);
- outcome: ``OK`` (accepted, released or closed), ``ABORTED`` (``ASSOCIATION_ABORTED``), or a
  rejection: ``PERMISSION_DENIED`` ``CALLING_AE_NOT_ALLOWED``, ``INVALID_ARGUMENT``
  ``CALLED_AE_NOT_RECOGNISED``, ``RESOURCE_EXHAUSTED`` ``LOCAL_LIMIT_EXCEEDED`` (cause
  ``total_limit`` / ``peer_limit``), ``UNAVAILABLE`` ``AUDIT_UNAVAILABLE`` (cause
  ``audit_unavailable``: the log could not be read when the association was requested, so it
  was refused: fail closed, no instance is taken that the log could not record),
  ``PERMISSION_DENIED`` ``ASSOCIATION_REJECTED`` (another reason of pynetdicom's).

Rejected associations go through the same `atlasflow.common.audit.RefusalThrottle` as the
gRPC refusals (per peer address and minute: 20 one by one, the rest as one aggregate record,
``REFUSALS_AGGREGATED``), so a flood of association requests cannot flood the log. A TCP
connection that never sends an A-ASSOCIATE-RQ (a port scan, a failed TLS handshake) is no
association and leaves no record (it is counted in the SCP's metrics).

Writes are blocking and happen on the association's own thread (pynetdicom's), after the
association ended: nothing already acknowledged waits for them. A record that cannot be
written is logged at ERROR (the instances are durable and acknowledged by then).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from atlasflow.common.audit import IMPORT, MAX_TARGETS, AuditLog, AuditQuery, AuditRecord, RefusalThrottle

log = logging.getLogger(__name__)

METHOD = "dicom/A-ASSOCIATE"

#: rejection cause -> (outcome, reason)
REJECTIONS: dict[str, tuple[str, str]] = {
    "calling_ae": ("PERMISSION_DENIED", "CALLING_AE_NOT_ALLOWED"),
    "called_ae": ("INVALID_ARGUMENT", "CALLED_AE_NOT_RECOGNISED"),
    "total_limit": ("RESOURCE_EXHAUSTED", "LOCAL_LIMIT_EXCEEDED"),
    "peer_limit": ("RESOURCE_EXHAUSTED", "LOCAL_LIMIT_EXCEEDED"),
    "audit_unavailable": ("UNAVAILABLE", "AUDIT_UNAVAILABLE"),
    "other": ("PERMISSION_DENIED", "ASSOCIATION_REJECTED"),
}


@dataclass
class AssociationAudit:
    """What one association did, gathered by the SCP's event handlers (one thread at a time:
    pynetdicom calls an association's handlers from its own threads, in order)."""

    peer: str
    client_identity: str = ""
    calling_ae: str = ""
    called_ae: str = ""
    requested: bool = False
    accepted: bool = False
    rejected: str = ""  #: a key of `REJECTIONS`
    aborted: bool = False
    stored: int = 0
    refused: int = 0
    seen: list[tuple[str, str]] = field(default_factory=list)

    def instance_stored(self, study_uid: str, series_uid: str, case_id: str, series_id: str) -> None:
        self.stored += 1
        for target in (
            ("study_uid", study_uid),
            ("series_uid", series_uid),
            ("case_id", case_id),
            ("series_id", series_id),
        ):
            if target[1] and target not in self.seen and len(self.seen) < MAX_TARGETS - 4:
                self.seen.append(target)

    def record(self, service: str) -> AuditRecord:
        counts = [("calling_ae", self.calling_ae), ("called_ae", self.called_ae)]
        counts.append(("instances_stored", str(self.stored)))
        if self.refused:
            counts.append(("instances_refused", str(self.refused)))
        if self.rejected:
            outcome, reason = REJECTIONS[self.rejected]
            cause = self.rejected
        elif self.aborted:
            outcome, reason, cause = "ABORTED", "ASSOCIATION_ABORTED", ""
        else:
            outcome, reason, cause = "OK", "", ""
        return AuditRecord(
            service=service,
            action=IMPORT,
            method=METHOD,
            principal=f"aet:{self.calling_ae}" if self.accepted else "",
            outcome=outcome,
            reason=reason,
            cause=cause,
            peer=self.peer,
            client_identity=self.client_identity,
            targets=tuple(t for t in counts if t[1]) + tuple(self.seen),
        )


class ScpAudit:
    """Writes the SCP's association records into ``audit_log`` (thread-safe, blocking)."""

    def __init__(self, audit_log: AuditLog, service: str = "ingest", throttle: RefusalThrottle | None = None) -> None:
        self.log = audit_log
        self.service = service
        self.throttle = throttle or RefusalThrottle()
        self._lock = threading.Lock()  # the throttle is not thread-safe

    def writable(self) -> bool:
        """Whether the log answers (checked before an association is accepted: fail closed)."""
        try:
            self.log.list(AuditQuery(), 1)
        except Exception:  # noqa: BLE001 - any store failure is an audit outage
            return False
        return True

    def ended(self, association: AssociationAudit) -> None:
        """Record an association that ended (a connection without A-ASSOCIATE-RQ: nothing)."""
        if not association.requested:
            return
        record = association.record(self.service)
        if association.accepted:
            self._write([record])
            return
        with self._lock:
            records = self.throttle.admit(record)
        self._write(records)

    def close(self) -> None:
        """Write the pending aggregates of rejected associations (before the log closes)."""
        with self._lock:
            records = self.throttle.flush()
        self._write(records)

    def _write(self, records: list[AuditRecord]) -> None:
        for r in records:
            try:
                self.log.append(r)
            except Exception:  # noqa: BLE001 - the association is over; say so loudly
                log.error(
                    "audit record of a DICOM association not written",
                    extra={"fields": {"peer": r.peer, "outcome": r.outcome, "reason": r.reason}},
                )
