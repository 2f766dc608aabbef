"""A client that stops a StreamSeriesInstances early (cancels it after the first message, or
drops the iterator) leaves the ingest service running: its audited stream is closed in the
call's own task (the audit records each call with the caller's peer) and the next call works.
Before, the interceptors' generators were finalised after the call had ended and the audit read
the ended call's peer: ingest died with a segfault in grpc's cygrpc."""

from __future__ import annotations

import gc
import hashlib
import time

import grpc
import pytest

from atlasflow.common.v1 import audit_pb2, audit_pb2_grpc
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.testing import auth, peers

STREAM = "/atlasflow.ingest.v1.IngestService/StreamSeriesInstances"


@pytest.fixture(scope="module")
def ingest(tmp_path_factory):
    with peers.IngestProcess(tmp_path_factory.mktemp("ingest")) as proc:
        yield proc


def _upload(stub: ingest_pb2_grpc.IngestServiceStub, tmp_path) -> str:
    files = peers.build_ct_series(tmp_path / "ct", 3, seed="stream-cancel")

    def requests():
        for f in files:
            data = f.read_bytes()
            yield ingest_pb2.UploadInstancesRequest(
                client_ref=f.name, chunk=data, last_chunk=True, sha256=hashlib.sha256(data).hexdigest()
            )

    resp = stub.UploadInstances(requests(), metadata=auth.metadata("admin"), timeout=60)
    return resp.receipts[0].series_id


def test_cancelled_streams_leave_ingest_running(ingest, tmp_path):
    admin = auth.metadata("admin", "canceller")
    with grpc.insecure_channel(ingest.target) as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        series_id = _upload(stub, tmp_path)
        request = ingest_pb2.StreamSeriesInstancesRequest(series_id=series_id)
        for i in range(4):
            call = stub.StreamSeriesInstances(request, metadata=admin, timeout=60)
            first = next(call)
            assert first.instance_index == 0 and first.instance_count == 3
            if i % 2 == 0:
                call.cancel()
                with pytest.raises(grpc.RpcError) as err:
                    list(call)
                assert err.value.code() == grpc.StatusCode.CANCELLED
            else:  # a client that drops the stream without reading on
                del call
                gc.collect()
            time.sleep(0.5)  # the server ends the cancelled call
            assert ingest.proc is not None and ingest.proc.poll() is None, ingest.log_text()[-3000:]
        # the service still answers, the whole stream included
        whole = list(stub.StreamSeriesInstances(request, metadata=admin, timeout=60))
        assert sum(m.last_chunk for m in whole) == 3
        assert ingest.proc.poll() is None
        # each cancelled stream is audited as such, with the caller and its peer
        deadline = time.monotonic() + 30
        while True:
            records = [
                r
                for r in audit_pb2_grpc.AuditServiceStub(ch)
                .ListAuditRecords(audit_pb2.ListAuditRecordsRequest(page_size=1000), metadata=admin, timeout=30)
                .records
                if r.method == STREAM and r.principal == "canceller"
            ]
            if len(records) >= 5 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    # one record per call; a stream the server had finished sending before the client's cancel
    # reached it ends OK (three small instances can all be in flight), so both outcomes are right
    assert len(records) == 5, records
    assert {r.outcome for r in records} <= {"CANCELLED", "OK"}, records
    assert all(r.peer for r in records)
