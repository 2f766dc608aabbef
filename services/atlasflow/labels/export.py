"""Dataset export in the AbdomenAtlas-8K layout (no grpc).

    <out_root>/manifest.json
    <out_root>/<case>/ct.nii.gz                    the CT as stored (int16 HU), affine unchanged
    <out_root>/<case>/combined_labels.nii.gz       uint8, ids 0..9, the CT's affine
    <out_root>/<case>/segmentations/<organ>.nii.gz uint8 0/1 for ALL nine organs (even empty)
    <out_root>/<case>/dicom_seg/seg.dcm            DICOM SEG of the case (include_dicom_seg;
                                                   only when its grid is the source images')

<case> is the case's pseudonym in a de-identified export (the worker chooses it,
atlasflow.labels.deid), the CT is then written with a fresh header (`rewrite_ct_header`).

A case directory is written into a temporary sibling and renamed into place, so a crash never
leaves a half-written case and re-exporting a case replaces it whole (idempotent).
`split_organs` is the array logic; `export_case` the I/O around it; `write_manifest` writes
the manifest. `destination_path` checks where a job may write. The case's DICOM SEG file is
built by atlasflow.labels.case_seg; a job's options and per-case SEG outcomes are
atlasflow.labels.export_jobs. The export worker (atlasflow.labels.worker.Exporter) runs the jobs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import numpy.typing as npt

from atlasflow.common.errors import InvalidArgument
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.organs import ORGANS
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


def destination_path(uri: str, export_root: Path | None = None) -> Path:
    """The local directory of a file:// destination; inside `export_root` when one is set.

    InvalidArgument("INVALID_DESTINATION") unless `uri` is file:///absolute/dir without a
    query or fragment (labels.proto, ExportDatasetRequest.destination_uri);
    InvalidArgument("DESTINATION_NOT_ALLOWED") outside `export_root`.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path:
        raise InvalidArgument(
            "INVALID_DESTINATION",
            "destination_uri must be file:///absolute/dir in this deployment",
            domain=DOMAIN,
            metadata={"scheme": parsed.scheme[:20]},
        )
    if parsed.query or parsed.fragment or "?" in uri or "#" in uri:
        raise InvalidArgument(
            "INVALID_DESTINATION",
            "destination_uri must not carry a query or fragment",
            domain=DOMAIN,
            metadata={"field": "destination_uri"},
        )
    path = Path(unquote(parsed.path)).resolve()
    if export_root is not None and not path.is_relative_to(export_root):
        raise InvalidArgument(
            "DESTINATION_NOT_ALLOWED",
            "destination must lie inside the service's export directory",
            domain=DOMAIN,
            metadata={"export_dir": str(export_root)},
        )
    return path


def split_organs(combined: npt.NDArray[np.integer[Any]]) -> dict[int, npt.NDArray[np.uint8]]:
    """Per-organ binary masks of a combined label map.

    combined: (X, Y, Z) integer label map, ids 0..9. Returns {organ id: (X, Y, Z) uint8 0/1}
    for every id of `ORGANS` (all nine, empty masks included), mask == (combined == id).
    """
    return {oid: (combined == oid).astype(np.uint8) for oid in ORGANS}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": _sha256(data), "size_bytes": len(data)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_case(
    out_root: Path,
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
    """Write one case in the AbdomenAtlas layout under `out_root/case_name`; return its
    manifest entry.

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

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_root, prefix=f".{case_name}.tmp-"))
    files: dict[str, dict[str, Any]] = {}
    try:
        if rewrite_ct_header:
            ct_bytes = to_nifti_bytes(np.asarray(ct), ct_affine)
        else:
            ct_bytes = ct_nifti if ct_nifti[:2] == b"\x1f\x8b" else gzip.compress(ct_nifti, 6, mtime=0)
        files["ct.nii.gz"] = _write(tmp / "ct.nii.gz", ct_bytes)
        files["combined_labels.nii.gz"] = _write(tmp / "combined_labels.nii.gz", to_nifti_bytes(combined, ct_affine))
        for oid, mask in masks.items():
            rel = f"segmentations/{ORGANS[oid]}.nii.gz"
            files[rel] = _write(tmp / rel, to_nifti_bytes(mask, ct_affine))
        _fsync_dir(tmp / "segmentations")
        if dicom_seg is not None:
            files[SEG_FILE] = _write(tmp / SEG_FILE, dicom_seg)
            _fsync_dir(tmp / "dicom_seg")
        _fsync_dir(tmp)
        final = out_root / case_name
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=out_root, prefix=f".{case_name}.old-"))
            os.replace(final, old / "case")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(out_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

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


def write_manifest(
    out_root: Path, entries: Sequence[Mapping[str, Any]], *, deidentification: Mapping[str, Any] | None = None
) -> Path:
    """Write `out_root/manifest.json` (atomically) listing `entries` sorted by case name.

    Top-level keys: layout, organs ({id: name}), deidentification (when given: how the export
    treats patient identity, atlasflow.labels.export_jobs.deid_manifest), marking (when any
    case carries one), cases. Returns the manifest's path.
    """
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
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
    data = (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()
    fd, tmp = tempfile.mkstemp(dir=out_root, prefix=".manifest.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_root / "manifest.json")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(out_root)
    return out_root / "manifest.json"
