"""Hand-off of new label versions to ranking: the labels service's outbox.

Every version stored also gets a `version_events` row, written by the repository's SQL
(atlasflow.labels.sql, `SqlLabelRepository`) in the same transaction as the version itself
(the contract: atlasflow.labels.repository). The repository's `events` (an
`atlasflow.common.outbox.SqlOutboxStore` over those rows: claimed with a lease, so any replica
may deliver any of them), as `VersionEventStore`, feeds the common `OutboxDispatcher` (run by
atlasflow.labels.worker);
`version_request` turns a stored version into `RecordLabelVersion` (`ranking_request`), which
ranking applies idempotently and in version order, so at-least-once delivery in any order (and
by several replicas) is exactly once in effect.

Human-decided organs of a version: organs whose label a radiologist decided (revised, also
to empty, in this version or an ancestor) plus organs an original (source dataset) label
decided that are present in the label map. Revised organs: the radiologist's organs decided
by this very version. The geometry (volume, centroid, field-of-view cut) of the human-decided
organs present in the map travels along: ranking learns its population prior from it.
So does how much the revision changed each revised organ (`organ_changes`, ml; 0 = accepted):
with the organ's features these are the decisions ranking fits its `learned` strategy on.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import numpy.typing as npt

from atlasflow.common.blobstore import BlobStore
from atlasflow.common.nifti import from_nifti_bytes
from atlasflow.common.outbox import OutboxRow
from atlasflow.common.v1 import common_pb2
from atlasflow.labels.repository import VERSION_EVENT_TOPIC, LabelRepository, LabelVersionRecord
from atlasflow.method.geometry import measure_labels
from atlasflow.ranking.v1 import ranking_pb2

TOPIC = VERSION_EVENT_TOPIC


class VersionEventStore:
    """The `atlasflow.common.outbox.OutboxStore` the labels dispatcher reads: the repository's
    claiming store (`LabelRepository.events`: row id = seq, dedupe key = version id, payload =
    the version's number; the handler reads the version), with the lag measured from the
    oldest undelivered version's creation time."""

    def __init__(self, repo: LabelRepository) -> None:
        self.repo = repo

    def due(self, now: float, limit: int) -> list[OutboxRow]:
        return self.repo.events.due(now, limit)

    def mark(self, row_id: int, state: str, error: str, next_attempt_at: float) -> None:
        self.repo.events.mark(row_id, state, error, next_attempt_at)

    def release(self) -> int:
        """Give back this replica's unexpired claims (a clean stop)."""
        release = getattr(self.repo.events, "release", None)
        return int(release()) if release is not None else 0

    def pending(self) -> int:
        return self.repo.version_event_backlog()

    def oldest_pending_age(self, now: float) -> float:
        """Seconds since the oldest undelivered version was stored (0 when none): the lag."""
        oldest = self.repo.oldest_pending_version_event()
        return max(0.0, now - oldest.timestamp()) if oldest is not None else 0.0


def human_decided(record: LabelVersionRecord) -> list[int]:
    """Organ ids whose label in `record` a human decided (see the module docstring)."""
    present = set(record.organs)
    return [
        o
        for o, op in sorted(record.organ_provenance.items())
        if op.provenance.source == "radiologist" or (op.provenance.source == "original" and o in present)
    ]


def organ_geometry(
    label_map: npt.NDArray[Any], affine: npt.NDArray[np.floating[Any]], organs: list[int]
) -> list[ranking_pb2.OrganGeometry]:
    """Geometry of `organs` in a label map ``(X, Y, Z)`` (AbdomenAtlas ids, voxel -> RAS+ mm);
    organs absent from the map are left out."""
    wanted = set(organs)
    return [
        ranking_pb2.OrganGeometry(
            organ=cast("common_pb2.Organ", k),  # AbdomenAtlas ids are the Organ enum's values
            volume_ml=g.volume_ml,
            centroid_mm=[float(c) for c in g.centroid_mm],
            fov_cut=bool(g.fov_cut),
        )
        for k, g in sorted(measure_labels(label_map, affine).items())
        if k in wanted
    ]


def ranking_request(
    record: LabelVersionRecord, version_number: int, geometry: list[ranking_pb2.OrganGeometry] | None = None
) -> ranking_pb2.RecordLabelVersionRequest:
    """The RecordLabelVersion call for one stored version (see the module docstring);
    `geometry`: from `organ_geometry` for the `human_decided` organs."""
    human = human_decided(record)
    revised = [
        o
        for o, op in sorted(record.organ_provenance.items())
        if op.provenance.source == "radiologist" and op.version_id == record.version_id
    ]
    return ranking_pb2.RecordLabelVersionRequest(
        case_id=record.case_id,
        label_version_id=record.version_id,
        version_number=version_number,
        human_decided_organs=cast("list[common_pb2.Organ]", human),  # organ ids: the enum's values
        revised_organs=cast("list[common_pb2.Organ]", revised),
        reviewer=record.provenance.reviewer if record.provenance.source == "radiologist" else "",
        human_organ_geometry=geometry or [],
        organ_changes=[
            ranking_pb2.OrganChange(organ=cast("common_pb2.Organ", o), changed_ml=record.organ_changed_ml[o])
            for o in revised
            if o in record.organ_changed_ml
        ],
    )


def version_request(
    repo: LabelRepository, blobs: BlobStore, version_id: str, version_number: int
) -> ranking_pb2.RecordLabelVersionRequest:
    """The RecordLabelVersion call for the stored version `version_id` (blocking: reads the
    repository, and the label map blob only when a human decided organs; the blob store
    verifies its digest)."""
    record = repo.get_version(version_id)
    human = human_decided(record)
    geometry = []
    if human:  # the label map is read (and verified) only when a human decided organs
        label_map, affine = from_nifti_bytes(blobs.get(record.label_map_digest))
        geometry = organ_geometry(label_map, affine, human)
    return ranking_request(record, version_number, geometry)
