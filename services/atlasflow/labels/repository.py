"""The label repository's interface: immutable label versions with lineage and provenance,
export jobs and the audit trail (the `LabelRepository` protocol and its value types; no grpc,
no SQL).

One implementation, `atlasflow.labels.sql.SqlLabelRepository`, on the one database layer
(atlasflow.common.db: a SQLite file, the embedded default, or PostgreSQL, production), passes
the contract test suite on both (tests/labels/test_labels_repository.py);
`SqliteLabelRepository` (atlasflow.labels.sqlite) and `PostgresLabelRepository`
(atlasflow.labels.postgres) are its constructors by back-end. The pure row and argument logic
lives in `atlasflow.labels.rows`; `atlasflow.labels.storage.open_repository` opens the database
a deployment is configured for; the schema is the Alembic revisions of
`atlasflow.labels.migrations` (`atlasflow.labels.schema`: the frozen hand-written migrations a
database made before them is adopted from).

Import graph (no cycle): repository <- rows <- sql <- {sqlite, postgres} <- storage;
schema <- migrations <- sql.

Every label version of a case is an immutable row; a case's history is a single chain
(first version -> ... -> head). The chain is enforced by the database itself: one root per
case and at most one child per version (partial UNIQUE indexes), so even a buggy caller cannot
fork the history. Writers serialise per case (SQLite: `BEGIN IMMEDIATE`, the database write
lock; PostgreSQL: a transaction-scoped advisory lock on the case id), read the head, check
`expected_parent_version_id`, insert and move the head in one transaction.

Per-organ provenance: every version records, for each of the nine organs, which source decided
that organ's label and in which version (`OrganProvenance`); label assembly
(atlasflow.labels.assembly) computes it, the repository stores it.

Idempotency: `request_id` is UNIQUE. A repeat of a request (same request_id, same content)
returns the version created the first time, also after a restart and also after other versions
were appended since; the same request_id with different content is rejected
(InvalidArgument("REQUEST_ID_REUSED")).

Export jobs: a job freezes the head versions of its cases when it is created and stores the
caller's `options` (a JSON object, e.g. atlasflow.labels.export_jobs.ExportOptions.to_dict(); {} =
the plain AbdomenAtlas layout) in the same row. Per-case outcomes of a job (e.g. its DICOM SEG
outcome) are rows of `export_case_outcomes`, one per (job, case), committed as each case is
done; recording a case again replaces its outcome (the latest attempt wins).

Audit: `audit_records` is append-only (triggers refuse UPDATE and DELETE). Writes record their
audit row in the same transaction as the write; reads record theirs via `record_audit`.

Version events (a transactional outbox): every new version also writes a `version_events` row
in its own transaction, with its 1-based position in the case's chain and the writer's W3C
traceparent. The labels service delivers them to ranking (atlasflow.labels.events) and marks
them done only after ranking acknowledged, so a crash between commit and delivery loses nothing.
Several replicas deliver them through `events` (an `atlasflow.common.outbox.SqlOutboxStore`:
rows claimed with a lease, a dead claimer's rows redelivered after it expired; ranking's
RecordLabelVersion is idempotent, so delivery is exactly once in effect). Hand-written
migration 3 queued one event per version that existed before it.

Export jobs and replicas: a replica runs a job only while it holds the job's lease
(`claim_export_job`, renewed by `renew_export_claim`, given back by `release_export_claim`);
a replica that died leaves its job to another once the lease expired.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import numpy.typing as npt

from atlasflow.common.blobstore import BlobInfo
from atlasflow.common.errors import InvalidArgument
from atlasflow.common.outbox import OutboxStore

DOMAIN = "atlasflow.labels"
#: the outbox topic of version events (labels -> ranking RecordLabelVersion)
VERSION_EVENT_TOPIC = "ranking.record_label_version"
SOURCES = ("ai", "radiologist", "original")
EXPORT_STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")


@dataclass(frozen=True)
class Provenance:
    """Where a label came from.

    source: "ai" (model ensemble), "radiologist" (drawn or revised by a human) or "original"
    (shipped with the source dataset). model_version / job_id for AI, reviewer (principal) for
    radiologist; weights_trained False when the models ran untrained demo weights.
    """

    source: str
    model_version: str = ""
    job_id: str = ""
    reviewer: str = ""
    weights_trained: bool = False

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise InvalidArgument(
                "INVALID_PROVENANCE",
                "provenance source must be one of ai, radiologist, original",
                domain=DOMAIN,
                metadata={"source": str(self.source)[:40]},
            )

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "model_version": self.model_version,
            "job_id": self.job_id,
            "reviewer": self.reviewer,
            "weights_trained": self.weights_trained,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Provenance:
        return cls(
            str(d["source"]),
            str(d.get("model_version", "")),
            str(d.get("job_id", "")),
            str(d.get("reviewer", "")),
            bool(d.get("weights_trained", False)),
        )


@dataclass(frozen=True)
class OrganProvenance:
    """Who decided one organ's label, and in which version.

    version_id: the version whose write decided this organ ("" in a create call = the version
    being created; records always carry the resolved id).
    """

    provenance: Provenance
    version_id: str = ""

    def to_dict(self) -> dict[str, object]:
        return {**self.provenance.to_dict(), "version_id": self.version_id}


@dataclass(frozen=True)
class LabelVersionRecord:
    """One immutable label version.

    label_map_*: combined label map blob (NIfTI uint8, AbdomenAtlas ids, on the CT grid);
    ct_*: the CT volume blob. organs: ids present (non-empty), ascending. shape: (X, Y, Z)
    voxels. affine: 16 floats, row-major voxel-to-world RAS+ mm. parent_version_id: "" for the
    first version of a case. create_time: UTC. organ_provenance: organ id -> OrganProvenance
    for all nine organs. review_seconds: the reviewer's time on the whole case for the revision
    that created this version, seconds (0: not measured or not a revision);
    organ_review_seconds: organ id -> seconds for the organs revised with a time > 0;
    organ_changed_ml: organ id -> ml of voxels whose membership in that organ the revision that
    created this version changed, for every organ it decided (0 = accepted as it was).
    """

    version_id: str
    case_id: str
    parent_version_id: str
    label_map_digest: str
    label_map_size: int
    ct_digest: str
    ct_size: int
    provenance: Provenance
    organs: tuple[int, ...]
    shape: tuple[int, int, int]
    affine: tuple[float, ...]
    create_time: datetime
    organ_provenance: Mapping[int, OrganProvenance] = field(default_factory=dict, compare=True)
    review_seconds: float = 0.0
    organ_review_seconds: Mapping[int, float] = field(default_factory=dict)
    organ_changed_ml: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportJobRecord:
    """An export operation. state: one of EXPORT_STATES (OperationState without the prefix).

    versions: the (case_id, version_id) pairs frozen when the job was created (each case's
    head at that moment), in export order; cases_total == len(versions). destination_uri: as
    the caller gave it. options: the caller's JSON object stored with the job ({} = none;
    atlasflow.labels.export_jobs.ExportOptions.from_dict reads it).
    """

    job_id: str
    state: str
    destination_uri: str
    versions: tuple[tuple[str, str], ...]
    cases_done: int
    cases_total: int
    error_reason: str
    create_time: datetime
    update_time: datetime
    case_ids: tuple[str, ...] = field(default=())
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportCaseOutcome:
    """The latest recorded outcome of one case of an export job.

    outcome: the caller's JSON object (e.g. atlasflow.labels.export_jobs.SegOutcome.to_dict());
    time: when it was recorded (UTC).
    """

    job_id: str
    case_id: str
    outcome: Mapping[str, Any]
    time: datetime


@dataclass(frozen=True)
class AuditEvent:
    """What to record: who (principal), what (method = RPC name, case/version/job ids,
    outcome "OK" or the error reason)."""

    principal: str
    method: str
    case_id: str = ""
    version_ids: tuple[str, ...] = ()
    job_id: str = ""
    outcome: str = "OK"


@dataclass(frozen=True)
class AuditRecord:
    """A stored audit row: the event plus its id and time (UTC)."""

    record_id: str
    time: datetime
    principal: str
    method: str
    case_id: str
    version_ids: tuple[str, ...]
    job_id: str
    outcome: str


@dataclass(frozen=True)
class VersionEvent:
    """A pending hand-off of one new label version to ranking (see the module docstring).

    version_number: 1-based position of the version in its case's chain; attempts: delivery
    attempts so far; traceparent: W3C context of the write ("" when none).
    """

    seq: int
    version_id: str
    case_id: str
    version_number: int
    traceparent: str
    attempts: int


@runtime_checkable
class LabelRepository(Protocol):
    """Storage interface of label versions; every implementation passes tests/labels' contract."""

    def create_version(
        self,
        case_id: str,
        label_map: BlobInfo,
        ct: BlobInfo,
        provenance: Provenance,
        request_id: str,
        expected_parent_version_id: str = "",
        *,
        organs: Sequence[int] = (),
        shape: Sequence[int] = (0, 0, 0),
        affine: Sequence[float] | npt.NDArray[Any] = (),
        organ_provenance: Mapping[int, OrganProvenance] | None = None,
        request_fingerprint: str = "",
        audit: AuditEvent | None = None,
        expect_empty: bool = False,
        review_seconds: float = 0.0,
        organ_review_seconds: Mapping[int, float] | None = None,
        organ_changed_ml: Mapping[int, float] | None = None,
    ) -> LabelVersionRecord: ...

    def get_version(self, version_id: str) -> LabelVersionRecord: ...

    def list_versions(
        self, case_id: str | None = None, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[LabelVersionRecord], str]: ...

    def head(self, case_id: str) -> LabelVersionRecord | None: ...

    def version_for_request(self, request_id: str) -> tuple[LabelVersionRecord, str] | None: ...

    def history(self, case_id: str) -> list[LabelVersionRecord]: ...

    def case_ids(self) -> list[str]: ...

    def create_export_job(
        self,
        case_ids: Sequence[str],
        destination_uri: str,
        *,
        request_id: str = "",
        audit: AuditEvent | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> ExportJobRecord: ...

    def get_export_job(self, job_id: str) -> ExportJobRecord: ...

    def update_export_job(
        self, job_id: str, *, state: str | None = None, cases_done: int | None = None, error_reason: str | None = None
    ) -> ExportJobRecord: ...

    def list_export_jobs(self, states: Sequence[str] = ()) -> list[ExportJobRecord]: ...

    def record_export_outcome(self, job_id: str, case_id: str, outcome: Mapping[str, Any]) -> ExportCaseOutcome: ...

    def list_export_outcomes(self, job_id: str) -> list[ExportCaseOutcome]: ...

    def record_audit(self, event: AuditEvent) -> AuditRecord: ...

    def list_audit_records(
        self, case_id: str = "", principal: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[AuditRecord], str]: ...

    def due_version_events(self, now: float, limit: int = 32) -> list[VersionEvent]: ...

    def mark_version_event(self, seq: int, state: str, *, error: str = "", next_attempt_at: float = 0.0) -> None: ...

    def version_event_backlog(self) -> int: ...

    def oldest_pending_version_event(self) -> datetime | None: ...

    @property
    def events(self) -> OutboxStore: ...

    def claim_export_job(self, now: float | None = None) -> ExportJobRecord | None: ...

    def renew_export_claim(self, job_id: str, now: float | None = None) -> bool: ...

    def release_export_claim(self, job_id: str) -> None: ...

    def purge_study(self, case_id: str) -> tuple[dict[str, int], list[str]]: ...

    def referenced(self, digests: Sequence[str]) -> list[str]: ...

    def close(self) -> None: ...
