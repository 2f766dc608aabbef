"""Supervision of a service's background loops (`atlasflow.common.app`): a loop that dies is
logged, health goes NOT_SERVING while it is down, it is restarted with a back-off and health
returns to SERVING; stopping the app restarts nothing."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atlasflow.common.app import ServiceApp, TaskLoop, ThreadLoop
from atlasflow.common.metrics import Metrics
from atlasflow.common.server import build_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SECRET = "DOE^JANE 1970-01-01"  # stands for patient data in an exception message


def _app(*parts: TaskLoop | ThreadLoop) -> ServiceApp:
    # verifier=None (authentication disabled): this tests the supervision of background loops and
    # health, not auth; the health service is exempt from authentication anyway.
    built = build_server(register=lambda server: [], metrics=Metrics("test"), verifier=None)
    return ServiceApp("test", built, background=list(parts), metrics=Metrics("test"))


async def _health(app: ServiceApp) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return reply.status


async def _until(app: ServiceApp, status: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while await _health(app) != status:
        assert time.monotonic() < deadline, f"health never became {status}"
        await asyncio.sleep(0.01)


def _restarts(app: ServiceApp, part: str) -> float:
    assert app.metrics is not None
    value = app.metrics.registry.get_sample_value(
        "atlasflow_background_restarts_total", {"service": "test", "part": part}
    )
    return value or 0.0


def test_a_task_loop_that_dies_is_restarted_and_health_follows(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def scenario() -> None:
        nonlocal calls
        second_run = asyncio.Event()
        may_die = asyncio.Event()

        async def run() -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                await may_die.wait()
                raise OverflowError(SECRET)
            second_run.set()
            await asyncio.Event().wait()  # runs until cancelled

        loop = TaskLoop("boom", run, backoff_s=0.5)
        app = _app(loop)
        await app.start()
        try:
            assert await _health(app) == SERVING
            may_die.set()
            await _until(app, NOT_SERVING)  # down during the back-off
            assert app.down == {"boom"}
            await asyncio.wait_for(second_run.wait(), 10)
            await _until(app, SERVING)
            assert (loop.restarts, _restarts(app, "boom"), app.down) == (1, 1.0, set())
        finally:
            await app.stop()
        await asyncio.sleep(1.2)  # longer than the next back-off: a stop is no death
        assert calls == 2 and loop.restarts == 1

    with caplog.at_level(logging.ERROR, logger="atlasflow.common.app"):
        asyncio.run(scenario())
    died = [r for r in caplog.records if r.getMessage() == "background loop died"]
    assert len(died) == 1 and died[0].levelno == logging.ERROR
    assert died[0].__dict__["fields"] == {"part": "boom", "error": "OverflowError"}
    assert all(SECRET not in str(r.__dict__.get("fields", "")) + r.getMessage() for r in caplog.records)


def test_stopping_during_the_back_off_restarts_nothing() -> None:
    calls = 0

    async def scenario() -> None:
        async def run() -> None:
            nonlocal calls
            calls += 1
            raise ValueError("always")

        loop = TaskLoop("always-dies", run, backoff_s=5.0)
        app = _app(loop)
        await app.start()
        await _until(app, NOT_SERVING)
        await app.stop()  # cancels the back-off wait
        await asyncio.sleep(0.2)
        assert calls == 1 and loop.restarts == 0

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_thread_loop_that_returns_unasked_is_restarted_and_stops_cleanly() -> None:
    stop = threading.Event()
    runs = 0
    second_run = threading.Event()

    def target() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            return  # returned although nobody asked it to stop: a death
        second_run.set()
        stop.wait()

    async def scenario() -> None:
        loop = ThreadLoop("worker", target, stop.set, join_s=5.0, backoff_s=0.1)
        app = _app(loop)
        await app.start()
        try:
            assert await asyncio.to_thread(second_run.wait, 10)
            await _until(app, SERVING)
            assert loop.restarts == 1 and _restarts(app, "worker") == 1.0
        finally:
            await app.stop()
        assert loop.thread is not None and not loop.thread.is_alive()
        await asyncio.sleep(0.3)
        assert runs == 2

    asyncio.run(asyncio.wait_for(scenario(), 30))
