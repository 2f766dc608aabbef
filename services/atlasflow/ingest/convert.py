"""``atlasflow convert DICOM_DIR|FILE... OUT.nii[.gz]``: CT DICOM files on disk -> NIfTI (HU, RAS).

I/O edge of `atlasflow.ingest.assemble` (which holds the geometry and value policy). This module
is the command and its orchestration; the steps live in `atlasflow.ingest.scan` (1, with
`atlasflow.ingest.fastheader`), `atlasflow.ingest.grouping` (2), `atlasflow.ingest.assemble`
(3) and `atlasflow.ingest.nifti_writer` (4):

1. Scan: every file under the inputs (recursively; DICOMDIR and non-DICOM files are skipped
   with a note) is read header-only (pydicom ``defer_size``: pixel data stays on disk). Only
   CT images are kept: (0008,0016) SOPClassUID (or (0002,0002) when blank) CT Image, Enhanced
   CT or Legacy Converted Enhanced CT Storage; other objects (SEG, SR, other modalities) are
   skipped with a note. Each frame becomes a `frames.FrameRef` whose pixel reader re-opens
   the file: native little-endian pixel data is read straight from its file offset; compressed
   data is decoded by pydicom (+ pylibjpeg plugins), one frame at a time.
2. Group: by (0020,000E) SeriesInstanceUID. Files whose SeriesInstanceUID is EMPTY (e.g.
   de-identified exports) are grouped by (0020,0052) FrameOfReferenceUID + geometry (rows,
   columns, orientation, pixel spacing), with a warning. Within a series:
   * localizers ((0008,0008) ImageType containing LOCALIZER) are dropped with a note (a
     series made only of localizers is rejected: a scout is a projection, not a volume);
   * frames of different size / orientation / pixel spacing are split into separate volumes
     (warning ``split``), each converted on its own.
3. Assemble each group with policy `geometry.REPAIR`: gantry tilt resampled, missing slices
   filled, multi-frame read; repeated positions (time series) and irregular spacing rejected
   (see `atlasflow.ingest.assemble`). A group that fails prints ``error: ... [REASON/check]``
   and the others are still written.
4. Write NIfTI-1: one volume -> OUT; several -> OUT with ``_1``, ``_2``... before the
   extension (ordered by (0020,0011) SeriesNumber, then slice count). int16 HU (see assemble
   for int32/float32), the RAS+ affine in sform and qform (code 1), the array in DICOM order
   (i = columns, j = rows, k = slices along the normal; reorient with
   ``nibabel.as_closest_canonical`` to compare). The data is streamed from the volume's own
   buffer (no copy); ``.nii.gz`` uses ISA-L (PyPI ``isal``) level 1 when installed, else zlib
   level 1, in chunks. No nibabel import (start-up time).

Exit status: 0 all groups written; 1 some written, some failed; 2 nothing written (no CT,
every group failed, bad arguments). Messages never contain patient data (no names/IDs/UIDs).
Memory: the output array (once) + one decoded frame + per-frame header records.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from atlasflow.common.errors import AtlasflowError
from atlasflow.ingest.assemble import Volume, assemble_frames
from atlasflow.ingest.frames import series_error
from atlasflow.ingest.geometry import REPAIR, STRICT, Policy
from atlasflow.ingest.grouping import Group, group_frames
from atlasflow.ingest.nifti_writer import write_nifti
from atlasflow.ingest.scan import scan

if TYPE_CHECKING:
    pass


def output_paths(out: Path, count: int) -> list[Path]:
    """OUT for one volume; OUT_1, OUT_2... (before .nii / .nii.gz) for several."""
    if count == 1:
        return [out]
    name = out.name
    ext = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    stem = name[: -len(ext)]
    return [out.with_name(f"{stem}_{k}{ext}") for k in range(1, count + 1)]


# ---------------------------------------------------------------- conversion


@dataclass
class Converted:
    """One output: the volume and where it went (path None when it failed: see error)."""

    label: str
    path: Path | None
    volume: Volume | None
    notes: list[str]
    error: str = ""


def convert(inputs: list[Path], out: Path, policy: Policy = REPAIR, log: object = None) -> list[Converted]:
    """Convert every CT series under `inputs`; write OUT (or OUT_k). `log(str)` gets notes."""
    say = log if callable(log) else (lambda s: None)
    scanned = scan(inputs)
    for note in scanned.notes:
        say(note)
    groups, notes = group_frames(scanned.frames)
    for note in notes:
        say(note)
    if not groups:
        raise series_error("EMPTY_SERIES", "no CT image found in the input", check="count")
    results: list[Converted] = []
    volumes: list[tuple[Group, Volume]] = []
    for group in groups:
        try:
            volumes.append((group, assemble_frames(group.frames, policy)))
        except AtlasflowError as exc:
            check = exc.metadata.get("check", "")
            message = f"{group.label}: {exc.message} [{exc.reason}{'/' + check if check else ''}]"
            say("error: " + message)
            results.append(Converted(group.label, None, None, group.notes, message))
    for (group, volume), path in zip(volumes, output_paths(out, len(volumes))):
        used = write_nifti(path, volume.array, volume.affine)
        for note in group.notes:
            say(note)
        for w in volume.warnings:
            say(f"warning: {group.label}: {w}")
        zooms = np.linalg.norm(volume.affine[:3, :3], axis=0)
        say(
            f"{group.label}: wrote {path} ({'x'.join(map(str, volume.array.shape))} "
            f"{volume.array.dtype}, {zooms[0]:.4g}x{zooms[1]:.4g}x{zooms[2]:.4g} mm"
            f"{', gzip ' + used if used != 'none' else ''}"
            f"{', RESAMPLED (tilt-corrected or filled)' if volume.resampled else ''})"
        )
        results.append(Converted(group.label, path, volume, group.notes))
    return results


def main(argv: list[str] | None = None) -> int:
    """``atlasflow convert DICOM_DIR|FILE... OUT.nii[.gz]`` (see module doc for exit codes)."""
    parser = argparse.ArgumentParser(
        prog="atlasflow convert",
        description="CT DICOM series -> NIfTI (int16 HU, RAS+ affine); tilt resampled, "
        "missing slices filled, multi-frame read (see --strict).",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="DICOM_DIR_OR_FILE")
    parser.add_argument("out", type=Path, metavar="OUT.nii[.gz]")
    parser.add_argument(
        "--strict", action="store_true", help="reject gantry tilt, missing slices and multi-frame instead"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.out.name.endswith(".nii") or args.out.name.endswith(".nii.gz")):
        parser.error("OUT must end in .nii or .nii.gz")
    missing = [str(p) for p in args.inputs if not p.exists()]
    if missing:
        print(f"error: input not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    if not args.out.parent.is_dir():
        print(f"error: output directory does not exist: {args.out.parent}", file=sys.stderr)
        return 2

    def log(line: str) -> None:
        print(line, file=sys.stderr if line.startswith(("error", "warning")) else sys.stdout)

    try:
        results = convert(args.inputs, args.out, STRICT if args.strict else REPAIR, log)
    except AtlasflowError as exc:
        print(f"error: {exc.message} [{exc.reason}]", file=sys.stderr)
        return 2
    written = sum(r.path is not None for r in results)
    if written == 0:
        return 2
    return 0 if written == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
