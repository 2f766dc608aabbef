"""`atlasflow send DIR` on TotalSegmentator's example series, whose Study/Series/SOP Instance UIDs
are empty: refused with MISSING_UID and a hint without --assign-uids; with it, stable UIDs are
derived on the client, the 20 slices form one series that assembles, and a second run is all
duplicates (same UIDs)."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pydicom

from atlasflow.common.clients import sync_channel
from atlasflow.ingest.client import derive_uids
from atlasflow.ingest.identity import atlas_id
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.testing import peers

REPO = Path(__file__).resolve().parents[2]
SERIES = peers.EXAMPLE_CT_DICOM


def _send(target: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(peers.PYTHON), "-m", "atlasflow.cli.main", "send", str(SERIES), "--target", target, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_derived_uids_are_stable_and_shared_by_the_series():
    files = sorted(SERIES.iterdir())
    assert len(files) == 20
    originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in files[:3]]
    assert all(not ds.SOPInstanceUID and not ds.SeriesInstanceUID for ds in originals)
    a = [pydicom.dcmread(io.BytesIO(derive_uids(p.read_bytes()))) for p in files[:3]]
    b = pydicom.dcmread(io.BytesIO(derive_uids(files[0].read_bytes())))
    assert b.SOPInstanceUID == a[0].SOPInstanceUID  # stable across runs
    assert len({ds.SOPInstanceUID for ds in a}) == 3
    assert len({ds.SeriesInstanceUID for ds in a}) == 1 and len({ds.StudyInstanceUID for ds in a}) == 1
    assert all(ds.SOPInstanceUID.startswith("2.25.") and len(ds.SOPInstanceUID) <= 64 for ds in a)
    assert a[0].file_meta.MediaStorageSOPInstanceUID == a[0].SOPInstanceUID
    assert a[0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    # pixel data untouched (still JPEG 2000, same bytes)
    assert a[0].PixelData == pydicom.dcmread(files[0]).PixelData
    # an instance that has UIDs is not rewritten
    assert derive_uids(derive_uids(files[0].read_bytes())) == derive_uids(files[0].read_bytes())


def test_send_refuses_missing_uids_then_assigns_them(tmp_path):
    with peers.IngestProcess(tmp_path / "ingest") as ingest:
        refused = _send(ingest.target)
        assert refused.returncode == 1
        assert "MISSING_UID" in refused.stderr and "--assign-uids" in refused.stderr, refused.stderr

        ok = _send(ingest.target, "--assign-uids", "--commit")
        assert ok.returncode == 0, ok.stderr
        assert "20 instances durable (0 duplicates" in ok.stdout
        series_uid = pydicom.dcmread(
            io.BytesIO(derive_uids(sorted(SERIES.iterdir())[0].read_bytes()))
        ).SeriesInstanceUID
        with sync_channel(ingest.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            s = stub.GetSeries(ingest_pb2.GetSeriesRequest(series_id=atlas_id("ser", series_uid)), timeout=10).series
        assert s.instance_count == 20 and s.state in (
            ingest_pb2.SERIES_STATE_ASSEMBLED,
            ingest_pb2.SERIES_STATE_DISPATCHED,
        )
        assert list(s.geometry.shape) == [512, 512, 20]

        # same derived UIDs, same bytes: the completed uploads answer with their receipts,
        # nothing new is stored and no new version opens
        again = _send(ingest.target, "--assign-uids")
        assert again.returncode == 0 and "20 instances durable" in again.stdout, again
        with sync_channel(ingest.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            s2 = stub.GetSeries(ingest_pb2.GetSeriesRequest(series_id=s.series_id), timeout=10).series
        assert (s2.version, s2.instance_count, s2.conflict_count) == (1, 20, 0)
