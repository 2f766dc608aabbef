"""Class maps of third-party models and the mapping of their class names onto atlasflow's organs.

Data: ``<name>.json`` here (``{"name", "description", "source", "classes": {id: name}}``);
`load_class_map` reads one by name (``totalsegmentator-total-v2``: TotalSegmentator v2's 117
classes of task ``total``, its source in the file).

`organ_of` maps a class name onto an atlasflow organ id (`atlasflow.common.organs`, the nine
AbdomenAtlas-8K organs) by name: exact names, the synonyms in `SYNONYMS` (TotalSegmentator's
``gallbladder`` and ``inferior_vena_cava``, common spellings), case and ``-``/space
insensitive. Classes that are not one of the nine (vertebrae, lungs, ``kidney`` without a side,
...) map to None: the member has no opinion on those organs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from atlasflow.common.errors import NotFound
from atlasflow.common.organs import ORGAN_IDS

HERE = Path(__file__).resolve().parent
TOTALSEGMENTATOR_TOTAL_V2 = "totalsegmentator-total-v2"

#: other spellings of atlasflow's organ names (normalised: lower case, ``_`` separators)
SYNONYMS: dict[str, str] = {
    "gallbladder": "gall_bladder",
    "inferior_vena_cava": "postcava",
    "ivc": "postcava",
    "vena_cava_inferior": "postcava",
    "left_kidney": "kidney_left",
    "right_kidney": "kidney_right",
    "kidney_l": "kidney_left",
    "kidney_r": "kidney_right",
    "abdominal_aorta": "aorta",
}


def _norm(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").split())


def organ_of(class_name: str) -> int | None:
    """atlasflow organ id of a model's class name, or None (no such organ in atlasflow)."""
    n = _norm(class_name)
    n = SYNONYMS.get(n, n)
    return ORGAN_IDS.get(n)


def organ_channels(labels: Mapping[int, str]) -> dict[int, int]:
    """A model's label map (id -> name) -> {atlasflow organ id: the model's label id}.

    A name that maps to an organ twice (two classes for one organ) keeps the lower id."""
    out: dict[int, int] = {}
    for label_id in sorted(labels):
        organ = organ_of(labels[label_id]) if label_id else None
        if organ is not None and organ not in out:
            out[organ] = int(label_id)
    return out


def class_map_names() -> list[str]:
    return sorted(p.stem.replace("_", "-") for p in HERE.glob("*.json"))


def load_class_map(name: str) -> dict[int, str]:
    """The class map ``name`` (see `class_map_names`): label id -> class name (0 = background)."""
    path = HERE / f"{name.replace('-', '_')}.json"
    if not path.is_file():
        raise NotFound(
            "CLASS_MAP_NOT_FOUND",
            f"no class map named {name!r} (known: {', '.join(class_map_names())})",
            domain="models.atlasflow",
            metadata={"name": name},
        )
    raw = json.loads(path.read_text())
    classes = {int(k): str(v) for k, v in raw["classes"].items()}
    return {0: "background", **classes}
