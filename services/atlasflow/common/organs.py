"""AbdomenAtlas-8K v1.0 organ label ids (equal to the `atlasflow.common.v1.Organ` enum values)."""

from __future__ import annotations

ORGANS: dict[int, str] = {
    1: "aorta",
    2: "gall_bladder",
    3: "kidney_left",
    4: "kidney_right",
    5: "liver",
    6: "pancreas",
    7: "postcava",
    8: "spleen",
    9: "stomach",
}
ORGAN_IDS: dict[str, int] = {name: i for i, name in ORGANS.items()}
NUM_ORGANS = len(ORGANS)
