"""One shape for every service: `build_app` returns a `ServiceApp`, `run_service` runs it.

Each service package has the same modules (copy one to write a new service):

- ``settings.py``: the typed settings class and its environment prefix;
- ``app.py``: ``async def build_app(settings, *, metrics, ...) -> ServiceApp`` wires the stores,
  the servicer, the background workers and the gRPC server (built, not started), and
  ``main()`` = ``run_service(...)``;
- ``servicer.py``: converts a request, calls the domain, converts the answer (blocking work runs
  in a thread, never on the event loop);
- ``worker.py``: the background loops (outbox dispatch, assembly, jobs), if the service has any;
- domain modules, which never import grpc.

Life cycle, the same for all four: `ServiceApp.start` starts the server, marks it SERVING and
starts the background parts in order; `ServiceApp.stop` marks NOT_SERVING, stops the server
with a grace period for in-flight RPCs, stops the background parts in reverse order, then
closes the resources (`closers`, reverse order).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from atlasflow.common.metrics import Metrics
from atlasflow.common.server import BuiltServer
from atlasflow.common.settings import ServiceSettings
from atlasflow.common.telemetry import setup_logging, setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)

S = TypeVar("S", bound=ServiceSettings)
Closer = Callable[[], "Awaitable[None] | None"]


class Background(Protocol):
    """A background part of a service (a worker thread, an asyncio loop)."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class ThreadLoop:
    """A blocking loop on a daemon thread: ``target()`` runs until ``request_stop()`` makes it
    return; `stop` waits up to ``join_s`` seconds for it (off the event loop)."""

    name: str
    target: Callable[[], None]
    request_stop: Callable[[], None]
    join_s: float = 30.0
    thread: threading.Thread | None = None

    async def start(self) -> None:
        self.thread = threading.Thread(target=self.target, name=self.name, daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        self.request_stop()
        if self.thread is not None and self.thread.is_alive():
            await asyncio.to_thread(self.thread.join, self.join_s)


@dataclass
class TaskLoop:
    """A coroutine on the service's event loop (e.g. an outbox dispatcher's ``run()``);
    `stop` cancels it and waits for it to finish."""

    name: str
    run: Callable[[], Coroutine[Any, Any, None]]
    task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=self.name)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


@dataclass
class ServiceApp:
    """A service's parts, built by its ``build_app`` (nothing runs until `start`).

    ``parts`` holds the service's own objects by name (stores, worker, servicer) for tests and
    the CLI's in-process launcher; they are not looked up by the running service."""

    name: str
    built: BuiltServer
    background: list[Background] = field(default_factory=list)
    closers: list[Closer] = field(default_factory=list)
    parts: dict[str, Any] = field(default_factory=dict)
    #: extra fields of the "<name> ready" log line (ports, AE title), besides grpc_port
    ready_fields: dict[str, Any] = field(default_factory=dict)
    started: bool = False

    @property
    def port(self) -> int:
        """The bound gRPC port (the real one when the settings asked for port 0)."""
        return self.built.port

    async def start(self) -> None:
        await self.built.server.start()
        await self.built.set_serving(True)
        for part in self.background:
            await part.start()
        self.started = True

    async def stop(self, grace: float = 1.0) -> None:
        await self.built.stop(grace)
        for part in reversed(self.background):
            await part.stop()
        for close in reversed(self.closers):
            res = close()
            if inspect.isawaitable(res):
                await res
        self.started = False


async def serve_until_signalled(app: ServiceApp, grace: float) -> None:
    """Start ``app``, wait for SIGTERM/SIGINT, then stop it with ``grace`` seconds."""
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(f"{app.name} ready", extra={"fields": {"grpc_port": app.port, **app.ready_fields}})
    await stop.wait()
    log.info("shutting down", extra={"fields": {"grace_s": grace}})
    await app.stop(grace)


def run_service(
    name: str,
    settings: S,
    build_app: Callable[..., Awaitable[ServiceApp]],
) -> None:
    """The body of every ``atlasflow serve <name>``: logging, tracing, the Prometheus endpoint,
    then ``build_app(settings, metrics=...)`` served until a signal."""
    setup_logging(name, settings.log_level)
    setup_tracing(f"atlasflow-{name}")

    async def amain() -> None:
        metrics = Metrics(name)
        metrics.serve(settings.metrics_port, settings.grpc_host)
        app = await build_app(settings, metrics=metrics)
        await serve_until_signalled(app, settings.shutdown_grace_s)

    try:
        asyncio.run(amain())
    finally:
        shutdown_tracing()
