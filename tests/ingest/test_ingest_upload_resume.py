"""Resumable gRPC upload: a stream cut mid-instance (the call cancelled, then the server killed
and restarted) is continued at the server's committed offset; a wrong offset is refused with
OFFSET_MISMATCH and the expected offset; a completed upload is idempotent."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import grpc
import pytest

from atlasflow.common.clients import sync_channel
from atlasflow.common.server import error_info_of
from atlasflow.ingest.client import UploadStats, resumable_requests, send_files, upload_id_of
from atlasflow.ingest.identity import atlas_id
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.testing import auth, peers

REPO = Path(__file__).resolve().parents[2]

CHUNK = 64 * 1024
SENT_CHUNKS = 4  # of the second instance, before the cut


@pytest.fixture()
def ingest(tmp_path):
    with peers.IngestProcess(tmp_path / "ingest") as proc:
        yield proc


def _status(stub, upload_id: str):
    return stub.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=upload_id), timeout=10)


def test_cut_mid_instance_resumes_at_committed_offset(ingest, tmp_path):
    files = peers.build_ct_series(tmp_path / "s", 3, seed="resume")
    data = [p.read_bytes() for p in files]
    ids = [upload_id_of(d) for d in data]
    assert len(data[1]) > (SENT_CHUNKS + 2) * CHUNK
    hold = threading.Event()

    def cut_stream():
        yield from resumable_requests(files[0].name, data[0], ids[0], 0, CHUNK)
        for i, msg in enumerate(resumable_requests(files[1].name, data[1], ids[1], 0, CHUNK)):
            if i == SENT_CHUNKS:
                hold.wait(30)  # the stream stays open, mid-instance, until cancelled
                return
            yield msg

    with sync_channel(ingest.target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        call = stub.UploadInstances.future(cut_stream(), timeout=60)
        deadline = time.monotonic() + 20
        while True:
            try:
                if _status(stub, ids[1]).committed_offset == SENT_CHUNKS * CHUNK:
                    break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
            assert time.monotonic() < deadline, "chunks never became durable"
            time.sleep(0.05)
        call.cancel()
        hold.set()
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
        first = _status(stub, ids[0])
        assert first.complete and first.committed_offset == len(data[0])
        assert first.receipt.upload_id == ids[0] and not first.receipt.duplicate

    # the server dies too: the committed bytes survive a restart
    ingest.kill()
    ingest.start()
    with sync_channel(ingest.target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        st = _status(stub, ids[1])
        assert (st.complete, st.committed_offset) == (False, SENT_CHUNKS * CHUNK)
        with pytest.raises(grpc.RpcError) as err:
            stub.UploadInstances(
                iter(
                    [
                        ingest_pb2.UploadInstancesRequest(
                            client_ref="x", chunk=data[1][:CHUNK], upload_id=ids[1], offset=0
                        )
                    ]
                ),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.ABORTED
        info = error_info_of(err.value)
        assert info is not None and info.reason == "OFFSET_MISMATCH"
        assert info.metadata["expected_offset"] == str(SENT_CHUNKS * CHUNK)

        stats = UploadStats()
        receipts = send_files(files, ingest.target, chunk_bytes=CHUNK, stats=stats, retry_wait_s=0.05)
        assert [r.upload_id for r in receipts] == ids
        assert not any(r.duplicate or r.conflict for r in receipts)
        assert stats.resumed == 1 and stats.errors == [] and stats.streams == 1
        assert stats.recovered_receipts == 1  # the first instance, completed before the cut
        # the resumed stream sent only the rest of instance 2 (plus instance 3)
        assert stats.bytes_sent == len(data[1]) - SENT_CHUNKS * CHUNK + len(data[2])
        series = stub.GetSeries(
            ingest_pb2.GetSeriesRequest(series_id=atlas_id("ser", peers.bench_uid("resume", "series"))), timeout=10
        ).series
        assert (series.instance_count, series.duplicate_count, series.conflict_count) == (3, 0, 0)
        # the stored instance is byte-identical to the file (no hole, no duplicated chunk)
        st = _status(stub, ids[1])
        assert st.complete and st.committed_offset == len(data[1])

        # a completed upload is idempotent: same receipts, nothing stored again
        again = send_files(files, ingest.target, chunk_bytes=CHUNK)
        assert [(r.upload_id, r.duplicate, r.series_id) for r in again] == [
            (r.upload_id, r.duplicate, r.series_id) for r in receipts
        ]
        series = stub.GetSeries(ingest_pb2.GetSeriesRequest(series_id=series.series_id), timeout=10).series
        assert (series.instance_count, series.duplicate_count) == (3, 0)


def test_bad_checksum_discards_the_upload_and_plain_mode_still_works(ingest, tmp_path):
    files = peers.build_ct_series(tmp_path / "s", 2, seed="resume-plain")
    data = files[0].read_bytes()
    uid = upload_id_of(data)
    msgs = list(resumable_requests(files[0].name, data, uid, 0, CHUNK))
    msgs[-1].sha256 = hashlib.sha256(b"other").hexdigest()
    with sync_channel(ingest.target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.UploadInstances(iter(msgs), timeout=10)
        assert error_info_of(err.value).reason == "CHECKSUM_MISMATCH"
        with pytest.raises(grpc.RpcError) as err:
            _status(stub, uid)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            _status(stub, "bad id!")
        assert error_info_of(err.value).reason == "INVALID_UPLOAD_ID"
    receipts = send_files(files, ingest.target, resumable=False)
    assert [r.upload_id for r in receipts] == ["", ""]
    assert not any(r.duplicate for r in receipts)


def test_upload_without_token_or_with_a_reading_role_is_refused_and_stores_nothing(ingest, tmp_path):
    """The service the tests start really checks tokens (auth on): an upload with no token is
    UNAUTHENTICATED, one with a token whose role may not send (annotator) PERMISSION_DENIED;
    neither leaves a byte behind, and the same upload with a connector's token is accepted."""
    files = peers.build_ct_series(tmp_path / "s", 1, seed="resume-auth")
    data = files[0].read_bytes()
    uid = upload_id_of(data)
    msgs = list(resumable_requests(files[0].name, data, uid, 0, CHUNK))
    with grpc.insecure_channel(ingest.target) as channel:  # no token on purpose
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.UploadInstances(iter(msgs), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info_of(err.value).reason == "MISSING_TOKEN"
        with pytest.raises(grpc.RpcError) as err:
            stub.UploadInstances(iter(msgs), timeout=10, metadata=auth.metadata("annotator", subject="ann"))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info_of(err.value).reason == "ROLE_NOT_ALLOWED"
        connector = auth.metadata("connector", subject="gateway")
        with pytest.raises(grpc.RpcError) as err:
            stub.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=uid), timeout=10, metadata=connector)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        receipts = stub.UploadInstances(iter(msgs), timeout=10, metadata=connector).receipts
        assert [r.upload_id for r in receipts] == [uid] and not receipts[0].duplicate


def test_resumable_uploads_belong_to_their_caller(ingest, tmp_path):
    """Upload ids are per caller (the token's subject): connector B can neither see nor extend
    connector A's half-done upload, the same id from B is B's own upload, and A finishes its
    upload untouched; every answer names the client's own upload_id."""
    files = peers.build_ct_series(tmp_path / "s", 1, seed="owners")
    data = files[0].read_bytes()
    uid = upload_id_of(data)
    a, b = auth.metadata("connector", "pacs-a"), auth.metadata("connector", "pacs-b")
    half = list(resumable_requests(files[0].name, data, uid, 0, CHUNK))
    with sync_channel(ingest.target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        # A sends everything but the last message, then its stream is cut
        with pytest.raises(grpc.RpcError):
            stub.UploadInstances(iter(half[:-1] + [ingest_pb2.UploadInstancesRequest(client_ref="other")]), metadata=a)
        committed = stub.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=uid), metadata=a)
        assert committed.upload_id == uid and 0 < committed.committed_offset < len(data)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=uid), metadata=b)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info_of(err.value).metadata["upload_id"] == uid
        # B appending at A's offset is an offset mismatch on B's own (empty) upload
        with pytest.raises(grpc.RpcError) as err:
            stub.UploadInstances(iter(half[-1:]), metadata=b)
        assert error_info_of(err.value).reason == "OFFSET_MISMATCH"
        assert error_info_of(err.value).metadata["upload_id"] == uid
        # A resumes where it was and completes
        rest = list(resumable_requests(files[0].name, data, uid, committed.committed_offset, CHUNK))
        receipts = stub.UploadInstances(iter(rest), metadata=a).receipts
        assert [r.upload_id for r in receipts] == [uid]
        done = stub.GetUploadStatus(ingest_pb2.GetUploadStatusRequest(upload_id=uid), metadata=a)
        assert done.complete and done.receipt.upload_id == uid
