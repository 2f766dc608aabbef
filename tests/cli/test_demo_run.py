"""The quick start's main job, `atlasflow demo`, end to end (real Triton, four services): it
exits 0, ranks the case, runs one simulated review round whose confirmed organ leaves the
priority, exports the AbdomenAtlas layout plus a DICOM SEG that references every source
instance, and renders the montage."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import highdicom
import nibabel as nib
import numpy as np
import pydicom

from atlasflow.labels.deid import Pseudonymizer

REPO = Path(__file__).resolve().parents[2]


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "atlasflow.cli.main", "demo", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = run.stdout
    assert "Ranked worklist (1 case(s)" in text
    m = re.search(r"priority ([0-9.]+) -> ([0-9.]+) \((\w+) decided by a human\), status REVISED", text)
    assert m, text[-2000:]
    assert float(m.group(2)) < float(m.group(1))
    (case,) = [p for p in (out / "export").iterdir() if p.is_dir()]
    ct = nib.load(case / "ct.nii.gz")
    labels = nib.load(case / "combined_labels.nii.gz")
    assert labels.shape == ct.shape and np.allclose(labels.affine, ct.affine, atol=1e-4)
    assert len(list((case / "segmentations").glob("*.nii.gz"))) == 9
    seg = highdicom.seg.segread(case / "dicom_seg" / "seg.dcm")
    sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (out / "dicom").glob("*.dcm")}
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }
    # the export is de-identified: the SEG references the sources' keyed pseudonyms (the key is
    # the labels service's, created in its data directory)
    pseudo = Pseudonymizer.from_file(out / "state" / "data" / "labels" / "deid.key")
    assert len(sources) == 112 and referenced == {pseudo.uid(uid) for uid in sources}
    assert seg.PatientIdentityRemoved == "YES"
    # the simulated reviewer's organ is a radiologist's decision in the manifest, and in the SEG
    # a MANUAL segment when the organ is present (a confirmed absence has no segment)
    organ = json.loads((out / "export" / "manifest.json").read_text())["cases"][0]["organs"][m.group(3)]
    assert organ["provenance"]["source"] == "radiologist" and organ["provenance"]["reviewer"] == "dr.demo"
    kinds = {s.SegmentLabel: s.SegmentAlgorithmType for s in seg.SegmentSequence}
    assert kinds.get(m.group(3)) == ("MANUAL" if organ["present"] else None)
    assert set(kinds.values()) <= {"MANUAL", "AUTOMATIC"}
    assert (out / "montage.png").stat().st_size > 10_000
