"""Ingest fast path: the spool record is the row's redo log, and content keys are lazy.

`IngestStore._record` commits an instance's row with synchronous=NORMAL (not flushed) because
its fdatasync'd spool record can re-create it: a power loss that takes committed-but-unflushed
rows away is simulated here by deleting the rows while the spool still holds the records.
Content keys are computed only for a SOP Instance UID that is already stored with other bytes,
from the stored bytes (spool or blob store) and the new instance.
"""

from __future__ import annotations

import io

import pydicom
import pytest
import sqlalchemy as sa

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.ingest.identity import content_key
from atlasflow.ingest.store import IngestStore

SEG = 2 * 1024 * 1024


def _dicom(window_center: float = 40.0, explicit: bool = True) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Modality = "CT"
    ds.WindowCenter = window_center
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 2, 2, 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(8)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _content_key(s: IngestStore) -> str:
    with s.db.read() as conn:
        return str(conn.execute(sa.text("SELECT content_key FROM instances")).scalar())


def test_rows_lost_after_acknowledgement_are_replayed_from_the_spool(tmp_path):
    blobs = LocalBlobStore(tmp_path / "blobs")
    s = IngestStore(tmp_path / "data", blobs, spool_segment_bytes=SEG)
    a = s.store_instance(b"A", "study", "series", "sop-1")
    s.store_instance(b"B", "study", "series", "sop-2")
    # Committed but never flushed rows vanish with a power loss: simulate by deleting them
    # (the spool segment is still there: nothing was drained).
    with s.lock, s.db.transaction() as conn:
        conn.execute(sa.text("DELETE FROM instances"))
        conn.execute(sa.text("DELETE FROM series_versions"))
    assert s.spool.segments()
    s.spool.seal()
    s.db.close()
    s2 = IngestStore(tmp_path / "data", blobs, spool_segment_bytes=SEG)
    sv = s2.get_series(a.series_id)
    assert (sv.version, sv.state, sv.instance_count) == (1, "RECEIVING", 2)
    assert sorted(blobs.get(d) for d in s2.instance_digests(a.series_id, 1)) == [b"A", b"B"]
    s2.close()


def test_first_reception_computes_no_content_key(tmp_path):
    s = IngestStore(tmp_path / "data", LocalBlobStore(tmp_path / "blobs"), spool_segment_bytes=SEG)
    calls = []
    s.store_instance(_dicom(), "1.2.3", "1.2.3.4", "1.2.3.4.5", key=lambda: calls.append(1) or "never")
    assert calls == []
    assert _content_key(s) == ""
    s.close()


@pytest.mark.parametrize("drained", [False, True], ids=["stored-in-spool", "stored-in-blobs"])
def test_same_content_other_bytes_is_a_duplicate_and_other_content_a_conflict(tmp_path, drained):
    s = IngestStore(tmp_path / "data", LocalBlobStore(tmp_path / "blobs"), spool_segment_bytes=SEG)
    first = _dicom(explicit=True)
    s.store_instance(first, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    if drained:
        assert s.spool_drain.drain() == 1
    same = _dicom(explicit=False)  # same data set, other encoding: other bytes
    assert same != first
    ds = pydicom.dcmread(io.BytesIO(same))
    r = s.store_instance(same, "1.2.3", "1.2.3.4", "1.2.3.4.5", key=lambda: content_key(ds))
    assert (r.duplicate, r.conflict) == (True, False)
    other = _dicom(window_center=123.0)
    r = s.store_instance(other, "1.2.3", "1.2.3.4", "1.2.3.4.5")  # key from the bytes
    assert (r.duplicate, r.conflict) == (False, True)
    assert s.conflict_count() == 1
    # the stored instance's key was computed once and kept on its row
    assert _content_key(s).startswith("sha256:")
    s.close()
