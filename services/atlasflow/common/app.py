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

Supervision: a background loop (`TaskLoop`, `ThreadLoop`) that ends with an exception, or
returns while the app is not stopping, is logged at ERROR (part name and exception type only:
never the message, which may carry patient data), the service reports NOT_SERVING on its health
service while any part is down, and the loop is restarted after a back-off (`RESTART_BACKOFF_S`
doubling up to `RESTART_BACKOFF_MAX_S`); health is SERVING again once every part runs. Restarts
are counted (``atlasflow_background_restarts``). Stopping the app never restarts anything.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc

from atlasflow.common.audit_server import ServiceAudit, service_audit
from atlasflow.common.metrics import Metrics
from atlasflow.common.server import BuiltServer, build_server
from atlasflow.common.settings import ServiceSettings
from atlasflow.common.telemetry import setup_logging, setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)

S = TypeVar("S", bound=ServiceSettings)
Closer = Callable[[], "Awaitable[None] | None"]
#: called by a supervised loop with (part name, running?) when it goes down or runs again
PartWatch = Callable[[str, bool], Awaitable[None]]

#: first wait before restarting a background loop that died, in seconds (doubles each time)
RESTART_BACKOFF_S = 0.5
#: longest wait between two restarts, in seconds; a loop that ran this long starts over at
#: `RESTART_BACKOFF_S` when it dies again
RESTART_BACKOFF_MAX_S = 30.0


class Background(Protocol):
    """A background part of a service (a worker thread, an asyncio loop)."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class _Supervised:
    """The restart policy shared by `TaskLoop` and `ThreadLoop`: `_supervise` runs ``once()``
    (one run of the loop) until `stop`; a run that ends without a stop is a death."""

    name: str
    backoff_s: float
    backoff_max_s: float
    #: set by `ServiceApp.start` to hear about deaths and restarts
    watch: PartWatch | None
    #: how many times the loop has been restarted after dying
    restarts: int
    _stopping: bool
    _supervisor: asyncio.Task[None] | None

    async def _once(self) -> BaseException | None:
        """Run the loop once; its exception, or None when it returned."""
        raise NotImplementedError

    async def _supervise(self) -> None:
        delay = self.backoff_s
        while not self._stopping:
            began = time.monotonic()
            exc = await self._once()
            if self._stopping:
                return
            # Exception type only: a message may quote a dataset (patient data).
            log.error(
                "background loop died",
                extra={"fields": {"part": self.name, "error": type(exc).__name__ if exc else "returned"}},
            )
            if time.monotonic() - began >= self.backoff_max_s:
                delay = self.backoff_s
            if self.watch is not None:
                await self.watch(self.name, False)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max_s)
            if self._stopping:
                return
            self.restarts += 1
            log.warning("background loop restarted", extra={"fields": {"part": self.name, "restarts": self.restarts}})
            if self.watch is not None:
                await self.watch(self.name, True)

    def _start_supervisor(self) -> None:
        self._stopping = False
        self._supervisor = asyncio.create_task(self._supervise(), name=f"{self.name}-supervisor")

    async def _stop_supervisor(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)


@dataclass
class ThreadLoop(_Supervised):
    """A blocking loop on a daemon thread: ``target()`` runs until ``request_stop()`` makes it
    return; `stop` waits up to ``join_s`` seconds for it (off the event loop). Supervised: a
    ``target()`` that raises, or returns without a stop, runs again on a new thread after a
    back-off (see the module docstring)."""

    name: str
    target: Callable[[], None]
    request_stop: Callable[[], None]
    join_s: float = 30.0
    thread: threading.Thread | None = None
    backoff_s: float = RESTART_BACKOFF_S
    backoff_max_s: float = RESTART_BACKOFF_MAX_S
    watch: PartWatch | None = None
    restarts: int = 0
    _stopping: bool = field(default=False, init=False, repr=False)
    _supervisor: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    async def _once(self) -> BaseException | None:
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[BaseException | None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if not ended.done():
                ended.set_result(exc)

        def body() -> None:
            exc: BaseException | None = None
            try:
                self.target()
            except BaseException as e:  # noqa: BLE001 - reported to the supervisor, which logs it
                exc = e
            try:
                loop.call_soon_threadsafe(settle, exc)
            except RuntimeError:  # the event loop is closed: nobody left to supervise
                pass

        self.thread = threading.Thread(target=body, name=self.name, daemon=True)
        self.thread.start()
        return await ended

    async def start(self) -> None:
        self._start_supervisor()

    async def stop(self) -> None:
        self._stopping = True
        self.request_stop()
        await self._stop_supervisor()
        if self.thread is not None and self.thread.is_alive():
            await asyncio.to_thread(self.thread.join, self.join_s)


@dataclass
class TaskLoop(_Supervised):
    """A coroutine on the service's event loop (e.g. an outbox dispatcher's ``run()``);
    `stop` cancels it and waits for it to finish. Supervised: a ``run()`` that raises, or
    returns without a stop, runs again after a back-off (see the module docstring)."""

    name: str
    run: Callable[[], Coroutine[Any, Any, None]]
    task: asyncio.Task[None] | None = None
    backoff_s: float = RESTART_BACKOFF_S
    backoff_max_s: float = RESTART_BACKOFF_MAX_S
    watch: PartWatch | None = None
    restarts: int = 0
    _stopping: bool = field(default=False, init=False, repr=False)
    _supervisor: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    async def _once(self) -> BaseException | None:
        self.task = asyncio.create_task(self.run(), name=self.name)
        try:
            await asyncio.wait({self.task})
        finally:
            if not self.task.done():  # the supervisor is cancelled (stop): take the loop along
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)
        if self.task.cancelled():
            return asyncio.CancelledError()
        return self.task.exception()

    async def start(self) -> None:
        self._start_supervisor()

    async def stop(self) -> None:
        await self._stop_supervisor()
        if self.task is not None and not self.task.done():
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
    #: where background restarts are counted (`run_service` sets it); None counts nowhere
    metrics: Metrics | None = None
    #: names of the background parts that are down (dead, waiting for their restart)
    down: set[str] = field(default_factory=set)
    stopping: bool = False

    @property
    def port(self) -> int:
        """The bound gRPC port (the real one when the settings asked for port 0)."""
        return self.built.port

    async def _part_watch(self, name: str, running: bool) -> None:
        """A supervised part died (``running`` False) or was restarted: health follows."""
        if self.stopping:
            return
        if running:
            self.down.discard(name)
            if self.metrics is not None:
                self.metrics.count_restart(name)
        else:
            self.down.add(name)
        await self.built.set_serving(not self.down)

    async def start(self) -> None:
        self.stopping = False
        self.down.clear()
        await self.built.start()
        await self.built.set_serving(True)
        for part in self.background:
            if isinstance(part, _Supervised):
                part.watch = self._part_watch
            await part.start()
        self.started = True

    async def stop(self, grace: float = 1.0) -> None:
        self.stopping = True
        await self.built.stop(grace)
        for part in reversed(self.background):
            await part.stop()
        for close in reversed(self.closers):
            res = close()
            if inspect.isawaitable(res):
                await res
        self.started = False


def build_service_server(
    settings: ServiceSettings,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    *,
    metrics: Metrics,
    tracer_provider: Any = None,
    audit: ServiceAudit | None = None,
) -> BuiltServer:
    """A service's gRPC server from its settings, the same way in all four: address, message
    size, the token check (`ServiceSettings.verifier`), the limit of calls in progress, TLS
    (`ServiceSettings.server_tls`) and the plaintext health-only port; the audit log
    (`atlasflow.common.audit_server`: every audited call and every refusal recorded, the
    AuditService registered, the log closed when the server stops). ``audit``: the service's
    audit, when the service opened it itself to record more than its RPCs (ingest's DICOM
    SCP: `service_audit(settings)`); by default it is opened here."""
    audit = audit or service_audit(settings)
    built = build_server(
        register=audit.register(register),
        metrics=metrics,
        host=settings.grpc_host,
        port=settings.grpc_port,
        max_message_bytes=settings.max_message_bytes,
        tracer_provider=tracer_provider,
        verifier=settings.verifier(),
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        tls=settings.server_tls(),
        health_port=settings.health_port,
        interceptors=[audit.interceptor],
        on_refusal=audit.recorder.refused,
    )
    built.on_stop.append(audit.recorder.close)
    return built


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
        if app.metrics is None:
            app.metrics = metrics
        await serve_until_signalled(app, settings.shutdown_grace_s)

    try:
        asyncio.run(amain())
    finally:
        shutdown_tracing()
