"""AbdomenAtlas export on real data (TotalSegmentator example CT + its labels mapped to the
nine atlas organs), label-map validation and the TotalSegmentator mapping."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from atlasflow.common.errors import InvalidArgument
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.organs import ORGAN_IDS, ORGANS
from atlasflow.labels.export import AI_MARKING, export_case, split_organs, write_manifest
from atlasflow.labels.repository import Provenance
from atlasflow.labels.totalseg import TOTALSEG_V2_TO_ATLAS, totalseg_to_atlas
from atlasflow.labels.validate import validate_label_map
from atlasflow.testing.data import TEST_DATA

DATA = TEST_DATA / "totalsegmentator"
REF = DATA / "tests/reference_files"
AI = Provenance("ai", model_version="trio-v1", job_id="job-9", weights_trained=False)
RAD = Provenance("radiologist", reviewer="dr-b")


@pytest.fixture(scope="module")
def real_case():
    """(ct int16 HU (X, Y, Z), atlas labels uint8, affine) of example_ct + force_split seg."""
    ct, affine = from_nifti_bytes((REF / "example_ct.nii.gz").read_bytes())
    seg, seg_affine = from_nifti_bytes((REF / "example_seg_fast_force_split.nii.gz").read_bytes())
    assert np.allclose(affine, seg_affine)
    return ct.astype(np.int16), totalseg_to_atlas(seg), affine, seg


# ------------------------------------------------------------------ TotalSegmentator mapping


def test_mapping_matches_the_tsv():
    names = {}
    for line in (DATA / "labels_total_v2.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            i, name = line.split("\t")[:2]
            names[int(i)] = name
    for ts_id, (ts_name, atlas_name) in TOTALSEG_V2_TO_ATLAS.items():
        assert names[ts_id] == ts_name
        assert atlas_name in ORGAN_IDS
    assert sorted(a for _, a in TOTALSEG_V2_TO_ATLAS.values()) == sorted(ORGANS.values())


def test_totalseg_to_atlas_on_real_labels(real_case):
    _, atlas, _, seg = real_case
    assert atlas.dtype == np.uint8 and atlas.shape == seg.shape
    for ts_id, (_, atlas_name) in TOTALSEG_V2_TO_ATLAS.items():
        assert np.array_equal(atlas == ORGAN_IDS[atlas_name], seg == ts_id)
    unmapped = ~np.isin(seg, list(TOTALSEG_V2_TO_ATLAS))
    assert not atlas[unmapped].any()
    assert set(np.unique(atlas)) == set(range(10))  # all nine organs are in this CT


def test_totalseg_to_atlas_rejects_bad_ids():
    with pytest.raises(ValueError):
        totalseg_to_atlas(np.array([[[300]]]))
    with pytest.raises(ValueError):
        totalseg_to_atlas(np.array([[[1.5]]]))


# ------------------------------------------------------------------ validation

BASE_AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


@pytest.mark.parametrize(
    "labels,affine,problem",
    [
        (np.zeros((4, 4, 4), np.uint8), BASE_AFFINE, None),
        (np.full((4, 4, 4), 9, np.int16), BASE_AFFINE + 5e-5, None),
        (np.zeros((4, 4, 3), np.uint8), BASE_AFFINE, "SHAPE"),
        (np.zeros((4, 4), np.uint8), BASE_AFFINE, "SHAPE"),
        (np.zeros((4, 4, 4), np.uint8), BASE_AFFINE + np.eye(4) * 2e-4, "AFFINE"),
        (np.zeros((4, 4, 4), np.uint8), np.diag([-0.8, 0.8, 2.5, 1.0]), "AFFINE"),
        (np.full((4, 4, 4), 10, np.uint8), BASE_AFFINE, "VALUES"),
        (np.full((4, 4, 4), -1, np.int8), BASE_AFFINE, "VALUES"),
        (np.full((4, 4, 4), 1.5, np.float32), BASE_AFFINE, "DTYPE"),
        (np.full((4, 4, 4), "a"), BASE_AFFINE, "DTYPE"),
    ],
)
def test_validate_label_map(labels, affine, problem):
    if problem is None:
        present = validate_label_map(labels, affine, (4, 4, 4), BASE_AFFINE)
        assert present == tuple(int(v) for v in np.unique(labels) if v)
    else:
        with pytest.raises(InvalidArgument) as e:
            validate_label_map(labels, affine, (4, 4, 4), BASE_AFFINE)
        assert e.value.reason == "INVALID_LABEL_MAP"
        assert e.value.metadata["problem"] == problem


def test_split_organs_all_nine():
    combined = np.array([[[0, 1], [5, 5]]], np.uint8)
    masks = split_organs(combined)
    assert sorted(masks) == list(ORGANS)
    assert masks[5].sum() == 2 and masks[2].sum() == 0 and masks[1].dtype == np.uint8


# ------------------------------------------------------------------ export on real data


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_export_real_case(tmp_path, real_case):
    ct, atlas, affine, _ = real_case
    ct_bytes = to_nifti_bytes(ct, affine)  # what ingest stores: int16 HU, RAS affine
    lm_bytes = to_nifti_bytes(atlas, affine)
    entry = export_case(tmp_path, "AbdomenAtlas_0001", ct_bytes, lm_bytes, AI, "v-123", case_id="case-1")
    case = tmp_path / "AbdomenAtlas_0001"
    assert (case / "ct.nii.gz").read_bytes() == ct_bytes  # the CT as stored, byte for byte
    ct_img = nib.load(case / "ct.nii.gz")
    assert ct_img.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(ct_img.dataobj), ct)
    combined_img = nib.load(case / "combined_labels.nii.gz")
    assert combined_img.get_data_dtype() == np.uint8
    combined = np.asarray(combined_img.dataobj)
    assert np.array_equal(combined, atlas)
    assert np.array_equal(combined_img.affine, ct_img.affine)
    seg_files = sorted(p.name for p in (case / "segmentations").iterdir())
    assert seg_files == sorted(f"{n}.nii.gz" for n in ORGANS.values())
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    for oid, name in ORGANS.items():
        img = nib.load(case / "segmentations" / f"{name}.nii.gz")
        assert img.get_data_dtype() == np.uint8
        mask = np.asarray(img.dataobj)
        assert np.array_equal(mask, (combined == oid).astype(np.uint8))
        assert set(np.unique(mask)) <= {0, 1}
        assert np.array_equal(img.affine, ct_img.affine)
        organ = entry["organs"][name]
        assert organ["voxels"] == int((atlas == oid).sum()) and organ["present"]
        assert organ["volume_ml"] == pytest.approx(organ["voxels"] * voxel_ml, abs=1e-3)
        assert organ["provenance"]["source"] == "ai"
    # Liver of this CT: 41692 voxels of 27 mm^3 ~ 1126 ml, a plausible adult liver.
    assert 900 < entry["organs"]["liver"]["volume_ml"] < 2000
    on_disk = {str(p.relative_to(case)): _sha(p) for p in case.rglob("*.nii.gz")}
    assert {k: v["sha256"] for k, v in entry["files"].items()} == on_disk
    assert len(on_disk) == 11
    assert entry["marking"] == AI_MARKING and "warning" in entry  # untrained weights
    assert entry["version_id"] == "v-123" and entry["shape"] == list(ct.shape)
    assert entry["spacing_mm"] == [3.0, 3.0, 3.0]

    path = write_manifest(tmp_path, [entry])
    manifest = json.loads(path.read_text())
    assert manifest["cases"][0]["files"] == entry["files"]
    assert manifest["marking"] == AI_MARKING
    assert manifest["organs"]["5"] == "liver"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_export_empty_organs_and_radiologist(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    ct = np.full((5, 6, 7), -1000, np.int16)
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[1:3, 1:3, 1:3] = 5
    raw_ct = to_nifti_bytes(ct, affine, compress=False)  # stored uncompressed: gzip on export
    entry = export_case(tmp_path, "c1", raw_ct, to_nifti_bytes(labels, affine), RAD, "v1", organ_provenance={8: AI})
    case = tmp_path / "c1"
    assert gzip.decompress((case / "ct.nii.gz").read_bytes()) == raw_ct
    for oid, name in ORGANS.items():
        mask, _ = from_nifti_bytes((case / "segmentations" / f"{name}.nii.gz").read_bytes())
        assert mask.dtype == np.uint8 and mask.shape == ct.shape
        assert mask.sum() == (8 if oid == 5 else 0)
        assert entry["organs"][name]["present"] == (oid == 5)
    assert entry["organs"]["liver"]["provenance"]["source"] == "radiologist"
    assert entry["organs"]["spleen"]["provenance"]["source"] == "ai"
    assert entry["marking"] == AI_MARKING  # one organ's labels come from AI
    pure = export_case(tmp_path, "c2", raw_ct, to_nifti_bytes(labels, affine), RAD, "v2")
    assert "marking" not in pure and "warning" not in pure
    assert "marking" not in json.loads(write_manifest(tmp_path, [pure]).read_text())


def test_reexport_replaces_case(tmp_path):
    affine = np.eye(4)
    ct = to_nifti_bytes(np.zeros((3, 3, 3), np.int16), affine)
    first = np.zeros((3, 3, 3), np.uint8)
    second = np.ones((3, 3, 3), np.uint8)
    export_case(tmp_path, "c", ct, to_nifti_bytes(first, affine), AI, "v1")
    entry = export_case(tmp_path, "c", ct, to_nifti_bytes(second, affine), AI, "v2")
    got, _ = from_nifti_bytes((tmp_path / "c" / "combined_labels.nii.gz").read_bytes())
    assert np.array_equal(got, second) and entry["version_id"] == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "-x", "x" * 200])
def test_bad_case_names(tmp_path, name):
    ct = to_nifti_bytes(np.zeros((2, 2, 2), np.int16), np.eye(4))
    with pytest.raises(InvalidArgument) as e:
        export_case(tmp_path, name, ct, ct, AI, "v")
    assert e.value.reason == "INVALID_CASE_NAME"


def test_export_rejects_mismatched_labels(tmp_path):
    ct = to_nifti_bytes(np.zeros((2, 2, 2), np.int16), np.eye(4))
    lm = to_nifti_bytes(np.zeros((2, 2, 3), np.uint8), np.eye(4))
    with pytest.raises(InvalidArgument) as e:
        export_case(tmp_path, "c", ct, lm, AI, "v")
    assert e.value.reason == "INVALID_LABEL_MAP"
    assert not (tmp_path / "c").exists()
