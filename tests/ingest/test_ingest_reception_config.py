"""Reception settings of the ingest SCP, checked with dcmtk's echoscu/storescu against the real
service (subprocess): accepted calling AE titles (others rejected at association with the
standard reason), C-ECHO, the association limit, and a late instance after assembly opening
version 2 of the series."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from atlasflow.common.clients import sync_channel
from atlasflow.ingest.identity import atlas_id
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.testing import peers

REPO = Path(__file__).resolve().parents[2]


def echoscu(port: int, aet: str, aec: str = "ATLASFLOW") -> subprocess.CompletedProcess:
    exe = shutil.which("echoscu")
    assert exe, "dcmtk echoscu is required"
    return subprocess.run(
        [exe, "-v", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
        env=dict(os.environ, TCP_NODELAY="1"),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def ingest(tmp_path_factory):
    with peers.IngestProcess(
        tmp_path_factory.mktemp("ingest"),
        env={"ACCEPTED_CALLING_AETS": "MODALITY1,PACS2", "MAX_ASSOCIATIONS": "1", "ACSE_TIMEOUT_S": "1"},
    ) as proc:
        # The start-up port probe (a TCP connect + close) holds the only association slot
        # until the ACSE timer (ARTIM) frees it: wait for that.
        deadline = time.monotonic() + 15
        while echoscu(proc.dicom_port, "MODALITY1").returncode != 0:
            assert time.monotonic() < deadline, "association slot never freed"
            time.sleep(0.3)
        yield proc


def test_c_echo_from_an_accepted_calling_ae(ingest):
    for aet in ("MODALITY1", "PACS2"):
        r = echoscu(ingest.dicom_port, aet)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Received Echo Response (Success)" in r.stdout + r.stderr


def test_unknown_calling_ae_is_rejected_at_association(ingest):
    r = echoscu(ingest.dicom_port, "WRONG")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    # PS3.8 A-ASSOCIATE-RJ: rejected-permanent, source service-user, reason 3
    assert "Association Rejected" in out and "Calling AE Title Not Recognized" in out, out
    # the called AE title is checked too
    r = echoscu(ingest.dicom_port, "MODALITY1", aec="NOTUS")
    assert r.returncode != 0 and "Called AE Title Not Recognized" in r.stdout + r.stderr


def test_association_limit(ingest):
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + 10
    # earlier tests' (rejected) associations may still hold the one slot for a moment
    while not (held := ae.associate("127.0.0.1", ingest.dicom_port, ae_title="ATLASFLOW")).is_established:
        assert time.monotonic() < deadline, "no association slot"
        time.sleep(0.2)
    try:
        r = echoscu(ingest.dicom_port, "PACS2")
        out = r.stdout + r.stderr
        assert r.returncode != 0
        assert "Association Rejected" in out and "Local Limit Exceeded" in out, out
    finally:
        held.release()
    # the slot is free again once the released acceptor thread has ended (moments)
    deadline = time.monotonic() + 10
    while (r := echoscu(ingest.dicom_port, "PACS2")).returncode != 0:
        assert "Local Limit Exceeded" in r.stdout + r.stderr and time.monotonic() < deadline, r
        time.sleep(0.2)


def test_late_instance_after_assembly_opens_version_2(ingest, tmp_path):
    files = peers.build_ct_series(tmp_path / "s", 4, seed="late")
    first = peers.storescu(files[:3], ingest.dicom_port, aet="MODALITY1")
    assert first.returncode == 0, first.stderr[-2000:]
    series_id = atlas_id("ser", peers.bench_uid("late", "series"))
    with sync_channel(ingest.target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        v1 = stub.CommitSeries(ingest_pb2.CommitSeriesRequest(series_id=series_id), timeout=60).series
        assert (v1.version, v1.state, v1.instance_count) == (1, ingest_pb2.SERIES_STATE_ASSEMBLED, 3)
        assert list(v1.geometry.shape)[2] == 3
        late = peers.storescu(files[3:], ingest.dicom_port, aet="PACS2")
        assert late.returncode == 0, late.stderr[-2000:]
        v2 = stub.GetSeries(ingest_pb2.GetSeriesRequest(series_id=series_id), timeout=10).series
        assert (v2.version, v2.state, v2.instance_count) == (2, ingest_pb2.SERIES_STATE_RECEIVING, 4)
        v2 = stub.CommitSeries(ingest_pb2.CommitSeriesRequest(series_id=series_id), timeout=60).series
        assert (v2.version, v2.state) == (2, ingest_pb2.SERIES_STATE_ASSEMBLED)
        assert list(v2.geometry.shape)[2] == 4
        assert v2.volume.digest != v1.volume.digest  # version 1's volume is not changed


def test_no_accepted_calling_ae_configured_refuses_every_peer(tmp_path):
    """Deny by default: with ACCEPTED_CALLING_AETS empty (the setting's default) no calling AE
    title associates, whatever it is."""
    with peers.IngestProcess(tmp_path, env={"ACCEPTED_CALLING_AETS": ""}) as proc:
        for aet in ("STORESCU", "ATLASFLOW", "ANY"):
            r = echoscu(proc.dicom_port, aet)
            assert r.returncode != 0
            assert "Calling AE Title Not Recognized" in r.stdout + r.stderr


def test_below_the_disk_floor_new_data_is_refused_not_acknowledged(tmp_path):
    """Free-disk floor (common.disk.DiskFloor): with the floor above the disk's free space,
    C-STORE answers 0xA700 (Out of Resources) and the gRPC upload RESOURCE_EXHAUSTED DISK_FULL;
    nothing is stored, so the sender keeps the data and retries later."""
    from atlasflow.ingest.client import UploadError, send_files

    files = peers.build_ct_series(tmp_path / "s", 2, seed="disk-full")
    huge_mb = str(shutil.disk_usage(tmp_path).free // (1024 * 1024) + 10**6)
    with peers.IngestProcess(tmp_path / "ingest", env={"MIN_FREE_DISK_MB": huge_mb}) as proc:
        r = peers.storescu(files, proc.dicom_port)
        assert "Refused: OutOfResources" in r.stdout + r.stderr, r.stdout + r.stderr  # dcmtk's name of 0xA700
        assert peers.acknowledged_files(r.stdout + r.stderr) == []
        with pytest.raises(UploadError) as err:
            send_files(files, proc.target, resumable=False)
        assert err.value.reason == "DISK_FULL"
        with sync_channel(proc.target) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            assert list(stub.ListSeries(ingest_pb2.ListSeriesRequest(), timeout=10).series) == []
