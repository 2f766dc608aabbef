"""Hand-off of new label versions to ranking: the labels service's outbox.

Every version the repository stores writes a `version_events` row in the same transaction
(atlasflow.labels.repository). `VersionEventStore` exposes those rows to the common
`OutboxDispatcher`; `ranking_request` turns a version into `RecordLabelVersion`, which ranking
applies idempotently and in version order, so at-least-once delivery in any order is safe.

Human-decided organs of a version: organs whose label a radiologist decided (revised, also
to empty, in this version or an ancestor) plus organs an original (source dataset) label
decided that are present in the label map. Revised organs: the radiologist's organs decided
by this very version.
"""

from __future__ import annotations

from atlasflow.common.outbox import OutboxRow
from atlasflow.labels.repository import LabelRepository, LabelVersionRecord
from atlasflow.ranking.v1 import ranking_pb2

TOPIC = "ranking.record_label_version"


class VersionEventStore:
    """`atlasflow.common.outbox.OutboxStore` over a repository's version events (row id = seq,
    dedupe key = version id, empty payload: the handler reads the version)."""

    def __init__(self, repo: LabelRepository) -> None:
        self.repo = repo

    def due(self, now: float, limit: int) -> list[OutboxRow]:
        return [OutboxRow(e.seq, TOPIC, e.version_id, str(e.version_number).encode(),
                          e.traceparent, e.attempts)
                for e in self.repo.due_version_events(now, limit)]

    def mark(self, row_id: int, state: str, error: str, next_attempt_at: float) -> None:
        self.repo.mark_version_event(row_id, state, error=error, next_attempt_at=next_attempt_at)

    def pending(self) -> int:
        return self.repo.version_event_backlog()


def ranking_request(record: LabelVersionRecord, version_number: int
                    ) -> ranking_pb2.RecordLabelVersionRequest:
    """The RecordLabelVersion call for one stored version (see the module docstring)."""
    present = set(record.organs)
    human, revised = [], []
    for organ, op in sorted(record.organ_provenance.items()):
        source = op.provenance.source
        if source == "radiologist" or (source == "original" and organ in present):
            human.append(organ)
        if source == "radiologist" and op.version_id == record.version_id:
            revised.append(organ)
    return ranking_pb2.RecordLabelVersionRequest(
        case_id=record.case_id, label_version_id=record.version_id,
        version_number=version_number, human_decided_organs=human,  # type: ignore[arg-type]
        revised_organs=revised,  # type: ignore[arg-type]
        reviewer=record.provenance.reviewer if record.provenance.source == "radiologist" else "")
