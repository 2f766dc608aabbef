"""DICOM SEG export on the real 20-slice TotalSegmentator series (JPEG 2000, empty UIDs)
with its TotalSegmentator labels mapped to the atlas organs: frames land on the right source
instances (highdicom round trip, against a hand-derived mapping and the CT's HU), refusal when
the grid differs, and C-STORE to dcmtk's storescp."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import highdicom as hd
import numpy as np
import pydicom
import pytest

from atlasflow.common.errors import FailedPrecondition
from atlasflow.common.nifti import from_nifti_bytes
from atlasflow.common.organs import ORGAN_IDS
from atlasflow.labels.dicom_seg import export_dicom_seg, frames_from_volume, send_c_store
from atlasflow.labels.repository import Provenance
from atlasflow.labels.totalseg import totalseg_to_atlas
from atlasflow.testing.data import TEST_DATA

REF = TEST_DATA / "totalsegmentator/tests/reference_files"


@pytest.fixture(scope="module")
def series():
    """(datasets with UIDs given, atlas labels (512, 512, 20), affine, HU frames per instance)."""
    files = sorted((REF / "example_ct_dicom").iterdir())
    study, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    datasets = []
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.SOPInstanceUID == ""  # the data's trap: UIDs present but empty
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        datasets.append(ds)
    hu = {
        ds.SOPInstanceUID: ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        for ds in datasets
    }
    seg, affine = from_nifti_bytes((REF / "example_seg_dicom.nii.gz").read_bytes())
    return datasets, totalseg_to_atlas(seg), affine, hu


def _expected_frame(labels, ds):
    """Hand-derived for this series: NIfTI i = DICOM column, j = 511 - row, k = slice index
    counted from z = -804.5 mm in 2 mm steps."""
    k = int(round((float(ds.ImagePositionPatient[2]) + 804.5) / 2.0))
    return labels[:, ::-1, k].T


def test_frames_match_hand_derived_mapping(series):
    datasets, labels, affine, _ = series
    frames = frames_from_volume(labels, affine, datasets)
    assert frames.shape == (20, 512, 512)
    for ds, frame in zip(datasets, frames):
        assert np.array_equal(frame, _expected_frame(labels, ds))


def test_seg_round_trip_lands_on_the_right_instances(series, tmp_path):
    datasets, labels, affine, hu = series
    prov = {o: Provenance("ai", model_version="trio-v1") for o in range(1, 10)}
    prov[ORGAN_IDS["liver"]] = Provenance("radiologist", reviewer="dr-a")
    seg = export_dicom_seg(datasets, labels, affine, provenance=prov, organ_versions={5: "v-liver"})
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    back = hd.seg.segread(path)
    present = sorted(int(o) for o in np.unique(labels) if o)
    descs = {int(d.SegmentNumber): d for d in back.SegmentSequence}
    assert [descs[n].SegmentLabel for n in sorted(descs)] == [{v: k for k, v in ORGAN_IDS.items()}[o] for o in present]
    liver_no = present.index(5) + 1
    assert descs[liver_no].SegmentAlgorithmType == "MANUAL"
    assert "v-liver" in descs[liver_no].TrackingID
    spleen_no = present.index(8) + 1
    assert descs[spleen_no].SegmentAlgorithmType == "AUTOMATIC"
    assert descs[spleen_no].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "trio-v1"
    referenced = {ds.SOPInstanceUID for ds in datasets}
    refs = {i.ReferencedSOPInstanceUID for s in back.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert refs <= referenced and len(refs) == 20
    uids = [ds.SOPInstanceUID for ds in datasets]
    got = back.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=list(range(1, len(present) + 1)),
        combine_segments=True,
        relabel=False,
    )
    lut = np.zeros(16, np.uint8)
    for n, o in enumerate(present, start=1):
        lut[n] = o
    means = {}
    for ds, frame in zip(datasets, got):
        want = _expected_frame(labels, ds)
        assert np.array_equal(lut[frame], want), ds.InstanceNumber
    for organ in ("liver", "spleen", "aorta"):
        vals = np.concatenate([hu[ds.SOPInstanceUID][lut[f] == ORGAN_IDS[organ]] for ds, f in zip(datasets, got)])
        means[organ] = float(vals.mean())
    print("mean HU inside the SEG masks on the source pixels:", means)
    # portal-venous CT (README: liver ~89, spleen ~80, aorta ~177 HU): wrong flips fail this
    assert 70 < means["liver"] < 110 and 60 < means["spleen"] < 100
    assert 140 < means["aorta"] < 220


def _shifted(affine, **kw):
    a = affine.copy()
    if "tilt" in kw:
        t = np.deg2rad(kw["tilt"])
        rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        a[:3, :3] = rot @ a[:3, :3]
    return a


@pytest.mark.parametrize(
    "case,problem",
    [
        ("tilt", "OFF_GRID"),  # gantry-tilt corrected volume
        ("filled", "SLICES"),  # a filled (interpolated) slice: 21 slices for 20 frames
        ("resampled_z", "SLICES"),  # resampled to 1 mm slices (frames hit every 2nd)
        ("half_voxel", "OFF_GRID"),  # shifted by half a voxel
        ("cropped", "OUT_OF_VOLUME"),  # in-plane crop
        ("missing", "SLICES"),  # one source frame not in the volume
    ],
)
def test_refused_when_grid_differs(series, case, problem):
    datasets, labels, affine, _ = series
    lab, aff, dss = labels, affine.copy(), datasets
    if case == "tilt":
        aff = _shifted(affine, tilt=5)
    elif case == "filled":
        lab = np.concatenate([labels, labels[:, :, -1:]], axis=2)
    elif case == "resampled_z":
        aff[2, 2] = 1.0
        lab = np.repeat(labels, 2, axis=2)
    elif case == "half_voxel":
        aff[0, 3] += 0.5 * 0.9765625
    elif case == "cropped":
        lab = labels[10:-10]
        aff[:3, 3] = affine[:3, :3] @ [10, 0, 0] + affine[:3, 3]
    elif case == "missing":
        dss = datasets[:-1]
    with pytest.raises(FailedPrecondition) as e:
        export_dicom_seg(dss, lab, aff, provenance=Provenance("ai"))
    assert e.value.reason == "GRID_DIFFERS_FROM_SOURCE"
    assert e.value.metadata["problem"] == problem


def test_c_store_to_storescp(series, tmp_path):
    datasets, labels, affine, _ = series
    seg = export_dicom_seg(datasets, labels, affine, organs=[5, 8], provenance=Provenance("ai", model_version="m"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "pacs"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-od", str(out), "-aet", "PACS", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        t0 = time.perf_counter()
        status = send_c_store(seg, "127.0.0.1", port, called_ae="PACS")
        print(f"C-STORE of a {len(seg.PixelData)} byte SEG: {time.perf_counter() - t0:.3f} s")
        assert status == 0x0000
    finally:
        proc.terminate()
        proc.wait(10)
    received = list(out.iterdir())
    assert len(received) == 1
    got = pydicom.dcmread(received[0])
    assert got.SOPInstanceUID == seg.SOPInstanceUID
    assert got.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert [s.SegmentLabel for s in got.SegmentSequence] == ["liver", "spleen"]
    assert got.PixelData == seg.PixelData
