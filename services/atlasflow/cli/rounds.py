"""Measuring rounds of the active-learning loop (no grpc): the per-round table of issue 15.

Shared by `benchmarks/bench_loop.py` (the loop in-process) and `atlasflow demo --rounds N`
(the loop through the services of the embedded stack, `atlasflow.cli.demo_rounds`). It lives in
the CLI package, which may import only the services' public surfaces
(tests/architecture/test_boundaries.py): no training internals here.

* the cases: 64^3-voxel boxes (`BOXES`) of the bundled example CT, two of them held out for the
  gate (`HOLDOUT`); the simulated radiologist's reference is `REFERENCE_LABELS`, TotalSegmentator
  ``--fast`` labels of that CT mapped to the nine AbdomenAtlas organs (model output, not manual);
* `reference_on_grid`: the reference on any case's grid (nearest neighbour through the affines:
  a box, or the volume ingest assembled from the DICOM series);
* `organ_dice`, `split_dice`: Dice per organ, and the mean over the organ kinds revised so far
  (``revised_dice``) and over the others (``other_dice``: forgetting shows here);
* `attention_summary`: attention volume and the number of cases above the review threshold;
* `round_row`, `write_rounds`, `format_table`: one row per round, ``rounds.json`` written
  atomically after each round (a killed run keeps the rounds it finished), the printed table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from atlasflow.common.disk import atomic_write
from atlasflow.common.organs import ORGANS

_DATA = Path(__file__).resolve().parent / "data"
#: The bundled demo CT (also `atlasflow.cli.demo_series.DEFAULT_DEMO_NIFTI` unless overridden).
EXAMPLE_CT = _DATA / "example_ct.nii.gz"
#: Its reference labels in AbdomenAtlas ids 0..9, same grid (cli/data/README.md).
REFERENCE_LABELS = _DATA / "example_ct_reference_atlas.nii.gz"
BOX = 64
#: (x0, y0, z0) of the 64^3 boxes of the example CT that make the loop's cases.
BOXES: dict[str, tuple[int, int, int]] = {
    "case-1": (0, 0, 48),
    "case-2": (50, 0, 48),
    "case-3": (0, 30, 30),
    "case-4": (50, 30, 30),
    "case-5": (20, 10, 40),
    "case-6": (40, 20, 20),
}
#: Boxes held out for the gate: every present organ decided by the radiologist, never trained on.
HOLDOUT = ("case-5", "case-6")
#: Keys every rounds.json row has (issue 15 names the first six after ``round``).
ROW_KEYS = (
    "round",
    "model_version",
    "promoted",
    "gate_reason",
    "revised_dice",
    "other_dice",
    "attention_ml",
    "cases_to_review",
    "seconds",
)


def load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array as stored, float64 (4, 4) affine) of a NIfTI file."""
    img = nib.load(str(path))
    if not isinstance(img, nib.Nifti1Image):
        raise ValueError(f"{path}: not a NIfTI-1 image")
    return np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def crop_box(
    array: np.ndarray, affine: np.ndarray, origin: Sequence[int], size: int = BOX
) -> tuple[np.ndarray, np.ndarray]:
    """The ``size``^3 box of ``array`` starting at voxel ``origin``, with its affine."""
    x0, y0, z0 = (int(v) for v in origin)
    box = np.ascontiguousarray(array[x0 : x0 + size, y0 : y0 + size, z0 : z0 + size])
    aff = np.asarray(affine, dtype=np.float64).copy()
    aff[:3, 3] = aff[:3, :3] @ np.array([x0, y0, z0], dtype=np.float64) + aff[:3, 3]
    return box, aff


def reference_on_grid(
    reference: np.ndarray, reference_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray
) -> np.ndarray:
    """``reference`` (a label map) sampled at the voxel centres of the grid (``shape``,
    ``affine``) by nearest neighbour; 0 outside the reference. uint8, ``shape``."""
    shape = tuple(int(s) for s in shape)
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = np.asarray(affine, dtype=np.float64) @ np.vstack([idx, np.ones((1, idx.shape[1]))])
    src = np.linalg.inv(np.asarray(reference_affine, dtype=np.float64)) @ world
    ijk = np.rint(src[:3]).astype(np.int64)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(reference.shape)[:, None]), axis=0)
    out = np.zeros(idx.shape[1], dtype=np.uint8)
    out[inside] = np.asarray(reference)[ijk[0, inside], ijk[1, inside], ijk[2, inside]]
    return out.reshape(shape)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (as the training gate counts it)."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    s = int(p.sum()) + int(t.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(p, t).sum()) / s


def organ_dice(labels: np.ndarray, reference: np.ndarray, organs: Iterable[int] | None = None) -> dict[int, float]:
    """Dice per organ id of two label maps on one grid, for the organs present in ``reference``
    (or the given ``organs``; an organ empty in both counts 1.0)."""
    labels, reference = np.asarray(labels), np.asarray(reference)
    if labels.shape != reference.shape:
        raise ValueError(f"label maps of shapes {labels.shape} and {reference.shape}")
    wanted = list(organs) if organs is not None else [o for o in ORGANS if np.any(reference == o)]
    return {o: dice(labels == o, reference == o) for o in wanted}


def mean_per_organ(rows: Iterable[Mapping[int, float]]) -> dict[int, float]:
    """Per organ, the mean over cases of per-case Dice (organs missing in a case do not count)."""
    acc: dict[int, list[float]] = {}
    for row in rows:
        for organ, value in row.items():
            if value is not None and not math.isnan(value):
                acc.setdefault(organ, []).append(float(value))
    return {o: float(np.mean(v)) for o, v in sorted(acc.items())}


def split_dice(per_organ: Mapping[int, float], revised_kinds: Collection[int]) -> tuple[float, float]:
    """(mean over the revised organ kinds, mean over the others) of per-organ Dice; NaN for an
    empty side."""

    def mean(values: list[float]) -> float:
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan

    revised = mean([d for o, d in per_organ.items() if o in revised_kinds])
    other = mean([d for o, d in per_organ.items() if o not in revised_kinds])
    return revised, other


def attention_summary(per_case: Mapping[str, Iterable[float]], threshold_ml: float) -> tuple[float, int]:
    """(sum of the organs' attention ml over the cases, cases whose attention is above
    ``threshold_ml``)."""
    totals = {case: float(sum(values)) for case, values in per_case.items()}
    return float(sum(totals.values())), sum(1 for v in totals.values() if v > threshold_ml)


def pick_revisions(candidates: Iterable[tuple[float, str, int]], n: int) -> list[tuple[str, int]]:
    """The ``n`` (case, organ) of the highest attention among (attention, case, organ)."""
    return [(case, organ) for _, case, organ in sorted(candidates, reverse=True)[:n]]


def _num(value: float | None, digits: int) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(float(value), digits)


def round_row(
    *,
    round_number: int,
    model_version: str,
    promoted: bool,
    gate_reason: str,
    revised_dice: float,
    other_dice: float,
    attention_ml: float,
    cases_to_review: int,
    seconds: Mapping[str, float | None],
    **extra: Any,
) -> dict[str, Any]:
    """One rounds.json row (`ROW_KEYS` first, then ``extra``); NaN is written as null."""
    return {
        "round": int(round_number),
        "model_version": model_version,
        "promoted": bool(promoted),
        "gate_reason": gate_reason,
        "revised_dice": _num(revised_dice, 4),
        "other_dice": _num(other_dice, 4),
        "attention_ml": _num(attention_ml, 2),
        "cases_to_review": int(cases_to_review),
        "seconds": {k: _num(v, 2) for k, v in seconds.items()},
        **extra,
    }


def write_rounds(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` as a JSON list to ``path`` atomically (temp file, fsync, rename): a reader
    or a killed writer never sees a half-written file."""
    atomic_write(Path(path), (json.dumps(list(rows), indent=2, allow_nan=False) + "\n").encode())


def format_table(rows: Sequence[Mapping[str, Any]], stages: Sequence[str] | None = None) -> str:
    """The rows as a fixed-width text table (seconds per stage as ``<stage>_s`` columns)."""
    if stages is None:
        stages = list(dict.fromkeys(k for r in rows for k in r.get("seconds", {})))

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    head = ["round", "model_version", "promoted", "revised_dice", "other_dice", "attention_ml", "cases_to_review"]
    head += [f"{s}_s" for s in stages]
    body = [[cell(r.get(k)) for k in head[:7]] + [cell(r.get("seconds", {}).get(s)) for s in stages] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    for r in rows:
        if r.get("gate_reason"):
            lines.append(f"round {r['round']}: gate {str(r['gate_reason'])[:160]}")
    return "\n".join(lines)
