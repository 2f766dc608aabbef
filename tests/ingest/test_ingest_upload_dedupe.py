"""Duplicate detection across reception paths (C-STORE from dcmtk storescu and the gRPC upload).

The SCP stores pynetdicom's re-encoding of an instance (its own preamble and File Meta, and the
transfer syntax the peer negotiated); the gRPC path stores the sender's file. Both must be
recognised as the same instance (`atlasflow.ingest.identity.content_key`): sent both ways it is
stored once and counted as a duplicate; a different data set under the same SOP Instance UID is
a recorded conflict on either path, with the first instance kept.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from atlasflow.common.clients import sync_channel
from atlasflow.ingest.client import send_files
from atlasflow.ingest.identity import atlas_id
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.testing import peers

REPO = Path(__file__).resolve().parents[2]

N = 4


@pytest.fixture(scope="module")
def ingest(tmp_path_factory):
    with peers.IngestProcess(tmp_path_factory.mktemp("ingest")) as proc:
        yield proc


def _series(stub, seed: str) -> ingest_pb2.Series:
    sid = atlas_id("ser", peers.bench_uid(seed, "series"))
    return stub.GetSeries(ingest_pb2.GetSeriesRequest(series_id=sid), timeout=10).series


def _modified(path: Path, out: Path) -> Path:
    """Same SOP Instance UID, different content (a corrected WindowCenter)."""
    ds = pydicom.dcmread(path)
    ds.WindowCenter = 123
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize("first", ["c-store-implicit", "grpc"])
def test_same_instance_by_c_store_and_grpc_is_one_duplicate(ingest, tmp_path, first):
    seed = f"dedupe-{first}"
    files = peers.build_ct_series(tmp_path / "s", N, seed=seed)
    # -xi: storescu proposes Implicit VR Little Endian only and re-encodes the Explicit VR
    # files: the SCP receives other bytes than the files the gRPC client sends.
    cstore = lambda: peers.storescu(files, ingest.dicom_port, extra=["-xi"])  # noqa: E731
    grpc_send = lambda: send_files(files, ingest.target)  # noqa: E731
    with sync_channel(ingest.target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        if first == "grpc":
            receipts = grpc_send()
            assert [r.duplicate for r in receipts] == [False] * N
            result = cstore()
            assert result.returncode == 0, result.stderr[-2000:]
            assert len(peers.acknowledged_files(result.stdout + result.stderr)) == N
        else:
            result = cstore()
            assert result.returncode == 0, result.stderr[-2000:]
            receipts = grpc_send()
            assert [(r.duplicate, r.conflict) for r in receipts] == [(True, False)] * N
        s = _series(stub, seed)
        assert (s.instance_count, s.duplicate_count, s.conflict_count) == (N, N, 0)

        # Different content under an existing SOP Instance UID: a conflict on both paths.
        changed = _modified(files[0], tmp_path / "changed.dcm")
        (r,) = send_files([changed], ingest.target)
        assert (r.duplicate, r.conflict) == (False, True)
        result = peers.storescu([changed], ingest.dicom_port)
        assert result.returncode == 0, result.stderr[-2000:]
        s = _series(stub, seed)
        assert (s.instance_count, s.duplicate_count, s.conflict_count) == (N, N, 2)
