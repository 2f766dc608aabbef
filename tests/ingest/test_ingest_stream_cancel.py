"""A client that stops a StreamSeriesInstances early (cancels it after the first message, or
drops the iterator) leaves the ingest service running: its audited stream is closed in the
call's own task (the audit records each call with the caller's peer) and the next call works.
Before, the interceptors' generators were finalised after the call had ended and the audit read
the ended call's peer: ingest died with a segfault in grpc's cygrpc.
Every such call keeps its audit record: a cancel that reached the call while its record was
being written withdrew the write (queued for a worker thread) and the record was lost."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest

from atlasflow.common.audit import AuditLog, AuditQuery
from atlasflow.common.audit_server import AuditInterceptor, AuditRecorder
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


def _records(ch: grpc.Channel, principal: str, want: int) -> list[audit_pb2.AuditRecord]:
    """The StreamSeriesInstances records of ``principal``, waiting up to 30 s for ``want``."""
    deadline = time.monotonic() + 30
    while True:
        records = [
            r
            for r in audit_pb2_grpc.AuditServiceStub(ch)
            .ListAuditRecords(
                audit_pb2.ListAuditRecordsRequest(page_size=1000),
                metadata=auth.metadata("admin", principal),
                timeout=30,
            )
            .records
            if r.method == STREAM and r.principal == principal
        ]
        if len(records) >= want or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_a_cancel_after_the_last_message_loses_no_record(ingest, tmp_path):
    """A client that cancels as soon as it has the last message: the cancel reaches the call while
    the interceptor writes its record (the status is sent after it). The write was withdrawn when
    it was still queued for a worker thread: 7-11 of 40 such calls had no record (quiet and loaded
    machine), a PHI read without an audit record."""
    calls = 20
    with grpc.insecure_channel(ingest.target) as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        request = ingest_pb2.StreamSeriesInstancesRequest(series_id=_upload(stub, tmp_path))
        for _ in range(calls):
            call = stub.StreamSeriesInstances(request, metadata=auth.metadata("admin", "late-canceller"), timeout=60)
            ends = 0
            with contextlib.suppress(grpc.RpcError):  # CANCELLED, or OK when the status came first
                for msg in call:
                    ends += msg.last_chunk
                    if ends == 3:
                        call.cancel()
            assert ends == 3
        records = _records(ch, "late-canceller", calls)
    assert ingest.proc is not None and ingest.proc.poll() is None
    assert len(records) == calls, ingest.log_text()[-3000:]
    assert {r.outcome for r in records} <= {"CANCELLED", "OK"}, records


class _Context:
    """The parts of a grpc.aio servicer context the audit interceptor reads."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def peer_identities(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def code(self) -> None:
        return None


def test_a_cancel_during_the_audit_write_loses_no_record(tmp_path):
    """The client's cancel can reach the call while its record is being written (the handler has
    sent everything; the status is not sent yet). Under load the write can still be queued for a
    worker thread then: the cancellation withdrew it and the record of a PHI read was lost. Here the
    worker threads are held busy so the write is queued when the cancel comes, every time."""
    log = AuditLog(tmp_path / "audit.sqlite3")
    recorder = AuditRecorder(log, "ingest")

    async def handler(request, context):
        yield b"instance"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(max_workers=1)
        loop.set_default_executor(pool)
        details = SimpleNamespace(method=STREAM)

        async def continuation(_details):
            return grpc.unary_stream_rpc_method_handler(handler)

        wrapped = await AuditInterceptor(recorder).intercept_service(continuation, details)
        assert wrapped is not None and wrapped.unary_stream is not None
        sent = asyncio.Event()
        release = threading.Event()

        async def call() -> None:
            async for _ in wrapped.unary_stream(None, _Context()):
                sent.set()
                pool.submit(release.wait, 30)  # the worker is busy when the record is written

        task = asyncio.create_task(call())
        await sent.wait()
        for _ in range(20):  # let the call reach the (queued) write of its record
            await asyncio.sleep(0)
        task.cancel()  # the client's cancel arrives now
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(lambda: None)  # the queue is drained

    asyncio.run(main())
    records, _ = log.list(AuditQuery(), 10)
    log.close()
    assert [(r.method, r.outcome) for r in records] == [(STREAM, "OK")]
