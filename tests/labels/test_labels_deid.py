"""De-identification (DICOM PS3.15 Annex E) of exports on REAL series: dcmqi's 3-slice CT
(GE, with a patient module, accession number, protocol name and GE private groups) and
dicom2nifti's Siemens header (birth date, device serial number, sequence name).

Every attribute of Table E.1-1 present in a source is checked against its action, in the
de-identified source header and in the DICOM SEG built from it; the exported AbdomenAtlas
files (manifest, NIfTI headers, SEG) are grepped for the source identifiers.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import re
from datetime import date, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.metrics import Metrics
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.labels.case_seg import build_case_seg
from atlasflow.labels.deid import (
    DATES_FULL,
    DATES_MODIFIED,
    DATES_REMOVED,
    DeidOptions,
    Pseudonymizer,
    deidentify,
    ensure_key_file,
    patient_key,
    row_of,
    table,
    table_rows,
)
from atlasflow.labels.export_jobs import ExportOptions
from atlasflow.labels.repository import Provenance
from atlasflow.labels.sqlite import SqliteLabelRepository
from atlasflow.labels.worker import Exporter
from atlasflow.testing.data import TEST_DATA

CT3 = TEST_DATA / "dcmqi/data/segmentations/ct-3slice"
SIEMENS = TEST_DATA / "dicom2nifti_ct_headers/tests/data/failing/gantrytilting/001/IM-0001-0001.dcm"
KEY = b"k" * 32
OPTION_SETS = [
    DeidOptions(),
    DeidOptions(DATES_MODIFIED, clean_descriptors=True),
    DeidOptions(DATES_FULL),
]


def _sources() -> list[pydicom.Dataset]:
    """The 3 real instances; their empty SpecificCharacterSet (a trap of the data: highdicom
    refuses it) is removed, which means the same (the default repertoire)."""
    out = []
    for p in sorted(CT3.glob("*.dcm")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if not ds.get("SpecificCharacterSet"):
            del ds.SpecificCharacterSet
        out.append(ds)
    return out


def _walk(ds: pydicom.Dataset, path: tuple = ()):
    """(path of tags, element) of every element, nested items included."""
    for elem in ds:
        yield (*path, int(elem.tag)), elem
        if elem.VR == "SQ":
            for n, item in enumerate(elem.value):
                yield from _walk(item, (*path, int(elem.tag), n))


def _get(ds: pydicom.Dataset, path: tuple):
    """The element at `path` in `ds`, or None."""
    cur = ds
    for step in path[:-1]:
        if isinstance(step, int) and step in cur if isinstance(cur, pydicom.Dataset) else False:
            cur = cur[step].value
        elif isinstance(cur, pydicom.sequence.Sequence):
            if step >= len(cur):
                return None
            cur = cur[step]
        else:
            return None
    return cur.get(path[-1]) if isinstance(cur, pydicom.Dataset) else None


def _values(elem) -> list[str]:
    v = elem.value
    if isinstance(v, (list, pydicom.multival.MultiValue)):
        return [str(x) for x in v]
    return [] if v in (None, "") else [str(v)]


def _expected_shift(src: pydicom.Dataset, pseudo: Pseudonymizer) -> timedelta:
    return timedelta(days=pseudo.date_shift_days(patient_key(src)))


def _check(src: pydicom.Dataset, out: pydicom.Dataset, pseudo: Pseudonymizer, options: DeidOptions) -> set[int]:
    """Assert every source attribute follows its table action in `out`; return the table
    tags checked."""
    patient = pseudo.patient(patient_key(src))
    shift = _expected_shift(src, pseudo)
    identifiers = {
        "".join(_values(src[t])).strip() for t in ("PatientName", "PatientID", "AccessionNumber") if t in src
    } - {""}
    checked = set()
    for path, elem in _walk(src):
        tag = path[-1]
        got = _get(out, path)
        if pydicom.tag.Tag(tag).is_private or tag & 0xFFFF == 0:
            assert got is None, f"{pydicom.tag.Tag(tag)} private or group length kept"
            continue
        row = row_of(tag)
        if row is None:
            if elem.VR != "SQ" and len(path) == 1 and tag >> 16 != 0x0012:
                assert got is not None and got.value == elem.value, f"{elem.keyword} not in the table: kept"
            continue
        checked.add(tag)
        action = row.action(options)
        where = f"{elem.keyword or pydicom.tag.Tag(tag)} ({action})"
        if elem.VR == "SQ":
            if action == "X":
                assert got is None, where
            continue
        if action == "X":
            assert got is None, where
        elif action == "K":
            assert got is not None and got.value == elem.value, where
        elif action in ("Z", "X/Z"):
            assert got is not None, where
            assert _values(got) in ([], [patient]), where
        elif action in ("D", "Z/D", "X/D", "X/Z/D"):
            assert got is not None, where
            if elem.VR == "UI":
                assert _values(got) == [pseudo.uid(v) for v in _values(elem)], where
            elif tag == 0x00100020:
                assert str(got.value) == patient, where
            else:
                assert not set(_values(elem)) & set(_values(got)) or not _values(elem), where
        elif action in ("U", "X/Z/U*"):
            assert got is not None and _values(got) == [pseudo.uid(v) for v in _values(elem)], where
            assert not set(_values(elem)) & set(_values(got)), where
        elif action == "C":
            assert got is not None, where
            if elem.VR in ("DA", "DT") and _values(elem):
                assert options.dates == DATES_MODIFIED
                for a, b in zip(_values(elem), _values(got)):
                    d = date(int(a[:4]), int(a[4:6]), int(a[6:8])) - shift
                    assert b == d.strftime("%Y%m%d") + a[8:], where
            elif elem.VR in ("TM",):
                assert got.value == elem.value, where
            else:
                text = " ".join(_values(got))
                assert not [i for i in identifiers if i.lower() in text.lower()], where
                assert not re.search(r"\d{8}", text), where
        else:
            raise AssertionError(f"unknown action {action} of {where}")
    return checked


def _check_markers(out: pydicom.Dataset, options: DeidOptions) -> None:
    assert out.PatientIdentityRemoved == "YES"
    codes = [(i.CodeValue, i.CodingSchemeDesignator) for i in out.DeidentificationMethodCodeSequence]
    assert codes[0] == ("113100", "DCM")
    assert ("113107", "DCM") in codes if options.dates == DATES_MODIFIED else ("113107", "DCM") not in codes
    assert ("113106", "DCM") in codes if options.dates == DATES_FULL else ("113106", "DCM") not in codes
    assert (("113105", "DCM") in codes) == options.clean_descriptors
    assert (
        out.LongitudinalTemporalInformationModified
        == {
            DATES_REMOVED: "REMOVED",
            DATES_MODIFIED: "MODIFIED",
            DATES_FULL: "UNMODIFIED",
        }[options.dates]
    )
    assert out.DeidentificationMethod


# ------------------------------------------------------------------ the table


def test_the_table_is_the_standards():
    doc = table()
    assert doc["standard"] == "DICOM PS3.15 2024b" and "Permission is hereby granted" in doc["licence"]
    rows = table_rows()
    assert len(rows) == 620  # 621 rows, the private-attributes row handled apart
    actions = {r.basic for r in rows}
    assert actions == {"X", "D", "U", "Z", "X/D", "X/Z", "X/Z/D", "Z/D", "X/Z/U*"}
    by_tag = {r.tag: r for r in rows}
    assert by_tag[0x00100010].basic == "Z"  # Patient's Name
    assert by_tag[0x00080050].basic == "Z"  # Accession Number
    assert by_tag[0x0020000D].basic == "U"  # Study Instance UID
    assert by_tag[0x00080020].action(DeidOptions(DATES_MODIFIED)) == "C"  # Study Date
    assert by_tag[0x00080020].action(DeidOptions(DATES_FULL)) == "K"
    assert by_tag[0x00181030].action(DeidOptions(clean_descriptors=True)) == "C"  # Protocol Name
    assert row_of(0x60023000) is not None and row_of(0x60033000) is None  # overlay groups even only


# ------------------------------------------------------------------ every attribute, real headers


@pytest.mark.parametrize("options", OPTION_SETS, ids=["basic", "modified+clean", "full"])
@pytest.mark.parametrize("source", ["ge", "siemens"])
def test_every_table_attribute_of_a_real_header(source, options):
    src = _sources()[0] if source == "ge" else pydicom.dcmread(SIEMENS, stop_before_pixels=True)
    pseudo = Pseudonymizer(KEY)
    out = deidentify(copy.deepcopy(src), pseudo, options)
    checked = _check(src, out, pseudo, options)
    assert len(checked) >= (16 if source == "ge" else 15), sorted(hex(t) for t in checked)
    assert not [e for _, e in _walk(out) if e.tag.is_private]
    _check_markers(out, options)
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=False)
    data = buf.getvalue()
    for ident in (src.PatientName, src.PatientID, src.StudyInstanceUID, src.get("AccessionNumber", "")):
        if str(ident) and str(ident) != "dicom2nifti":  # the Siemens file's id is also its ProtocolName-like text
            assert str(ident).encode() not in data


def _labels_on(sources: list[pydicom.Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """A liver block on the sources' own grid: (X, Y, Z) RAS labels + affine
    (i = column, j = row, k = slice in z order)."""
    ordered = sorted(sources, key=lambda d: float(d.ImagePositionPatient[2]))
    rs, cs = (float(v) for v in ordered[0].PixelSpacing)
    x0, y0, z0 = (float(v) for v in ordered[0].ImagePositionPatient)
    dz = float(ordered[1].ImagePositionPatient[2]) - z0
    affine = np.array([[-cs, 0, 0, -x0], [0, -rs, 0, -y0], [0, 0, dz, z0], [0, 0, 0, 1]])
    labels = np.zeros((int(ordered[0].Columns), int(ordered[0].Rows), len(ordered)), np.uint8)
    labels[100:300, 150:350, :] = 5
    labels[320:360, 200:260, 1] = 8
    return labels, affine


@pytest.mark.parametrize("options", OPTION_SETS, ids=["basic", "modified+clean", "full"])
def test_the_seg_follows_the_table_and_references_the_pseudonyms(options):
    sources = _sources()
    labels, affine = _labels_on(sources)
    pseudo = Pseudonymizer(KEY)
    seg, data, outcome = build_case_seg(
        lambda _d: _sources(),  # fresh: the SEG may share elements with the headers it was built from
        "sha256:x",
        to_nifti_bytes(labels, affine),
        Provenance("ai", model_version="trio-v1"),
        "v-1",
        deid=(pseudo, options),
    )
    assert outcome.state == "WRITTEN" and data is not None, outcome
    back = pydicom.dcmread(io.BytesIO(data))
    # every attribute of the source's patient/study identity that the SEG carries follows the table
    src = sources[0]
    for path, elem in _walk(src):
        if len(path) != 1 or pydicom.tag.Tag(path[0]).is_private:
            continue
        got = back.get(path[0])
        row = row_of(path[0])
        if row is None or got is None:
            continue
        action = row.action(options)
        if action == "X":
            raise AssertionError(f"{elem.keyword} should be removed")
        if action in ("U",) and elem.VR == "UI":
            if elem.keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
                assert got.value == pseudo.uid(elem.value), elem.keyword
            assert got.value != elem.value
        if elem.keyword in ("PatientName", "PatientID"):
            assert str(got.value) == pseudo.patient(patient_key(src))
        if elem.keyword in ("AccessionNumber", "StudyID", "ReferringPhysicianName"):
            assert got.value in ("", None), elem.keyword
        # dates the SEG copies from the source (its own Series/Content dates are its creation's)
        if elem.keyword in ("StudyDate", "PatientBirthDate") and _values(elem) and _values(got):
            if options.dates == DATES_FULL:
                assert got.value == elem.value, elem.keyword
            else:
                assert got.value != elem.value, elem.keyword
            if options.dates == DATES_MODIFIED:
                d = date.fromisoformat(f"{elem.value[:4]}-{elem.value[4:6]}-{elem.value[6:8]}")
                assert got.value == (d - _expected_shift(src, pseudo)).strftime("%Y%m%d")
    # every UID the SEG holds is a pseudonym; the references are the pseudonymised sources
    originals = {str(e.value) for s in sources for _, e in _walk(s) if e.VR == "UI"}
    for _, e in _walk(back):
        if e.VR == "UI" and e.keyword not in ("SOPClassUID", "ReferencedSOPClassUID"):
            assert str(e.value) not in originals or str(e.value).startswith("1.2.840.10008"), e.keyword
    refs = sorted(
        str(i.ReferencedSOPInstanceUID) for s in back.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence
    )
    assert refs == sorted(pseudo.uid(s.SOPInstanceUID) for s in sources)
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == pseudo.uid(src.SeriesInstanceUID)
    for frame in back.PerFrameFunctionalGroupsSequence:
        for der in frame.DerivationImageSequence:
            for s in der.SourceImageSequence:
                assert s.ReferencedSOPInstanceUID in refs
    assert not [e for _, e in _walk(back) if e.tag.is_private]
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    _check_markers(back, options)
    for ident in ("JANCT000", "99000", "03086212", src.StudyInstanceUID, src.SeriesInstanceUID):
        assert ident.encode() not in data, ident


def test_pseudonyms_are_stable_per_key_and_patient():
    a, b = _sources()[:2]  # two instances of one patient
    p, other = Pseudonymizer(KEY), Pseudonymizer(b"x" * 32)
    one = deidentify(copy.deepcopy(a), p, DeidOptions(DATES_MODIFIED))
    two = deidentify(copy.deepcopy(b), p, DeidOptions(DATES_MODIFIED))
    again = deidentify(copy.deepcopy(a), p, DeidOptions(DATES_MODIFIED))  # a second export
    assert one.PatientID == two.PatientID == again.PatientID
    assert one.StudyInstanceUID == two.StudyInstanceUID == again.StudyInstanceUID
    assert one.SOPInstanceUID == again.SOPInstanceUID != two.SOPInstanceUID
    assert one.StudyDate == two.StudyDate == again.StudyDate != a.StudyDate  # one shift per patient
    keyed = deidentify(copy.deepcopy(a), other, DeidOptions(DATES_MODIFIED))
    assert keyed.PatientID != one.PatientID and keyed.StudyInstanceUID != one.StudyInstanceUID
    assert keyed.StudyDate != one.StudyDate
    assert len(p.uid(a.SOPInstanceUID)) <= 64 and p.uid(a.SOPInstanceUID).startswith("2.25.")


def test_key_file_is_created_private(tmp_path):
    path = ensure_key_file(tmp_path / "state" / "deid.key")
    assert path.stat().st_mode & 0o777 == 0o600
    first = path.read_bytes()
    assert ensure_key_file(path).read_bytes() == first  # kept, never regenerated
    assert Pseudonymizer.from_file(path).uid("1.2.3") == Pseudonymizer.from_file(path).uid("1.2.3")


# ------------------------------------------------------------------ the written export


def _export(tmp_path: Path, options: ExportOptions, pseudo: Pseudonymizer | None) -> tuple[Path, str]:
    """Export one case whose id is derived from the real study UID, with a stored CT whose
    NIfTI header carries the patient's name (descrip, aux_file, intent_name)."""
    sources = _sources()
    labels, affine = _labels_on(sources)
    blobs = LocalBlobStore(tmp_path / "blobs")
    repo = SqliteLabelRepository(tmp_path / "labels.sqlite")
    img = nib.Nifti1Image(np.zeros(labels.shape, np.int16), affine)
    img.header["descrip"] = b"JANCT000 99000"
    img.header["aux_file"] = b"03086212"
    img.header.set_intent("none", name="JANCT000")
    ct = blobs.put(gzip.compress(img.to_bytes()))
    import hashlib

    case_id = "case-" + hashlib.sha256(sources[0].StudyInstanceUID.encode()).hexdigest()[:20]  # ingest's case id
    repo.create_version(
        case_id,
        blobs.put(to_nifti_bytes(labels, affine)),
        ct,
        Provenance("ai", model_version="trio-v1"),
        "r1",
        organs=(5, 8),
        shape=labels.shape,
        affine=affine,
    )
    out = tmp_path / "out"
    job = repo.create_export_job([], out.as_uri(), options=options.to_dict())
    Exporter(repo, blobs, Metrics("labels"), sources=lambda _d: sources, pseudonymizer=pseudo).run_job(job)
    done = repo.get_export_job(job.job_id)
    repo.close()
    assert done.state == "SUCCEEDED", done.error_reason
    return out, case_id


def _all_bytes(root: Path) -> bytes:
    chunks = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            chunks.append(gzip.decompress(data) if p.name.endswith(".gz") else data)
        chunks.append(str(p.relative_to(root)).encode())
    return b"\n".join(chunks)


@pytest.mark.parametrize("dates", [DATES_REMOVED, DATES_MODIFIED])
def test_deidentified_export_carries_no_source_identifier(tmp_path, dates):
    src = _sources()[0]
    pseudo = Pseudonymizer(KEY)
    options = ExportOptions(include_dicom_seg=True, deid=DeidOptions(dates))
    out, case_id = _export(tmp_path, options, pseudo)
    data = _all_bytes(out)
    identifiers = [
        str(src.PatientName),
        str(src.PatientID),
        str(src.AccessionNumber),
        src.StudyInstanceUID,
        src.SeriesInstanceUID,
        src.SOPInstanceUID,
        src.FrameOfReferenceUID,
        case_id,  # derived from the study UID by an unkeyed hash
        case_id.removeprefix("case-"),
    ]
    for ident in identifiers:
        assert ident.encode() not in data, ident
    (case_dir,) = [p for p in out.iterdir() if p.is_dir()]
    assert case_dir.name == pseudo.case(case_id)
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["cases"]
    assert entry["case"] == entry["case_id"] == pseudo.case(case_id)
    assert entry["dicom_seg"]["case_id"] == pseudo.case(case_id) and entry["dicom_seg"]["state"] == "WRITTEN"
    assert manifest["deidentification"]["identified"] is False
    assert manifest["deidentification"]["codes"][0] == "113100"
    hdr = nib.load(case_dir / "ct.nii.gz").header
    assert [hdr[k].tobytes().rstrip(b"\x00") for k in ("descrip", "aux_file", "intent_name")] == [b"", b"", b""]
    seg = pydicom.dcmread(case_dir / "dicom_seg/seg.dcm")
    assert seg.PatientID == pseudo.patient(patient_key(src)) and seg.PatientIdentityRemoved == "YES"


def test_identified_export_keeps_identity(tmp_path):
    src = _sources()[0]
    out, case_id = _export(tmp_path, ExportOptions(include_dicom_seg=True, identified=True), None)
    seg = pydicom.dcmread(out / case_id / "dicom_seg/seg.dcm")
    assert (str(seg.PatientName), seg.PatientID, seg.StudyInstanceUID) == (
        str(src.PatientName),
        src.PatientID,
        src.StudyInstanceUID,
    )
    assert json.loads((out / "manifest.json").read_text())["deidentification"] == {"identified": True}


def test_deidentified_export_without_a_key_fails_the_job(tmp_path):
    with pytest.raises(AssertionError, match="DEID_NOT_CONFIGURED"):
        _export(tmp_path, ExportOptions(), None)


# ------------------------------------------------------------------ the request's checks


class _Context:
    """The servicer reads only the call's metadata (no token: authentication disabled)."""

    def invocation_metadata(self):
        return ()


def test_export_without_export_dir_is_refused_and_audited(tmp_path):
    import asyncio

    from atlasflow.common.errors import FailedPrecondition
    from atlasflow.labels.servicer import LabelServicer
    from atlasflow.labels.v1 import labels_pb2

    repo = SqliteLabelRepository(tmp_path / "labels.sqlite")
    blobs = LocalBlobStore(tmp_path / "blobs")
    servicer = LabelServicer(repo, blobs, Exporter(repo, blobs, Metrics("labels")), export_root=None)
    request = labels_pb2.ExportDatasetRequest(destination_uri=(tmp_path / "out").as_uri())
    with pytest.raises(FailedPrecondition) as e:
        asyncio.run(servicer.ExportDataset(request, _Context()))
    assert e.value.reason == "EXPORT_NOT_CONFIGURED"
    records, _ = repo.list_audit_records("", "", 10, "")
    assert [(r.method, r.outcome) for r in records] == [("ExportDataset", "EXPORT_NOT_CONFIGURED")]
    assert not (tmp_path / "out").exists()
    repo.close()


@pytest.mark.parametrize("roles", [frozenset(), frozenset({"service"}), frozenset({"reviewer", "annotator"})])
def test_identified_export_needs_admin_in_the_handler(roles):
    from atlasflow.common.errors import PermissionDenied
    from atlasflow.labels.servicer import check_export_allowed

    with pytest.raises(PermissionDenied) as e:
        check_export_allowed(ExportOptions(identified=True), roles)
    assert e.value.reason == "IDENTIFIED_EXPORT_NOT_ALLOWED"
    check_export_allowed(ExportOptions(identified=True), frozenset({"admin"}))
    check_export_allowed(ExportOptions(), roles)  # de-identified: the policy table decides
