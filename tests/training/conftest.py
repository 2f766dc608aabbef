"""A real labels store (SQLite repository + blob store + LabelWriter) holding cases cut from the
TotalSegmentator example CT: an AI version per case (the reference labels, perturbed), then
radiologists' revisions of some organs (the reference mask = what a reviewer would draw)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.labels.repository import Provenance
from atlasflow.labels.sqlite import SqliteLabelRepository
from atlasflow.labels.totalseg import totalseg_to_atlas
from atlasflow.labels.writer import LabelWriter, MaskRevision

REF = Path(__file__).resolve().parents[1] / "data/totalsegmentator/tests/reference_files"
AI = Provenance("ai", model_version="abdomen-trio-v1", weights_trained=True)


@dataclass
class Store:
    root: Path
    repo: SqliteLabelRepository
    blobs: LocalBlobStore
    writer: LabelWriter
    reference: dict[str, np.ndarray]

    def add_ai_case(self, case_id: str, ct: np.ndarray, affine: np.ndarray, labels: np.ndarray) -> str:
        ct_d = self.blobs.put(to_nifti_bytes(ct.astype(np.int16), affine)).digest
        lm = self.blobs.put(to_nifti_bytes(labels.astype(np.uint8), affine)).digest
        return self.writer.create(case_id, lm, ct_d, AI, request_id=uuid.uuid4().hex).version_id

    def revise(self, case_id: str, organ: int, mask: np.ndarray, affine: np.ndarray, reviewer: str = "dr-a") -> str:
        head = self.repo.head(case_id)
        assert head is not None
        digest = self.blobs.put(to_nifti_bytes(mask.astype(np.uint8), affine)).digest
        rev = MaskRevision(organ, mask_digest=digest)
        return self.writer.revise(case_id, head.version_id, [rev], uuid.uuid4().hex, reviewer).version_id


def reference_ct() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU (X, Y, Z) int16, affine, AbdomenAtlas label map) of the example CT (3 mm, RAS)."""
    ct = nib.load(str(REF / "example_ct.nii.gz"))
    seg = nib.load(str(REF / "example_seg_fast_force_split.nii.gz"))
    return (
        np.asarray(ct.dataobj).astype(np.int16),
        np.asarray(ct.affine, dtype=np.float64),
        totalseg_to_atlas(np.asarray(seg.dataobj)),
    )


def perturb(labels: np.ndarray, organ: int, shift: int) -> np.ndarray:
    """The AI's mistake: ``organ`` shifted by ``shift`` voxels along x (other organs kept)."""
    out = labels.copy()
    out[out == organ] = 0
    moved = np.roll(labels == organ, shift, axis=0)
    out[moved & (out == 0)] = organ
    return out


def crop_case(z0: int, z1: int, x0: int = 0, x1: int = 10_000, y0: int = 0, y1: int = 10_000) -> tuple[np.ndarray, ...]:
    """A box of the example CT (voxel ranges), its affine and labels."""
    hu, affine, labels = reference_ct()
    aff = affine.copy()
    aff[:3, 3] = affine[:3, :3] @ np.array([x0, y0, z0]) + affine[:3, 3]
    box = np.s_[x0:x1, y0:y1, z0:z1]
    return hu[box], aff, labels[box]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Four cases (z slabs of the example CT). case-a: liver revised + spleen revised;
    case-b: liver revised; case-c: only AI; case-d: kidney_left revised (held out in tests; a 64^3 box around it, so
    that evaluating an ensemble on it takes one sliding window)."""
    root = tmp_path_factory.mktemp("labels")
    repo = SqliteLabelRepository(root / "labels.sqlite3")
    blobs = LocalBlobStore(root / "blobs")
    s = Store(root, repo, blobs, LabelWriter(repo, blobs), {})
    slabs = {"case-a": (40, 104), "case-b": (30, 94), "case-c": (20, 84), "case-d": (48, 112, 5, 69, 20, 84)}
    for case_id, box in slabs.items():
        hu, aff, labels = crop_case(*box)
        s.reference[case_id] = labels
        s.add_ai_case(case_id, hu, aff, perturb(labels, 5, 3))
    for case_id, organ in (("case-a", 5), ("case-a", 8), ("case-b", 5), ("case-d", 3)):
        _, aff, _ = crop_case(*slabs[case_id])
        s.revise(case_id, organ, s.reference[case_id] == organ, aff)
    return s


# The throwaway PostgreSQL 15 cluster of the labels tests (same fixtures, loaded from there).
def _labels_conftest():  # type: ignore[no-untyped-def]
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "labels_conftest_for_training", Path(__file__).resolve().parents[1] / "labels" / "conftest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_pg = _labels_conftest()
pg_server = _pg.pg_server
pg_database = _pg.pg_database
