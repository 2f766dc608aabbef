"""Group scanned frames into the volumes `atlasflow convert` writes (`group_frames`).

By (0020,000E) SeriesInstanceUID; files whose SeriesInstanceUID is empty are grouped by
(0020,0052) FrameOfReferenceUID + geometry (with a warning). Within a series, localizers are
dropped and frames of different size / orientation / pixel spacing split apart (see
`atlasflow.ingest.convert` step 2).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from atlasflow.ingest.frames import FrameRef
from atlasflow.ingest.scan import ScannedFrame

if TYPE_CHECKING:
    pass


@dataclass
class Group:
    """Frames to assemble into one volume, with the notes of how they were grouped."""

    frames: list[FrameRef]
    series_number: int
    label: str
    notes: list[str] = field(default_factory=list)


def _geometry_key(ref: FrameRef) -> tuple[object, ...]:
    return (ref.rows, ref.cols, tuple(np.round(ref.iop, 3)), tuple(np.round(ref.pixel_spacing, 3)))


def group_frames(frames: list[ScannedFrame]) -> tuple[list[Group], list[str]]:
    """Series -> geometry sub-groups (see module doc). Returns (groups, notes)."""
    notes: list[str] = []
    series: dict[tuple[object, ...], list[ScannedFrame]] = defaultdict(list)
    no_uid = 0
    for f in frames:
        if f.ref.series_uid:
            series[("uid", f.ref.series_uid)].append(f)
        else:
            no_uid += 1
            series[("for", f.ref.frame_of_reference_uid, _geometry_key(f.ref))].append(f)
    if no_uid:
        notes.append(
            f"warning: {no_uid} frame(s) have an empty (0020,000E) SeriesInstanceUID: grouped "
            "by (0020,0052) FrameOfReferenceUID and geometry instead"
        )
    groups: list[Group] = []
    for s, (key, members) in enumerate(series.items(), start=1):
        label = f"series {s}" if key[0] == "uid" else f"series {s} (no UID)"
        localizers = [f for f in members if f.localizer]
        images = [f for f in members if not f.localizer]
        if localizers:
            notes.append(f"{label}: {len(localizers)} localizer frame(s) dropped (a scout is not part of the volume)")
        if not images:
            notes.append(f"error: {label}: only localizer images, no volume [INCONSISTENT_SERIES/localizer]")
            continue
        by_geometry: dict[tuple[object, ...], list[ScannedFrame]] = defaultdict(list)
        for f in images:
            by_geometry[_geometry_key(f.ref)].append(f)
        parts = sorted(by_geometry.values(), key=len, reverse=True)
        for p, part in enumerate(parts, start=1):
            sub = label if len(parts) == 1 else f"{label} part {p}"
            group = Group([f.ref for f in part], part[0].series_number, sub)
            if len(parts) > 1:
                r = part[0].ref
                group.notes.append(
                    f"warning: split: {label} mixes sizes/orientations/pixel spacings; this part "
                    f"has {len(part)} frame(s) of {r.cols}x{r.rows}"
                )
            groups.append(group)
    groups.sort(key=lambda g: (g.series_number, -len(g.frames)))
    return groups, notes
