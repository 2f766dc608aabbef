"""The shared server builder: health, reflection, ErrorInfo mapping, RED metrics, spans,
authentication and authorisation."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest

from atlasflow.common.auth import LocalIssuer, TokenVerifier
from atlasflow.common.errors import InvalidArgument
from atlasflow.common.metrics import Metrics
from atlasflow.common.server import build_server, error_info_of
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.testing import auth


class _Servicer(ranking_pb2_grpc.RankingServiceServicer):
    async def GetWorklistItem(self, request, context):
        if request.case_id == "bad":
            raise InvalidArgument("BAD_CASE", "case id is bad", domain="atlasflow.ranking", metadata={"case_id": "bad"})
        if request.case_id == "boom":
            raise RuntimeError("secret internal detail /etc/passwd")
        return ranking_pb2.GetWorklistItemResponse(item=ranking_pb2.WorklistItem(case_id=request.case_id, rank=1))


@pytest.fixture()
def running():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = Metrics("ranking")
    loop = asyncio.new_event_loop()

    def register(server):
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(_Servicer(), server)
        return ["atlasflow.ranking.v1.RankingService"]

    async def start():
        built = build_server(
            register=register,
            metrics=metrics,
            port=0,
            max_message_bytes=1024,
            tracer_provider=provider,
            verifier=TokenVerifier(auth.issuer().config()),
        )
        await built.server.start()
        await built.set_serving(True)
        return built

    built = loop.run_until_complete(start())
    import threading

    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield built, metrics, exporter
    asyncio.run_coroutine_threadsafe(built.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)


def test_ok_error_info_internal_metrics_and_spans(running):
    built, metrics, exporter = running
    token = auth.metadata("reviewer")
    with grpc.insecure_channel(f"127.0.0.1:{built.port}") as ch:
        stub = ranking_pb2_grpc.RankingServiceStub(ch)
        assert stub.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id="c1"), metadata=token).item.rank == 1

        with pytest.raises(grpc.RpcError) as bad:
            stub.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id="bad"), metadata=token)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info_of(bad.value)
        assert info is not None
        assert (info.reason, info.domain, dict(info.metadata)) == ("BAD_CASE", "atlasflow.ranking", {"case_id": "bad"})

        with pytest.raises(grpc.RpcError) as boom:
            stub.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id="boom"), metadata=token)
        assert boom.value.code() == grpc.StatusCode.INTERNAL
        assert "passwd" not in (boom.value.details() or "")
        assert error_info_of(boom.value).reason == "INTERNAL"

        # message-size limit is explicit (1 KiB here)
        with pytest.raises(grpc.RpcError) as big:
            stub.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id="x" * 4096), metadata=token)
        assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        health = health_pb2_grpc.HealthStub(ch)  # health and reflection: no token needed
        for name in ("", "atlasflow.ranking.v1.RankingService"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=name)).status
                == health_pb2.HealthCheckResponse.SERVING
            )

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"atlasflow.ranking.v1.RankingService", "grpc.health.v1.Health"} <= names

    text = generate_latest(metrics.registry).decode()
    assert 'atlasflow_rpc_requests_total{code="OK",method="GetWorklistItem",service="ranking"} 1.0' in text
    assert 'code="INVALID_ARGUMENT"' in text and 'code="INTERNAL"' in text
    assert "Check" not in text  # health checks are not counted as API traffic

    spans = [s for s in exporter.get_finished_spans()]
    span_names = {s.name for s in spans}
    assert "/atlasflow.ranking.v1.RankingService/GetWorklistItem" in span_names
    assert not any("grpc.health" in n for n in span_names)


def test_graceful_stop_marks_not_serving(running):
    built, _metrics, _exporter = running
    loop_future = asyncio.run_coroutine_threadsafe(built.set_serving(False), built.server._loop)
    loop_future.result(5)
    with grpc.insecure_channel(f"127.0.0.1:{built.port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def _refused(call) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    info = error_info_of(err.value)
    assert info is not None
    assert info.domain == "atlasflow.auth"
    return err.value.code(), info.reason, err.value.details() or ""


def test_authentication_and_authorisation(running, tmp_path):
    """A real server from build_server with a TokenVerifier: no token, a token from another
    issuer (or signed by another key under the same issuer name), and a role the POLICY does
    not allow for the RPC are all refused before the servicer runs; health needs no token."""
    built, metrics, _exporter = running
    request = ranking_pb2.GetWorklistItemRequest(case_id="c1")
    stranger = LocalIssuer.create_or_load(tmp_path / "other")
    forger = LocalIssuer.create_or_load(tmp_path / "forger", issuer=auth.ISSUER)  # same iss, other key
    with grpc.insecure_channel(f"127.0.0.1:{built.port}") as ch:
        stub = ranking_pb2_grpc.RankingServiceStub(ch)
        code, reason, _ = _refused(lambda: stub.GetWorklistItem(request))
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")
        for issuer in (stranger, forger):
            other = (("authorization", f"Bearer {issuer.mint('dr-x', ['reviewer'])}"),)
            code, reason, _ = _refused(lambda other=other: stub.GetWorklistItem(request, metadata=other))
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")
        garbage = (("authorization", "Bearer not-a-jwt"),)
        code, reason, _ = _refused(lambda: stub.GetWorklistItem(request, metadata=garbage))
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")
        # a valid token of this issuer, but GetWorklistItem is not open to a connector
        code, reason, _ = _refused(
            lambda: stub.GetWorklistItem(request, metadata=auth.metadata("connector", subject="pacs-gw"))
        )
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
        # the right role passes
        assert stub.GetWorklistItem(request, metadata=auth.metadata("annotator")).item.rank == 1
        # health answers without a token
        assert (
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    text = generate_latest(metrics.registry).decode()
    assert 'atlasflow_rpc_requests_total{code="OK",method="GetWorklistItem",service="ranking"} 1.0' in text
    assert 'code="UNAUTHENTICATED"' in text and 'code="PERMISSION_DENIED"' in text


def test_calls_beyond_the_concurrency_limit_are_resource_exhausted():
    """build_server(max_concurrent_rpcs=N): the N+1st call in progress is refused at once with
    RESOURCE_EXHAUSTED instead of queueing without bound; when the slot frees, calls pass."""
    gate = asyncio.Event()

    class Slow(ranking_pb2_grpc.RankingServiceServicer):
        async def GetWorklistItem(self, request, context):
            await gate.wait()
            return ranking_pb2.GetWorklistItemResponse(item=ranking_pb2.WorklistItem(case_id=request.case_id))

    loop = asyncio.new_event_loop()

    def register(server):
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(Slow(), server)
        return ["atlasflow.ranking.v1.RankingService"]

    async def start():
        built = build_server(
            register=register,
            metrics=Metrics("ranking"),
            port=0,
            verifier=TokenVerifier(auth.issuer().config()),
            max_concurrent_rpcs=1,
        )
        await built.server.start()
        return built

    built = loop.run_until_complete(start())
    import threading

    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    token = auth.metadata("reviewer")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{built.port}") as ch:
            stub = ranking_pb2_grpc.RankingServiceStub(ch)
            first = stub.GetWorklistItem.future(ranking_pb2.GetWorklistItemRequest(case_id="c1"), metadata=token)
            time.sleep(0.5)  # the first call holds the only slot
            with pytest.raises(grpc.RpcError) as err:
                stub.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id="c2"), metadata=token, timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            loop.call_soon_threadsafe(gate.set)
            assert first.result(timeout=10).item.case_id == "c1"
            assert (
                stub.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id="c3"), metadata=token).item.case_id
                == "c3"
            )
    finally:
        asyncio.run_coroutine_threadsafe(built.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


class _Streamer(ingest_pb2_grpc.IngestServiceServicer):
    """A server stream that would run long: the client stops it after a few messages, while the
    handler is suspended at ``yield`` (its write waits for the client)."""

    def __init__(self) -> None:
        self.sent = 0
        self.ended = asyncio.Event()

    async def StreamSeriesInstances(self, request, context):
        try:
            for i in range(10_000):
                self.sent += 1
                # 256 KiB messages: the flow-control window fills, the handler waits at `yield`
                yield ingest_pb2.StreamSeriesInstancesResponse(instance_index=i, chunk=b"x" * (256 * 1024))
        finally:
            self.ended.set()


class _TaskProbe(grpc.aio.ServerInterceptor):
    """An inner interceptor (where the audit sits) whose response generator notes whether it
    was closed in the task it ran in: one closed later by the loop's finalizer (another task)
    ran after the call had ended, where the audit's ``context.peer()`` segfaulted in cygrpc."""

    def __init__(self) -> None:
        self.closed_in_own_task: list[bool] = []

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler.unary_stream:
            return handler
        behavior, closed = handler.unary_stream, self.closed_in_own_task

        async def probed(request, context):
            task = asyncio.current_task()
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                closed.append(asyncio.current_task() is task)

        return grpc.unary_stream_rpc_method_handler(probed, handler.request_deserializer, handler.response_serializer)


def test_a_server_stream_cancelled_by_the_client_is_cancelled_not_crashed(caplog):
    """A client that cancels a server stream early (the gateway stopping a DICOMweb retrieve)
    ends the handler: no 'rpc crashed' log (no ValueError from a context token or OpenTelemetry
    context detached in another context), the interceptors' generators (the audit's) are closed
    in the call's own task while it runs, and the call counts as CANCELLED in the metrics."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = Metrics("ingest")
    streamer = _Streamer()
    probe = _TaskProbe()
    loop = asyncio.new_event_loop()

    def register(server):
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(streamer, server)
        return ["atlasflow.ingest.v1.IngestService"]

    async def start():
        built = build_server(
            register=register,
            metrics=metrics,
            port=0,
            tracer_provider=provider,
            verifier=TokenVerifier(auth.issuer().config()),
            interceptors=[probe],
        )
        await built.server.start()
        return built

    built = loop.run_until_complete(start())
    import threading

    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):  # more than once: a leaked context shows on the next call
                with grpc.insecure_channel(f"127.0.0.1:{built.port}") as ch:
                    stub = ingest_pb2_grpc.IngestServiceStub(ch)
                    call = stub.StreamSeriesInstances(
                        ingest_pb2.StreamSeriesInstancesRequest(series_id="s1"), metadata=auth.metadata("admin")
                    )
                    got = [next(call) for _ in range(3)]
                    time.sleep(0.3)  # the server fills the window and waits to write
                    assert [m.instance_index for m in got] == [0, 1, 2]
                    call.cancel()
                    with pytest.raises(grpc.RpcError) as err:
                        list(call)
                    assert err.value.code() == grpc.StatusCode.CANCELLED
                gc.collect()  # the abandoned generator is closed by the loop's finalizer hook
                asyncio.run_coroutine_threadsafe(asyncio.wait_for(streamer.ended.wait(), 30), loop).result(35)
                streamer.ended.clear()
                deadline = time.monotonic() + 30
                while "CANCELLED" not in generate_latest(metrics.registry).decode() and time.monotonic() < deadline:
                    time.sleep(0.05)
            time.sleep(0.3)  # let the server finish its bookkeeping of the last call
    finally:
        asyncio.run_coroutine_threadsafe(built.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
    assert streamer.sent < 10_000
    assert probe.closed_in_own_task == [True, True, True]
    messages = [r.getMessage() for r in caplog.records]
    assert not any("rpc crashed" in m for m in messages), messages
    assert not any("Failed to detach context" in m for m in messages), messages
    assert not [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], ValueError)]
    text = generate_latest(metrics.registry).decode()
    assert (
        'atlasflow_rpc_requests_total{code="CANCELLED",method="StreamSeriesInstances",service="ingest"} 3.0' in text
    ), text
    assert 'code="INTERNAL"' not in text
    spans = [s for s in exporter.get_finished_spans() if s.name.endswith("/StreamSeriesInstances")]
    assert len(spans) == 3
