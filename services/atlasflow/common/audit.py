"""The audit log every service keeps (no grpc): who did what to which data, when, from where,
and how it ended; append-only, hash-chained, exportable as FHIR AuditEvent or ATNA-style JSON.

What is audited is data: `AUDITED` maps every RPC (full name) to an action category
(`PHI_READ`, `PIXEL_READ`, `LABEL_READ`, `LABEL_WRITE`, `IMPORT`, `EXPORT`, `DELETE`,
`AUDIT_READ`) or to None (not audited: job polling, worklist moves, hand-offs that carry no
patient data). `tests/common/test_common_audit.py` checks that every RPC of
`atlasflow.common.policy.POLICY` has an entry, so a new RPC forces a decision. Every refused
call (UNAUTHENTICATED / PERMISSION_DENIED, and a request refused INVALID_ID before its handler:
a probe) is recorded too, as `AUTH`, whatever its RPC.

A record (`AuditRecord`): time (UTC), service, action, RPC, the caller (token subject and
roles; empty subject when the token was missing or invalid), peer address and TLS client
identity when there is one, the target ids read from the request (``*_id``, ``*_uid``,
``*_ids`` fields; `targets_of`), the outcome (gRPC status code name, ErrorInfo reason, the
refusal's cause) and, for aggregated refusals, how many were not recorded one by one.

Storage (`AuditLog`): one table ``audit_log`` in SQLite (``<data_dir>/audit.sqlite3``) or
PostgreSQL (the service's database URL), on the one database layer (`atlasflow.common.db`:
SQLAlchemy Core, Alembic schema ``audit`` in `atlasflow.common.audit_migrations` with its own
version table ``alembic_version_audit``; a log the hand-written code made is adopted with its
rows), append-only: an UPDATE or DELETE raises (SQLite:
triggers that RAISE(ABORT); PostgreSQL: a BEFORE UPDATE OR DELETE trigger, and TRUNCATE too).
Each row carries the SHA-256 of the previous row's hash and its own canonical content
(``prev_hash``, ``hash``): `AuditLog.verify_chain` finds a row edited or removed behind the
triggers' back (by someone who dropped them). Appends are serialised (SQLite: BEGIN
IMMEDIATE; PostgreSQL: a transaction-scoped advisory lock) so the chain stays linear with
several replicas on one database. Blocking: callers run it off the event loop.

Refusal floods (`RefusalThrottle`): per peer host, caller (the token's subject; '' for a
missing or invalid token) and minute, the first
`REFUSALS_PER_PEER_PER_MINUTE` refusals are recorded one by one; the rest of that minute are
counted and recorded as one aggregate record (``suppressed`` = how many) when that peer's
minute is over (at its next refusal, at the next sweep, or when the service stops). A flood
of refused calls therefore writes at most ~limit + 1 rows per peer per minute.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from google.protobuf.message import Message

from atlasflow.common.audit_migrations import LEGACY_PG_LOCK, MIGRATIONS
from atlasflow.common.db import PoolSettings, open_database
from atlasflow.common.errors import InvalidArgument, Unavailable
from atlasflow.common.sqlite import clamp_page_size, decode_page_token, encode_page_token

DOMAIN = "atlasflow.audit"

# ------------------------------------------------------------------------------ what is audited

PHI_READ = "phi-read"  #: patient data leaves (full DICOM headers)
PIXEL_READ = "pixel-read"  #: a study's image is read (the CT volume, by a person or a job)
LABEL_READ = "label-read"  #: label maps are read
LABEL_WRITE = "label-write"  #: a label version or a review verdict is written
IMPORT = "import"  #: patient data enters (an upload)
EXPORT = "export"  #: a dataset leaves the system
DELETE = "delete"  #: a study is deleted
AUDIT_READ = "audit-read"  #: the audit log itself is read
AUTH = "auth"  #: a refused call (authentication or authorisation failure)

ACTIONS = (PHI_READ, PIXEL_READ, LABEL_READ, LABEL_WRITE, IMPORT, EXPORT, DELETE, AUDIT_READ, AUTH)

_INGEST = "atlasflow.ingest.v1.IngestService"
_SEG = "atlasflow.segmentation.v1.SegmentationService"
_LABELS = "atlasflow.labels.v1.LabelService"
_RANK = "atlasflow.ranking.v1.RankingService"
_AUDIT = "atlasflow.common.v1.AuditService"
_TRAIN = "atlasflow.training.v1.TrainingService"

#: ``/<package>.<Service>/<Method>`` -> action category, or None: not audited (a decision, not
#: an omission; every RPC of the policy table must be here).
AUDITED: Mapping[str, str | None] = {
    # ingest
    f"/{_INGEST}/UploadInstances": IMPORT,
    f"/{_INGEST}/GetUploadStatus": None,
    f"/{_INGEST}/CommitSeries": None,
    f"/{_INGEST}/GetSeries": PIXEL_READ,  # answers the volume's blob: opening a case's CT
    f"/{_INGEST}/ListSeries": None,  # ids and states, no image, no patient data
    f"/{_INGEST}/StreamSeriesInstances": PHI_READ,
    f"/{_INGEST}/DeleteStudy": DELETE,
    f"/{_INGEST}/GetDeletion": None,  # the deletion's progress
    # segmentation
    f"/{_SEG}/SegmentSeries": PIXEL_READ,
    f"/{_SEG}/GetSegmentationJob": None,
    f"/{_SEG}/ListSegmentationJobs": None,
    f"/{_SEG}/WaitSegmentationJob": None,
    f"/{_SEG}/CancelSegmentationJob": None,
    f"/{_SEG}/PurgeStudy": DELETE,
    # re-inference reads the cases' CT volumes, as SegmentSeries does
    f"/{_SEG}/ReinferCases": PIXEL_READ,
    # no patient data: which model version labels next (the training run records who promoted it)
    f"/{_SEG}/ActivateEnsembleVersion": None,
    # labels
    f"/{_LABELS}/CreateLabelVersion": LABEL_WRITE,
    f"/{_LABELS}/GetLabelVersion": LABEL_READ,
    f"/{_LABELS}/ListLabelVersions": LABEL_READ,
    f"/{_LABELS}/ReviseLabels": LABEL_WRITE,
    f"/{_LABELS}/ExportDataset": EXPORT,
    f"/{_LABELS}/GetExportJob": None,
    f"/{_LABELS}/ListAuditRecords": AUDIT_READ,
    f"/{_LABELS}/PurgeStudy": DELETE,
    # the identified SEG: the study's patient module and UIDs with the labels
    f"/{_LABELS}/StreamLabelVersionSeg": PHI_READ,
    # ranking: the worklist carries ids, scores and boxes, no image and no patient data
    f"/{_RANK}/SubmitAttention": None,
    f"/{_RANK}/RecordLabelVersion": None,
    f"/{_RANK}/GetPopulationPrior": None,
    f"/{_RANK}/ListWorklist": None,
    f"/{_RANK}/GetWorklistItem": None,
    f"/{_RANK}/LeaseCase": None,
    f"/{_RANK}/LeaseNextCase": None,
    f"/{_RANK}/RenewLease": None,
    f"/{_RANK}/ReleaseLease": None,
    f"/{_RANK}/CompleteReview": LABEL_WRITE,  # the reviewer's verdict on a case's labels
    f"/{_RANK}/StartRound": None,
    f"/{_RANK}/GetRound": None,
    f"/{_RANK}/ListRounds": None,
    f"/{_RANK}/PurgeStudy": DELETE,
    # training: a run reads the CT and label map of every human-decided case (its manifest
    # names them); following and cancelling runs carries ids and metrics only
    f"/{_TRAIN}/StartTrainingRun": LABEL_READ,
    f"/{_TRAIN}/GetTrainingRun": None,
    f"/{_TRAIN}/ListTrainingRuns": None,
    f"/{_TRAIN}/CancelTrainingRun": None,
    # the audit itself (every service)
    f"/{_AUDIT}/ListAuditRecords": AUDIT_READ,
    f"/{_AUDIT}/ExportAuditRecords": AUDIT_READ,
}


def action_of(method: str) -> str | None:
    """The action category of ``method`` (None: not audited; unknown RPCs are not audited,
    they are refused to everyone by the policy and recorded as `AUTH` refusals)."""
    return AUDITED.get(method)


#: request fields that name no data (idempotency keys, paging)
_NOT_TARGETS = frozenset({"request_id", "page_token"})
#: at most this many target ids per record (a stream of uploads names at most this many)
MAX_TARGETS = 64


def targets_of(message: Message | None, seen: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """The ids a request names: (field name, value) of its top-level string fields ending in
    ``_id``, ``_uid`` or ``_ids`` (not ``request_id``/``page_token``), non-empty, each once,
    appended to ``seen`` (at most `MAX_TARGETS`); ``seen`` (or a new list) is returned."""
    out = [] if seen is None else seen
    if message is None:
        return out
    for fd, value in message.ListFields():
        name = fd.name
        if name in _NOT_TARGETS or not name.endswith(("_id", "_uid", "_ids")):
            continue
        values = list(value) if isinstance(value, Iterable) and not isinstance(value, str) else [value]
        for v in values:
            if isinstance(v, str) and v and (name, v) not in out and len(out) < MAX_TARGETS:
                out.append((name, v))
    return out


# ---------------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class AuditRecord:
    """One audited call. ``outcome``: the gRPC status code name ("OK", "PERMISSION_DENIED");
    ``reason``: the ErrorInfo reason of a failure; ``cause``: a refusal's cause (``expired``...);
    ``suppressed``: for an aggregate refusal record, how many refusals it stands for that were
    not recorded one by one. ``seq``, ``prev_hash`` and ``hash`` are set by the log."""

    service: str
    action: str
    method: str
    principal: str
    outcome: str
    roles: tuple[str, ...] = ()
    peer: str = ""
    client_identity: str = ""
    targets: tuple[tuple[str, str], ...] = ()
    reason: str = ""
    cause: str = ""
    suppressed: int = 0
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    seq: int = 0
    prev_hash: str = ""
    hash: str = ""

    def content(self) -> dict[str, Any]:
        """The hashed content (everything but seq and the hashes), JSON-ready."""
        return {
            "record_id": self.record_id,
            "time": _iso(self.time),
            "service": self.service,
            "action": self.action,
            "method": self.method,
            "principal": self.principal,
            "roles": list(self.roles),
            "peer": self.peer,
            "client_identity": self.client_identity,
            "targets": [list(t) for t in self.targets],
            "outcome": self.outcome,
            "reason": self.reason,
            "cause": self.cause,
            "suppressed": self.suppressed,
        }


def _iso(dt: datetime) -> str:
    """UTC ISO 8601 with microseconds and "Z": sorts as text, the same on both databases."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


GENESIS = "0" * 64


def chain_hash(prev_hash: str, record: AuditRecord) -> str:
    """SHA-256 (hex) of the previous hash and the record's canonical JSON content."""
    body = json.dumps(record.content(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev_hash + "\n" + body).encode()).hexdigest()


@dataclass(frozen=True)
class AuditQuery:
    """Filters of a listing or an export; empty/None fields do not filter."""

    since: datetime | None = None
    until: datetime | None = None
    principal: str = ""
    action: str = ""
    outcome: str = ""

    def check(self) -> AuditQuery:
        if self.action and self.action not in ACTIONS:
            raise InvalidArgument(
                "INVALID_AUDIT_ACTION",
                "action is not an audit action category",
                domain=DOMAIN,
                metadata={"action": self.action[:64], "allowed": ",".join(ACTIONS)},
            )
        return self

    def where(self) -> tuple[str, dict[str, Any]]:
        """The SQL condition (named ``:params``) and its parameters."""
        clauses: list[str] = []
        args: dict[str, Any] = {}
        if self.since is not None:
            clauses.append("time >= :since")
            args["since"] = _iso(self.since)
        if self.until is not None:
            clauses.append("time < :until")
            args["until"] = _iso(self.until)
        for col in ("principal", "action", "outcome"):
            value = getattr(self, col)
            if value:
                clauses.append(f"{col} = :{col}")
                args[col] = value
        return (" AND ".join(clauses) or "1=1"), args

    def scope(self) -> str:
        return json.dumps(
            [_iso(self.since) if self.since else "", _iso(self.until) if self.until else "", self.principal]
            + [self.action, self.outcome]
        )


# ---------------------------------------------------------------------------------- the store

_COLUMNS = (
    "record_id, time, service, action, method, principal, roles, peer, client_identity, targets, "
    "outcome, reason, cause, suppressed, prev_hash, hash"
)
_INSERT = sa.text(
    f"INSERT INTO audit_log ({_COLUMNS}) VALUES ("
    + ", ".join(f":{c.strip()}" for c in _COLUMNS.split(","))
    + ") RETURNING seq"
)
#: PostgreSQL pool of one audit log: appends are serialised anyway (one advisory lock)
AUDIT_POOL = PoolSettings(size=2, max_overflow=3)


def _row_to_record(row: Mapping[str, Any] | sa.RowMapping) -> AuditRecord:
    return AuditRecord(
        service=row["service"],
        action=row["action"],
        method=row["method"],
        principal=row["principal"],
        outcome=row["outcome"],
        roles=tuple(r for r in str(row["roles"]).split(",") if r),
        peer=row["peer"],
        client_identity=row["client_identity"],
        targets=tuple((str(k), str(v)) for k, v in json.loads(row["targets"])),
        reason=row["reason"],
        cause=row["cause"],
        suppressed=int(row["suppressed"]),
        time=_parse_iso(row["time"]),
        record_id=row["record_id"],
        seq=int(row["seq"]),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


def _values(r: AuditRecord) -> dict[str, Any]:
    return {
        "record_id": r.record_id,
        "time": _iso(r.time),
        "service": r.service,
        "action": r.action,
        "method": r.method,
        "principal": r.principal,
        "roles": ",".join(r.roles),
        "peer": r.peer,
        "client_identity": r.client_identity,
        "targets": json.dumps([list(t) for t in r.targets]),
        "outcome": r.outcome,
        "reason": r.reason,
        "cause": r.cause,
        "suppressed": r.suppressed,
        "prev_hash": r.prev_hash,
        "hash": r.hash,
    }


class AuditLog:
    """The append-only audit log of one service (see the module docstring).

    ``location``: a SQLite file path, or a ``sqlite:///`` / ``postgresql://`` URL
    (`atlasflow.common.db.database_url`); the schema is migrated on open (schema ``audit``,
    `atlasflow.common.audit_migrations`). Thread-safe (one pooled connection per call);
    blocking. Raises Unavailable("AUDIT_UNAVAILABLE") when the database cannot be reached."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        try:
            self._db = open_database(location, MIGRATIONS, pool=AUDIT_POOL)
        except sa.exc.SQLAlchemyError:  # a driver error or no pooled connection in time
            raise self._unavailable() from None
        self.postgres = self._db.is_postgresql

    @staticmethod
    def _unavailable() -> Unavailable:
        return Unavailable("AUDIT_UNAVAILABLE", "the audit log cannot be written", domain=DOMAIN)

    def _read(self, sql: str, args: Mapping[str, Any]) -> list[sa.RowMapping]:
        try:
            with self._db.read() as conn:
                return list(conn.execute(sa.text(sql), dict(args)).mappings().all())
        except sa.exc.SQLAlchemyError:  # a driver error or no pooled connection in time
            raise self._unavailable() from None

    def append(self, record: AuditRecord) -> AuditRecord:
        """Store ``record`` at the end of the chain; returns it with seq and hashes. Raises
        Unavailable("AUDIT_UNAVAILABLE") when it cannot be stored."""
        try:
            with self._db.transaction() as conn:
                if self.postgres:  # the lock every version's appends take: one linear chain
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": LEGACY_PG_LOCK})
                last = conn.execute(sa.text("SELECT hash FROM audit_log ORDER BY seq DESC LIMIT 1")).scalar()
                prev = last or GENESIS
                stored = replace(record, prev_hash=prev, hash=chain_hash(prev, record))
                seq = conn.execute(_INSERT, _values(stored)).scalar_one()
                return replace(stored, seq=int(seq))
        except sa.exc.SQLAlchemyError:  # a driver error or no pooled connection in time
            raise self._unavailable() from None

    def list(self, query: AuditQuery, page_size: int = 0, page_token: str = "") -> tuple[list[AuditRecord], str]:
        """Records matching ``query``, newest first, one page (AIP-158); (records, next token)."""
        size = clamp_page_size(page_size, domain=DOMAIN)
        scope = query.check().scope()
        cursor = decode_page_token(page_token, "audit", scope=scope, domain=DOMAIN)
        where, args = query.where()
        if cursor is not None:
            where += " AND seq < :before"
            args["before"] = int(cursor.get("seq", 0))
        rows = self._read(
            f"SELECT seq, {_COLUMNS} FROM audit_log WHERE {where} ORDER BY seq DESC LIMIT :limit",
            args | {"limit": size + 1},
        )
        records = [_row_to_record(r) for r in rows[:size]]
        token = encode_page_token("audit", {"seq": records[-1].seq}, scope=scope) if len(rows) > size else ""
        return records, token

    def scan(self, query: AuditQuery, batch: int = 500) -> Iterator[AuditRecord]:
        """Every record matching ``query``, oldest first (for exports), read in batches."""
        query.check()
        after = 0
        while True:
            where, args = query.where()
            rows = self._read(
                f"SELECT seq, {_COLUMNS} FROM audit_log WHERE {where} AND seq > :after ORDER BY seq LIMIT :limit",
                args | {"after": after, "limit": batch},
            )
            for row in rows:
                yield _row_to_record(row)
            if len(rows) < batch:
                return
            after = int(rows[-1]["seq"])

    def verify_chain(self) -> int | None:
        """The seq of the first record whose hash or link does not match (an edited, inserted
        or removed row), or None when the whole chain holds."""
        prev = GENESIS
        for record in self.scan(AuditQuery()):
            if record.prev_hash != prev or chain_hash(prev, record) != record.hash:
                return record.seq
            prev = record.hash
        return None

    def close(self) -> None:
        self._db.close()


# ------------------------------------------------------------------------------- refusal floods

#: refused calls recorded one by one per peer host and minute; the rest are aggregated
REFUSALS_PER_PEER_PER_MINUTE = 20
#: peers tracked at once; beyond it the oldest windows are flushed early
MAX_TRACKED_PEERS = 10_000


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.7:53122`` -> ``ipv4:10.0.0.7`` (the port changes with every connection)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


@dataclass
class _Window:
    minute: int
    recorded: int = 0
    suppressed: int = 0
    last: AuditRecord | None = None


class RefusalThrottle:
    """Decides which refusal records are written (see the module docstring). Not thread-safe:
    used from the event loop only."""

    def __init__(self, limit: int = REFUSALS_PER_PEER_PER_MINUTE, max_peers: int = MAX_TRACKED_PEERS) -> None:
        self.limit = limit
        self.max_peers = max_peers
        self._windows: dict[str, _Window] = {}
        self._swept = 0

    @staticmethod
    def _aggregate(w: _Window) -> AuditRecord:
        assert w.last is not None
        return replace(
            w.last,
            record_id=uuid.uuid4().hex,
            time=datetime.now(UTC),
            reason="REFUSALS_AGGREGATED",
            targets=(),
            suppressed=w.suppressed,
        )

    def admit(self, record: AuditRecord, now: float | None = None) -> list[AuditRecord]:
        """The records to write for this refusal: itself while under the limit, plus the
        aggregates of minutes that are over (this peer's, and others' at most once a minute)."""
        minute = int((time.time() if now is None else now) // 60)
        out: list[AuditRecord] = []
        if minute != self._swept or len(self._windows) >= self.max_peers:
            self._swept = minute
            out += self.flush(before_minute=minute, keep=self.max_peers // 2)
        key = f"{peer_host(record.peer)}|{record.principal}"
        w = self._windows.get(key)
        if w is not None and w.minute != minute:
            if w.suppressed:
                out.append(self._aggregate(w))
            w = None
        if w is None:
            w = self._windows[key] = _Window(minute)
        w.last = record
        if w.recorded < self.limit:
            w.recorded += 1
            out.append(record)
        else:
            w.suppressed += 1
        return out

    def flush(self, before_minute: int | None = None, keep: int | None = None) -> list[AuditRecord]:
        """Aggregates of the windows older than ``before_minute`` (all when None), which are
        forgotten; also the oldest ones while more than ``keep`` peers are tracked."""
        out: list[AuditRecord] = []
        items = sorted(self._windows.items(), key=lambda kv: kv[1].minute)
        excess = len(items) - keep if keep is not None else 0
        for i, (key, w) in enumerate(items):
            if before_minute is None or w.minute < before_minute or i < excess:
                if w.suppressed:
                    out.append(self._aggregate(w))
                del self._windows[key]
        return out


# ----------------------------------------------------------------------------------- exports

DCM = "http://dicom.nema.org/resources/ontology/DCM"
_EVENTS: Mapping[str, tuple[str, str, str]] = {
    # action -> (DCM EventID code, display, FHIR/ATNA action code C/R/U/D/E)
    PHI_READ: ("110110", "Patient Record", "R"),
    PIXEL_READ: ("110103", "DICOM Instances Accessed", "R"),
    LABEL_READ: ("110103", "DICOM Instances Accessed", "R"),
    LABEL_WRITE: ("110103", "DICOM Instances Accessed", "C"),
    IMPORT: ("110107", "Import", "C"),
    EXPORT: ("110106", "Export", "R"),
    DELETE: ("110105", "DICOM Study Deleted", "D"),
    AUDIT_READ: ("110101", "Audit Log Used", "R"),
    AUTH: ("110114", "User Authentication", "E"),
}
#: DCM event type codes (subtype) by action, where one fits
_EVENT_TYPES: Mapping[str, tuple[str, str]] = {
    AUTH: ("110122", "Login"),
    EXPORT: ("110106", "Export"),
}
_SERVER_FAILURES = frozenset({"INTERNAL", "UNAVAILABLE", "UNKNOWN", "DATA_LOSS", "DEADLINE_EXCEEDED"})


def outcome_code(record: AuditRecord) -> str:
    """FHIR/ATNA outcome: "0" success, "4" minor failure (the request was refused or wrong),
    "8" serious failure (the server failed)."""
    if record.outcome == "OK":
        return "0"
    return "8" if record.outcome in _SERVER_FAILURES else "4"


def _outcome_text(record: AuditRecord) -> str:
    parts = [record.outcome, record.reason]
    if record.cause:
        parts.append(f"cause={record.cause}")
    if record.suppressed:
        parts.append(f"{record.suppressed} more refusals from this peer in this minute not recorded one by one")
    return " ".join(p for p in parts if p)


def _network(peer: str) -> tuple[str, str]:
    """(address, ATNA/FHIR network type: "2" IP address, "5" URI)."""
    if peer.startswith(("ipv4:", "ipv6:")):
        host = peer.split(":", 1)[1]
        host = host.rsplit(":", 1)[0] if host.count(":") >= 1 else host
        return host.strip("[]"), "2"
    return peer, "5"


def to_fhir(record: AuditRecord) -> dict[str, Any]:
    """The record as a FHIR R4 AuditEvent resource (JSON object)."""
    code, display, action = _EVENTS[record.action]
    subtype = [{"system": "urn:atlasflow:rpc", "code": record.method or "*"}]
    if record.action in _EVENT_TYPES:
        sub_code, sub_display = _EVENT_TYPES[record.action]
        subtype.insert(0, {"system": DCM, "code": sub_code, "display": sub_display})
    agent_type = ("dataprocessor", "data processor") if "service" in record.roles else ("humanuser", "human user")
    agent: dict[str, Any] = {
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                    "code": agent_type[0],
                    "display": agent_type[1],
                }
            ]
        },
        "who": {"identifier": {"system": "urn:atlasflow:subject", "value": record.principal or "unauthenticated"}},
        "requestor": True,
        "role": [{"coding": [{"system": "urn:atlasflow:role", "code": r}]} for r in record.roles],
    }
    if record.client_identity:
        agent["altId"] = record.client_identity
    if record.peer:
        address, kind = _network(record.peer)
        agent["network"] = {"address": address, "type": kind}
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": record.record_id,
        "type": {"system": DCM, "code": code, "display": display},
        "subtype": subtype,
        "action": action,
        "recorded": record.time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "outcome": outcome_code(record),
        "agent": [agent],
        "source": {
            "site": "atlasflow",
            "observer": {"display": f"atlasflow-{record.service}"},
            "type": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4",
                    "display": "Application Server",
                }
            ],
        },
        "entity": [
            {
                "what": {"identifier": {"system": f"urn:atlasflow:{kind}", "value": value}},
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "2",
                    "display": "System Object",
                },
            }
            for kind, value in record.targets
        ]
        + [
            {
                "what": {"identifier": {"system": "urn:atlasflow:audit-record", "value": record.record_id}},
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "4",
                    "display": "Other",
                },
                "detail": [
                    {"type": "prev_hash", "valueString": record.prev_hash},
                    {"type": "hash", "valueString": record.hash},
                ],
            }
        ],
    }
    if record.outcome != "OK":
        event["outcomeDesc"] = _outcome_text(record)
    return event


def to_atna(record: AuditRecord) -> dict[str, Any]:
    """The record as an IHE ATNA / DICOM PS3.15 A.5 audit message, in JSON."""
    code, display, action = _EVENTS[record.action]
    type_codes = [{"csd-code": record.method or "*", "codeSystemName": "atlasflow-rpc"}]
    if record.action in _EVENT_TYPES:
        sub_code, sub_display = _EVENT_TYPES[record.action]
        type_codes.insert(0, {"csd-code": sub_code, "codeSystemName": "DCM", "originalText": sub_display})
    participant: dict[str, Any] = {
        "UserID": record.principal or "unauthenticated",
        "UserIsRequestor": True,
        "RoleIDCode": [{"csd-code": r, "codeSystemName": "atlasflow-role"} for r in record.roles],
    }
    if record.client_identity:
        participant["AlternativeUserID"] = record.client_identity
    if record.peer:
        address, kind = _network(record.peer)
        participant |= {"NetworkAccessPointID": address, "NetworkAccessPointTypeCode": kind}
    message: dict[str, Any] = {
        "EventIdentification": {
            "EventID": {"csd-code": code, "codeSystemName": "DCM", "originalText": display},
            "EventActionCode": action,
            "EventDateTime": record.time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "EventOutcomeIndicator": outcome_code(record),
            "EventTypeCode": type_codes,
        },
        "ActiveParticipant": [participant],
        "AuditSourceIdentification": {
            "AuditSourceID": f"atlasflow-{record.service}",
            "AuditEnterpriseSiteID": "atlasflow",
        },
        "ParticipantObjectIdentification": [
            {
                "ParticipantObjectID": value,
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectIDTypeCode": {"csd-code": kind, "codeSystemName": "atlasflow-id"},
            }
            for kind, value in record.targets
        ],
        "atlasflow": {
            "record_id": record.record_id,
            "seq": record.seq,
            "prev_hash": record.prev_hash,
            "hash": record.hash,
        },
    }
    if record.outcome != "OK":
        message["EventIdentification"]["EventOutcomeDescription"] = _outcome_text(record)
    return message


FORMATS = ("fhir-ndjson", "fhir-bundle", "atna-json")


def export_lines(records: Iterable[AuditRecord], fmt: str) -> Iterator[str]:
    """The records as text pieces in ``fmt``: "fhir-ndjson" (one AuditEvent per line),
    "fhir-bundle" (one FHIR Bundle of type collection), "atna-json" (a JSON array of ATNA
    messages). Concatenated, the pieces are the document."""
    if fmt not in FORMATS:
        raise InvalidArgument(
            "INVALID_AUDIT_FORMAT",
            "unknown audit export format",
            domain=DOMAIN,
            metadata={"allowed": ",".join(FORMATS)},
        )
    if fmt == "fhir-ndjson":
        for r in records:
            yield json.dumps(to_fhir(r), separators=(",", ":")) + "\n"
        return

    def entry(r: AuditRecord) -> dict[str, Any]:
        return {"fullUrl": f"urn:uuid:{uuid.UUID(r.record_id)}", "resource": to_fhir(r)}

    wrap: Callable[[AuditRecord], dict[str, Any]] = entry if fmt == "fhir-bundle" else to_atna
    yield '{"resourceType":"Bundle","type":"collection","entry":[' if fmt == "fhir-bundle" else "["
    first = True
    for r in records:
        yield ("" if first else ",") + json.dumps(wrap(r), separators=(",", ":"))
        first = False
    yield "]}\n" if fmt == "fhir-bundle" else "]\n"
