"""The pure logic both SQL backends of the label repository share (no SQL, no driver, no I/O).

What a write checks before it touches the database (`check_id`, `checked_version`,
`json_object`, `check_export_update`), how a request is fingerprinted for idempotency
(`fingerprint_of`), how a new version's per-organ provenance is resolved
(`resolve_organ_provenance`), and how stored rows become records (`record_of`, `job_of`).
atlasflow.labels.sql runs the statements around them; the contract is
atlasflow.labels.repository's.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from atlasflow.common.blobstore import BlobInfo
from atlasflow.common.errors import FailedPrecondition, InvalidArgument
from atlasflow.common.organs import ORGANS
from atlasflow.labels.repository import (
    DOMAIN,
    EXPORT_STATES,
    AuditEvent,
    ExportJobRecord,
    LabelVersionRecord,
    OrganProvenance,
    Provenance,
)

# OperationState transitions (atlasflow.common.v1.OperationState); same-state updates allowed
# for progress.
EXPORT_TRANSITIONS: dict[str, frozenset[str]] = {
    "QUEUED": frozenset({"QUEUED", "RUNNING", "CANCELLED"}),
    "RUNNING": frozenset({"RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "QUEUED"}),
    "SUCCEEDED": frozenset(),
    "FAILED": frozenset(),
    "CANCELLED": frozenset(),
}
MAX_JSON_BYTES = 16 * 1024


def fingerprint_of(*parts: object) -> str:
    """sha256 hex of the canonical JSON of `parts` (a request's identity for idempotency)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def check_id(name: str, value: str) -> None:
    """InvalidArgument("INVALID_ARGUMENT", metadata field `name`) unless `value` is a
    non-empty printable id of at most 256 characters."""
    if not value or len(value) > 256 or not value.isprintable():
        raise InvalidArgument(
            "INVALID_ARGUMENT", f"{name} is required (printable, <= 256 chars)", domain=DOMAIN, metadata={"field": name}
        )


def json_value(value: Any) -> Any:
    """A JSON column's value (SQLite returns the text, PostgreSQL may return it decoded)."""
    return json.loads(value) if isinstance(value, str) else value


def as_datetime(value: Any) -> datetime:
    """A timestamp column's value (SQLite: ISO text; PostgreSQL: datetime)."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def json_object(name: str, value: Any) -> str:
    """Canonical JSON text (sorted keys, compact) of a caller's JSON object; InvalidArgument
    ("INVALID_ARGUMENT", metadata field `name`) when it is not one or is over 16 KiB."""
    try:
        if not isinstance(value, Mapping):
            raise TypeError
        text = json.dumps(dict(value), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        text = ""
    if not text or len(text.encode()) > MAX_JSON_BYTES:
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            f"{name} must be a JSON object of at most 16 KiB",
            domain=DOMAIN,
            metadata={"field": name},
        )
    return text


@dataclass(frozen=True)
class NewVersion:
    """The checked arguments of one version write (see `checked_version`).

    organs: sorted organ ids present; shape: (X, Y, Z); affine: 16 floats row-major or none;
    organ_provenance: the caller's per-organ provenance (version_id "" = the new version);
    fingerprint: the request's identity (REQUEST_ID_REUSED when a request_id repeats with
    another one). review_seconds / organ_review_seconds: the reviewer's time (not part of the
    fingerprint: a retry that measured another time is the same request).
    """

    case_id: str
    label_map: BlobInfo
    ct: BlobInfo
    provenance: Provenance
    request_id: str
    expected_parent: str
    organs: tuple[int, ...]
    shape: tuple[int, ...]
    affine: tuple[float, ...]
    organ_provenance: dict[int, OrganProvenance]
    fingerprint: str
    review_seconds: float = 0.0
    organ_review_seconds: dict[int, float] = field(default_factory=dict)
    organ_changed_ml: dict[int, float] = field(default_factory=dict)


def checked_version(
    case_id: str,
    label_map: BlobInfo,
    ct: BlobInfo,
    provenance: Provenance,
    request_id: str,
    expected_parent_version_id: str,
    organs: Sequence[int],
    shape: Sequence[int],
    affine: Sequence[float] | npt.NDArray[Any],
    organ_provenance: Mapping[int, OrganProvenance] | None,
    request_fingerprint: str,
    review_seconds: float = 0.0,
    organ_review_seconds: Mapping[int, float] | None = None,
    organ_changed_ml: Mapping[int, float] | None = None,
) -> NewVersion:
    """The arguments of `LabelRepository.create_version`, checked and normalised.

    Raises InvalidArgument: INVALID_ARGUMENT (case_id, request_id), INVALID_PROVENANCE (no
    `Provenance`, organ keys outside 1..9), INVALID_LABEL_MAP (organ ids outside 1..9, problem
    VALUES; shape not (X, Y, Z) or affine not 16 values, problem GEOMETRY).
    request_fingerprint: the caller's; default a hash of the normalised arguments.
    review_seconds / organ_review_seconds: see `review_time` (INVALID_REVIEW_SECONDS).
    organ_changed_ml: organ id -> ml a revision changed (finite, >= 0; not in the fingerprint:
    derived from the request).
    """
    case_seconds, organ_seconds = review_time(review_seconds, organ_review_seconds)
    check_id("case_id", case_id)
    check_id("request_id", request_id)
    if not isinstance(provenance, Provenance):
        raise InvalidArgument("INVALID_PROVENANCE", "provenance is required", domain=DOMAIN)
    organ_t = tuple(sorted({int(o) for o in organs}))
    if any(o not in ORGANS for o in organ_t):
        raise InvalidArgument(
            "INVALID_LABEL_MAP", "organ ids must lie in 1..9", domain=DOMAIN, metadata={"problem": "VALUES"}
        )
    shape_t = tuple(int(s) for s in shape)
    affine_t = tuple(float(a) for a in np.asarray(affine, dtype=np.float64).ravel())
    if len(shape_t) != 3 or any(s < 0 for s in shape_t) or len(affine_t) not in (0, 16):
        raise InvalidArgument(
            "INVALID_LABEL_MAP",
            "shape must be (X, Y, Z) and affine 16 values",
            domain=DOMAIN,
            metadata={"problem": "GEOMETRY"},
        )
    organ_prov = dict(organ_provenance or {})
    if any(o not in ORGANS for o in organ_prov):
        raise InvalidArgument("INVALID_PROVENANCE", "organ provenance keys must lie in 1..9", domain=DOMAIN)
    fingerprint = request_fingerprint or fingerprint_of(
        case_id,
        label_map.digest,
        label_map.size_bytes,
        ct.digest,
        ct.size_bytes,
        provenance.to_dict(),
        expected_parent_version_id,
        organ_t,
        shape_t,
        affine_t,
        {str(k): v.to_dict() for k, v in sorted(organ_prov.items())},
    )
    return NewVersion(
        case_id,
        label_map,
        ct,
        provenance,
        request_id,
        expected_parent_version_id,
        organ_t,
        shape_t,
        affine_t,
        organ_prov,
        fingerprint,
        case_seconds,
        organ_seconds,
        {
            int(k): round(float(v), 6)
            for k, v in sorted((organ_changed_ml or {}).items())
            if int(k) in ORGANS and math.isfinite(float(v)) and float(v) >= 0
        },
    )


def review_time(case_seconds: float, organ_seconds: Mapping[int, float] | None) -> tuple[float, dict[int, float]]:
    """A reviewer's time, checked: seconds finite and >= 0 (0 = not measured), organ ids 1..9.
    Returns the case's seconds and the organs with a time > 0. Raises InvalidArgument
    INVALID_REVIEW_SECONDS (metadata ``field``)."""

    def checked(value: float, name: str) -> float:
        v = float(value)
        if not math.isfinite(v) or v < 0:
            raise InvalidArgument(
                "INVALID_REVIEW_SECONDS",
                "review_seconds must be a finite number of seconds >= 0",
                domain=DOMAIN,
                metadata={"field": name},
            )
        return v

    per_organ: dict[int, float] = {}
    for oid, value in sorted((organ_seconds or {}).items()):
        if oid not in ORGANS:
            raise InvalidArgument(
                "INVALID_REVIEW_SECONDS", "organ ids must lie in 1..9", domain=DOMAIN, metadata={"field": "organ"}
            )
        v = checked(value, f"revisions[{ORGANS[oid]}].review_seconds")
        if v > 0:
            per_organ[oid] = v
    return checked(case_seconds, "review_seconds"), per_organ


def resolve_organ_provenance(new: NewVersion, version_id: str) -> dict[int, OrganProvenance]:
    """Provenance of all nine organs of the version `version_id` being written: the caller's
    (an empty version_id becomes `version_id`), the version's own for organs not given."""
    resolved = {
        oid: OrganProvenance(op.provenance, op.version_id or version_id) for oid, op in new.organ_provenance.items()
    }
    for oid in ORGANS:
        resolved.setdefault(oid, OrganProvenance(new.provenance, version_id))
    return resolved


def with_versions(event: AuditEvent, version_id: str) -> AuditEvent:
    """`event` naming the version a write made (or found, for a repeated request)."""
    return AuditEvent(event.principal, event.method, event.case_id, (version_id,), event.job_id, event.outcome)


def check_export_update(current_state: str, new_state: str, cases_total: int, cases_done: int) -> None:
    """An export job's update from `current_state`: InvalidArgument("INVALID_ARGUMENT") for an
    unknown state or `cases_done` outside 0..cases_total, FailedPrecondition
    ("INVALID_STATE_TRANSITION", metadata from/to) for a transition `EXPORT_TRANSITIONS` forbids."""
    if new_state not in EXPORT_STATES:
        raise InvalidArgument(
            "INVALID_ARGUMENT", "unknown export state", domain=DOMAIN, metadata={"state": str(new_state)[:40]}
        )
    if new_state not in EXPORT_TRANSITIONS[current_state]:
        raise FailedPrecondition(
            "INVALID_STATE_TRANSITION",
            "export job cannot make this state transition",
            domain=DOMAIN,
            metadata={"from": current_state, "to": new_state},
        )
    if not 0 <= cases_done <= cases_total:
        raise InvalidArgument("INVALID_ARGUMENT", "cases_done out of range", domain=DOMAIN)


def record_of(row: Mapping[str, Any]) -> LabelVersionRecord:
    """The record of a `label_versions` row (rows written before migration 2 carry '{}' as
    organ provenance: the version's own provenance applies to every organ)."""
    shape = tuple(json_value(row["shape"]))
    provenance = Provenance(
        source=row["source"],
        model_version=row["model_version"],
        job_id=row["job_id"],
        reviewer=row["reviewer"],
        weights_trained=bool(row["weights_trained"]),
    )
    stored = json_value(row["organ_provenance"]) or {}
    organ_prov = {
        oid: (
            OrganProvenance(Provenance.from_dict(stored[str(oid)]), str(stored[str(oid)].get("version_id", "")))
            if str(oid) in stored
            else OrganProvenance(provenance, row["version_id"])
        )
        for oid in ORGANS
    }
    return LabelVersionRecord(
        version_id=row["version_id"],
        case_id=row["case_id"],
        parent_version_id=row["parent_version_id"] or "",
        label_map_digest=row["label_map_digest"],
        label_map_size=int(row["label_map_size"]),
        ct_digest=row["ct_digest"],
        ct_size=int(row["ct_size"]),
        provenance=provenance,
        organs=tuple(int(o) for o in json_value(row["organs"])),
        shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        affine=tuple(float(a) for a in json_value(row["affine"])),
        create_time=as_datetime(row["create_time"]),
        organ_provenance=organ_prov,
        review_seconds=float(row["review_seconds"] or 0.0),
        organ_review_seconds={int(k): float(v) for k, v in (json_value(row["organ_review_seconds"]) or {}).items()},
        organ_changed_ml={int(k): float(v) for k, v in (json_value(row["organ_changed_ml"]) or {}).items()},
    )


def job_of(row: Mapping[str, Any]) -> ExportJobRecord:
    """The record of an `export_jobs` row."""
    return ExportJobRecord(
        job_id=row["job_id"],
        state=row["state"],
        destination_uri=row["destination_uri"],
        versions=tuple((str(c), str(v)) for c, v in json_value(row["versions"])),
        cases_done=int(row["cases_done"]),
        cases_total=int(row["cases_total"]),
        error_reason=row["error_reason"],
        create_time=as_datetime(row["create_time"]),
        update_time=as_datetime(row["update_time"]),
        case_ids=tuple(json_value(row["case_ids"])),
        options=json_value(row["options"]) or {},
    )
