"""A call refused for a bad id (INVALID_ARGUMENT ``INVALID_ID``, `atlasflow.common.ids`) before
its handler is a probe: it is recorded like a refused token (action ``auth``, the caller, the
peer, outcome and reason), through the same per-peer throttle, on a real server from
`build_server` with a token check and the service's audit recorder."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from atlasflow.common.audit import AUTH, AuditLog, AuditQuery, RefusalThrottle
from atlasflow.common.audit_server import AuditRecorder
from atlasflow.common.auth import TokenVerifier
from atlasflow.common.metrics import Metrics
from atlasflow.common.server import BuiltServer, build_server, error_info_of
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.testing import auth


class _Servicer(ranking_pb2_grpc.RankingServiceServicer):
    async def GetWorklistItem(self, request, context):  # noqa: ANN001, ANN201
        return ranking_pb2.GetWorklistItemResponse(item=ranking_pb2.WorklistItem(case_id=request.case_id, rank=1))


@pytest.fixture()
def running(tmp_path: Path) -> Iterator[tuple[BuiltServer, AuditLog]]:
    log = AuditLog(tmp_path / "audit.sqlite3")
    recorder = AuditRecorder(log, "ranking", RefusalThrottle(limit=3))
    loop = asyncio.new_event_loop()

    def register(server: grpc.aio.Server) -> list[str]:
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(_Servicer(), server)
        return ["atlasflow.ranking.v1.RankingService"]

    async def start() -> BuiltServer:
        built = build_server(
            register=register,
            metrics=Metrics("ranking"),
            port=0,
            verifier=TokenVerifier(auth.issuer().config()),
            on_refusal=recorder.refused,
        )
        built.on_stop.append(recorder.close)
        await built.server.start()
        return built

    built = loop.run_until_complete(start())
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        yield built, log
    finally:
        asyncio.run_coroutine_threadsafe(built.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


def test_a_bad_id_is_recorded_as_a_refusal_and_a_flood_is_aggregated(running: tuple[BuiltServer, AuditLog]) -> None:
    built, log = running
    token = auth.metadata("reviewer", subject="dr-probe")
    with grpc.insecure_channel(f"127.0.0.1:{built.port}") as ch:
        stub = ranking_pb2_grpc.RankingServiceStub(ch)
        assert stub.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id="c1"), metadata=token).item.rank == 1
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id="../../etc/passwd"), metadata=token)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info_of(err.value).reason == "INVALID_ID"
    single = [r for r in log.scan(AuditQuery()) if r.reason == "INVALID_ID"]
    assert len(single) == 3  # the throttle's limit here; the other 2 wait for the minute's aggregate
    rec = single[0]
    assert (rec.action, rec.outcome, rec.principal, rec.roles) == (AUTH, "INVALID_ARGUMENT", "dr-probe", ("reviewer",))
    assert rec.method == "/atlasflow.ranking.v1.RankingService/GetWorklistItem"
    assert rec.peer.startswith("ipv4:127.0.0.1:") or rec.peer.startswith("ipv6:")
    assert rec.targets == ()  # the bad value itself is not stored


def test_the_aggregate_is_written_when_the_server_stops(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.sqlite3")
    recorder = AuditRecorder(log, "ranking", RefusalThrottle(limit=1))

    async def run() -> None:
        def register(server: grpc.aio.Server) -> list[str]:
            ranking_pb2_grpc.add_RankingServiceServicer_to_server(_Servicer(), server)
            return ["atlasflow.ranking.v1.RankingService"]

        built = build_server(
            register=register,
            metrics=Metrics("ranking"),
            port=0,
            verifier=TokenVerifier(auth.issuer().config()),
            on_refusal=recorder.refused,
        )
        built.on_stop.append(recorder.close)
        await built.server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{built.port}") as ch:
            stub = ranking_pb2_grpc.RankingServiceStub(ch)
            for _ in range(4):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.GetWorklistItem(
                        ranking_pb2.GetWorklistItemRequest(case_id="a/b"), metadata=auth.metadata("reviewer")
                    )
        await built.stop(0)

    asyncio.run(run())
    reopened = AuditLog(tmp_path / "audit.sqlite3")
    try:
        rows = list(reopened.scan(AuditQuery()))
        assert len([r for r in rows if r.reason == "INVALID_ID"]) + sum(r.suppressed for r in rows) == 4
        assert any(r.reason == "REFUSALS_AGGREGATED" for r in rows)
    finally:
        reopened.close()
