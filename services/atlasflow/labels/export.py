"""Dataset export in the AbdomenAtlas-8K layout (no grpc).

    <out_root>/manifest.json                       written last (the dataset is complete)
    <out_root>/<case>/ct.nii.gz                    the CT as stored (int16 HU), affine unchanged
    <out_root>/<case>/combined_labels.nii.gz       uint8, ids 0..9, the CT's affine
    <out_root>/<case>/segmentations/<organ>.nii.gz uint8 0/1 for ALL nine organs (even empty)
    <out_root>/<case>/dicom_seg/seg.dcm            DICOM SEG of the case (include_dicom_seg;
                                                   only when its grid is the source images')

<case> is the case's pseudonym in a de-identified export (the worker chooses it,
atlasflow.labels.deid), the CT is then written with a fresh header (`rewrite_ct_header`).

The files are written through an `atlasflow.labels.export_store.ExportDestination`: a local
directory (a case is written into a temporary sibling and renamed into place, so a crash never
leaves a half-written case) or an S3 prefix (one object per file); re-exporting a case
replaces it whole (idempotent), and the manifest is written last, so a dataset is complete
exactly when its manifest exists. `split_organs` is the array logic; `export_case` the I/O
around it; `manifest_bytes` / `write_manifest` the manifest. `destination_path` (from
export_store) checks where a job may write. The case's DICOM SEG file is
built by atlasflow.labels.case_seg; a job's options and per-case SEG outcomes are
atlasflow.labels.export_jobs. The export worker (atlasflow.labels.worker.Exporter) runs the jobs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from atlasflow.common.errors import InvalidArgument
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.organs import ORGANS
from atlasflow.labels.export_store import MANIFEST, ExportDestination, LocalDestination, destination_path
from atlasflow.labels.repository import LabelVersionRecord, Provenance
from atlasflow.labels.validate import validate_label_map

DOMAIN = "atlasflow.labels"
AI_MARKING = "AI-generated labels, research use"
UNTRAINED_WARNING = (
    "labels from untrained models (demo weights): not anatomically meaningful, do not use for training or clinical work"
)
LAYOUT = "AbdomenAtlas-8K v1.0"
_CASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SEG_FILE = "dicom_seg/seg.dcm"

__all__ = [
    "AI_MARKING",
    "SEG_FILE",
    "destination_path",
    "export_case",
    "manifest_bytes",
    "review_entry",
    "split_organs",
    "write_manifest",
]


def split_organs(combined: npt.NDArray[np.integer[Any]]) -> dict[int, npt.NDArray[np.uint8]]:
    """Per-organ binary masks of a combined label map.

    combined: (X, Y, Z) integer label map, ids 0..9. Returns {organ id: (X, Y, Z) uint8 0/1}
    for every id of `ORGANS` (all nine, empty masks included), mask == (combined == id).
    """
    return {oid: (combined == oid).astype(np.uint8) for oid in ORGANS}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _as_destination(out: Path | ExportDestination) -> ExportDestination:
    return LocalDestination(out) if isinstance(out, (str, Path)) else out


def export_case(
    out_root: Path | ExportDestination,
    case_name: str,
    ct_nifti: bytes,
    label_map_nifti: bytes,
    provenance: Provenance,
    version_id: str,
    *,
    organ_provenance: Mapping[int, Provenance] | None = None,
    organ_versions: Mapping[int, str] | None = None,
    case_id: str = "",
    dicom_seg: bytes | None = None,
    dicom_seg_outcome: Mapping[str, Any] | None = None,
    rewrite_ct_header: bool = False,
) -> dict[str, Any]:
    """Write one case in the AbdomenAtlas layout under `out_root/case_name` (a directory, or
    any `atlasflow.labels.export_store.ExportDestination`: an S3 prefix); return its manifest
    entry.

    ct_nifti: the CT blob's bytes (NIfTI, gzip or not; int16 HU expected), written as stored
    (gzip-compressed if it was not). label_map_nifti: combined label map NIfTI on the CT grid,
    ids 0..9. provenance: the version's provenance; `organ_provenance` overrides it per organ
    id (label assembly from several sources) and `organ_versions` names the version that
    decided each organ (manifest key "decided_in_version"). The entry lists the sha256 and size of every file,
    per-organ provenance, voxel counts and volumes (ml), and `marking` =
    "AI-generated labels, research use" when any organ's labels come from AI.
    dicom_seg: a DICOM SEG Part-10 file written as `<case>/dicom_seg/seg.dcm` (listed in
    "files"); dicom_seg_outcome: recorded as the entry's "dicom_seg" (see
    atlasflow.labels.export_jobs.SegOutcome), with
    the file's sha256 filled in.
    rewrite_ct_header: write the CT re-encoded with a fresh NIfTI header (same voxels, dtype
    and affine; descrip, aux_file, intent_name, db_name empty and no header extensions)
    instead of as stored: a de-identified export (nothing a source header put there leaves).

    Raises InvalidArgument("INVALID_CASE_NAME") for a name that is not a plain directory
    name, InvalidArgument("INVALID_LABEL_MAP") when the labels do not fit the CT.
    """
    if not _CASE_NAME.match(case_name) or case_name in (".", ".."):
        raise InvalidArgument(
            "INVALID_CASE_NAME",
            "case name must be 1-128 of [A-Za-z0-9._-], not starting with a dot or dash",
            domain=DOMAIN,
        )
    ct, ct_affine = from_nifti_bytes(ct_nifti)
    labels, label_affine = from_nifti_bytes(label_map_nifti)
    present = validate_label_map(labels, label_affine, ct.shape, ct_affine)
    combined = np.asarray(labels).astype(np.uint8)
    masks = split_organs(combined)

    if rewrite_ct_header:
        ct_bytes = to_nifti_bytes(np.asarray(ct), ct_affine)
    else:
        ct_bytes = ct_nifti if ct_nifti[:2] == b"\x1f\x8b" else gzip.compress(ct_nifti, 6, mtime=0)
    data: dict[str, bytes] = {"ct.nii.gz": ct_bytes, "combined_labels.nii.gz": to_nifti_bytes(combined, ct_affine)}
    for oid, mask in masks.items():
        data[f"segmentations/{ORGANS[oid]}.nii.gz"] = to_nifti_bytes(mask, ct_affine)
    if dicom_seg is not None:
        data[SEG_FILE] = dicom_seg
    _as_destination(out_root).write_case(case_name, data)
    files = {rel: {"sha256": _sha256(b), "size_bytes": len(b)} for rel, b in data.items()}

    voxel_ml = float(abs(np.linalg.det(ct_affine[:3, :3]))) / 1000.0
    organ_prov = dict(organ_provenance or {})
    organs: dict[str, Any] = {}
    for oid, mask in masks.items():
        prov = organ_prov.get(oid, provenance)
        voxels = int(mask.sum())
        organs[ORGANS[oid]] = {
            "label_id": oid,
            "present": oid in present,
            "voxels": voxels,
            "volume_ml": round(voxels * voxel_ml, 3),
            "provenance": prov.to_dict(),
        }
        if organ_versions and organ_versions.get(oid):
            organs[ORGANS[oid]]["decided_in_version"] = organ_versions[oid]
    effective = [organ_prov.get(oid, provenance) for oid in ORGANS]
    any_ai = any(p.source == "ai" for p in effective)
    any_untrained = any(p.source == "ai" and not p.weights_trained for p in effective)
    entry: dict[str, Any] = {
        "case": case_name,
        "case_id": case_id,
        "version_id": version_id,
        "provenance": provenance.to_dict(),
        "shape": [int(s) for s in ct.shape],
        "spacing_mm": [round(float(s), 6) for s in np.linalg.norm(ct_affine[:3, :3], axis=0)],
        "affine": [float(a) for a in np.asarray(ct_affine).ravel()],
        "ct_dtype": str(ct.dtype),
        "files": files,
        "organs": organs,
    }
    if dicom_seg_outcome is not None:
        seg_entry = dict(dicom_seg_outcome)
        if dicom_seg is not None:
            seg_entry.update(path=f"{case_name}/{SEG_FILE}", sha256=files[SEG_FILE]["sha256"])
        entry["dicom_seg"] = seg_entry
    if any_ai:
        entry["marking"] = AI_MARKING
    if any_untrained:
        entry["warning"] = UNTRAINED_WARNING
    return entry


def review_entry(chain: Sequence[LabelVersionRecord], version_id: str) -> dict[str, Any]:
    """The manifest's ``review`` entry of a case exported at `version_id`: the human time
    spent on it (the method's key figure, human minutes per case), summed over the versions of
    `chain` (the case's history, oldest first) up to and including `version_id`.

    ``minutes``: the reviewers' case time (LabelVersion.review_seconds) / 60; ``revisions``:
    radiologist versions; ``measured_revisions``: those with a time; ``organ_minutes``: organ
    name -> minutes (OrganRevision.review_seconds), for organs with a time.
    """
    seconds = 0.0
    organ_seconds: dict[int, float] = {}
    revisions = measured = 0
    for record in chain:
        if record.provenance.source == "radiologist":
            revisions += 1
        if record.review_seconds > 0 or record.organ_review_seconds:
            measured += 1
        seconds += record.review_seconds
        for oid, s in record.organ_review_seconds.items():
            organ_seconds[oid] = organ_seconds.get(oid, 0.0) + s
        if record.version_id == version_id:
            break
    return {
        "minutes": round(seconds / 60.0, 3),
        "revisions": revisions,
        "measured_revisions": measured,
        "organ_minutes": {ORGANS[o]: round(s / 60.0, 3) for o, s in sorted(organ_seconds.items())},
    }


def manifest_bytes(entries: Sequence[Mapping[str, Any]], *, deidentification: Mapping[str, Any] | None = None) -> bytes:
    """The manifest.json document listing `entries` sorted by case name.

    Top-level keys: layout, organs ({id: name}), deidentification (when given: how the export
    treats patient identity, atlasflow.labels.export_jobs.deid_manifest), marking (when any
    case carries one), cases."""
    cases = sorted((dict(e) for e in entries), key=lambda e: str(e.get("case", "")))
    doc: dict[str, Any] = {
        "layout": LAYOUT,
        "organs": {str(k): v for k, v in ORGANS.items()},
    }
    if deidentification is not None:
        doc["deidentification"] = dict(deidentification)
    doc["cases"] = cases
    if any("marking" in c for c in cases):
        doc["marking"] = AI_MARKING
    return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()


def write_manifest(
    out_root: Path, entries: Sequence[Mapping[str, Any]], *, deidentification: Mapping[str, Any] | None = None
) -> Path:
    """Write `out_root/manifest.json` (atomically, `manifest_bytes`); return its path."""
    LocalDestination(Path(out_root)).write_manifest(manifest_bytes(entries, deidentification=deidentification))
    return Path(out_root) / MANIFEST
