"""TotalSegmentator "total" (v2) label map -> AbdomenAtlas-8K v1.0 label map (array logic)."""

from __future__ import annotations

import numpy as np

from atlasflow.common.organs import ORGAN_IDS

# TotalSegmentator "total" v2 class id -> (its class name, AbdomenAtlas organ name).
# Source: totalsegmentator/map_to_binary.py class_map["total"] (copied in
# /work/shared/data/totalsegmentator/labels_total_v2.tsv); the portal/splenic vein, the iliac
# veins, the adrenal glands, the kidney cysts and the duodenum are NOT part of any atlas organ.
TOTALSEG_V2_TO_ATLAS: dict[int, tuple[str, str]] = {
    1: ("spleen", "spleen"),
    2: ("kidney_right", "kidney_right"),
    3: ("kidney_left", "kidney_left"),
    4: ("gallbladder", "gall_bladder"),
    5: ("liver", "liver"),
    6: ("stomach", "stomach"),
    7: ("pancreas", "pancreas"),
    52: ("aorta", "aorta"),
    63: ("inferior_vena_cava", "postcava"),
}


def totalseg_lut() -> np.ndarray:
    """(256,) uint8 look-up table: TotalSegmentator v2 id -> AbdomenAtlas id (0 elsewhere)."""
    lut = np.zeros(256, dtype=np.uint8)
    for ts_id, (_, atlas_name) in TOTALSEG_V2_TO_ATLAS.items():
        lut[ts_id] = ORGAN_IDS[atlas_name]
    return lut


def totalseg_to_atlas(labelmap: np.ndarray) -> np.ndarray:
    """Map a TotalSegmentator "total" v2 label map (X, Y, Z), ids 0..255, to AbdomenAtlas ids.

    Returns a uint8 array of the same shape with values 0..9 (1 aorta ... 9 stomach); classes
    without an atlas counterpart become background 0. The geometry is unchanged.
    """
    arr = np.asarray(labelmap)
    if arr.dtype.kind not in "iub":
        if not np.all(arr == np.round(arr)):
            raise ValueError("TotalSegmentator label map must hold integer ids")
    ids = arr.astype(np.int64, copy=False)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise ValueError("TotalSegmentator label ids must lie in 0..255")
    return totalseg_lut()[ids]
