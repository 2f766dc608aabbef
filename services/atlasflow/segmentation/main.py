"""`atlasflow serve segmentation`: job store, worker thread (calls Triton), gRPC server and the
outbox dispatcher that hands results to the label and ranking services."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.clients import aio_channel, sync_channel
from atlasflow.common.metrics import Metrics
from atlasflow.common.outbox import OutboxDispatcher, OutboxRow
from atlasflow.common.plausibility import PopulationPrior
from atlasflow.common.server import BuiltServer, build_server, run_until_signalled
from atlasflow.common.settings import ServiceSettings
from atlasflow.common.telemetry import setup_logging, setup_tracing, shutdown_tracing
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.segmentation.ensemble import load_ensemble
from atlasflow.segmentation.jobs import JobStore
from atlasflow.segmentation.service import (
    LABELS_TOPIC,
    RANKING_TOPIC,
    SegmentationServicer,
    Segmenter,
    Worker,
)
from atlasflow.segmentation.triton_client import TritonSegmenter
from atlasflow.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc

log = logging.getLogger(__name__)


class RankingPrior:
    """The population prior ranking learned from stored labels (GetPopulationPrior), asked
    for at most every ``refresh_s`` seconds from the worker thread; until the first answer, and
    whenever ranking cannot be reached, the last prior known (at first the bundled one)."""

    def __init__(self, target: str, refresh_s: float, max_message_bytes: int) -> None:
        self.refresh_s = refresh_s
        self.prior = PopulationPrior.load()
        self.learned_cases = 0
        self._fetched = -math.inf
        self._channel = sync_channel(target, max_message_bytes)
        self._stub = ranking_pb2_grpc.RankingServiceStub(self._channel)

    def __call__(self) -> PopulationPrior:
        now = time.monotonic()
        if self.refresh_s > 0 and now - self._fetched >= self.refresh_s:
            self._fetched = now
            try:
                resp = self._stub.GetPopulationPrior(ranking_pb2.GetPopulationPriorRequest(), timeout=10)
                self.prior = PopulationPrior.from_dict(json.loads(resp.prior_json))
                if resp.learned_cases != self.learned_cases:
                    log.info(
                        "population prior updated",
                        extra={"fields": {"learned_cases": resp.learned_cases, "prior_cases": self.prior.cases}},
                    )
                self.learned_cases = resp.learned_cases
            except (grpc.RpcError, ValueError, KeyError) as exc:
                log.warning(
                    "population prior not refreshed; keeping the last one",
                    extra={"fields": {"error": type(exc).__name__}},
                )
        return self.prior

    def close(self) -> None:
        self._channel.close()


PREFIX = "ATLASFLOW_SEGMENTATION_"


@dataclass(frozen=True)
class SegmentationSettings(ServiceSettings):
    """``ATLASFLOW_SEGMENTATION_*``. ``ensemble``: comma-separated ensemble versions (or JSON
    paths) served by Triton, the first is the default; ``triton_shm``: auto | on | off (see
    `TritonSegmenter`); ``retry_base_s``/``max_backoff_s``/``max_attempts``: requeueing of jobs
    while Triton is unavailable; ``triton_connect_retries``: quick in-call retries first."""

    grpc_port: int = 50052
    triton_url: str = "127.0.0.1:8001"
    ensemble: str = "abdomen-trio-v1"
    labels_target: str = "127.0.0.1:50054"
    ranking_target: str = "127.0.0.1:50053"
    max_attempts: int = 8
    triton_timeout_s: float = 900.0
    triton_shm: str = "auto"
    triton_access_token: str = ""  # = the Triton server's ATLASFLOW_TRITON_ACCESS_TOKEN (shared memory)
    triton_connect_retries: int = 2
    retry_base_s: float = 2.0
    max_backoff_s: float = 60.0
    worker_poll_s: float = 1.0
    # How often the worker asks ranking for the population prior it learned from stored
    # human-decided labels (GetPopulationPrior); 0 = always the bundled prior.
    prior_refresh_s: float = 300.0


@dataclass
class SegmentationApp:
    """The service's parts, built by `build_app`; ``start``/``stop`` run them in this loop."""

    built: BuiltServer
    jobs: JobStore
    worker: Worker
    dispatcher: OutboxDispatcher
    segmenters: dict[str, Segmenter]
    thread: threading.Thread
    task: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return self.built.port

    async def start(self) -> None:
        await self.built.server.start()
        await self.built.set_serving(True)
        self.thread.start()
        self.task = asyncio.create_task(self.dispatcher.run())

    async def stop(self, grace: float = 1.0) -> None:
        await self.built.stop(grace)


def _ensembles(settings: SegmentationSettings) -> list[str]:
    return [e.strip() for e in settings.ensemble.split(",") if e.strip()]


async def build_app(
    settings: SegmentationSettings, *, metrics: Metrics | None = None, segmenters: Mapping[str, Segmenter] | None = None
) -> SegmentationApp:
    """Job store, worker thread, outbox dispatcher and gRPC server (built, not started).

    ``segmenters``: ensemble version -> `Segmenter`; default one `TritonSegmenter` per
    configured ensemble at ``triton_url`` (model `triton_model_name(version)`).
    """
    metrics = metrics or Metrics("segmentation")
    blobs = LocalBlobStore(settings.blob_dir)
    jobs = JobStore(Path(settings.data_dir))
    configs = [load_ensemble(e) for e in _ensembles(settings)]
    versions = [c.version for c in configs]
    if segmenters is None:
        segmenters = {
            c.version: TritonSegmenter(
                settings.triton_url,
                c.model_name,
                timeout_s=settings.triton_timeout_s,
                shm=settings.triton_shm,
                access_token=settings.triton_access_token or None,
                connect_retries=settings.triton_connect_retries,
            )
            for c in configs
        }
    labels_channel = aio_channel(settings.labels_target, settings.max_message_bytes)
    ranking_channel = aio_channel(settings.ranking_target, settings.max_message_bytes)
    labels_stub = labels_pb2_grpc.LabelServiceStub(labels_channel)
    ranking_stub = ranking_pb2_grpc.RankingServiceStub(ranking_channel)

    async def to_labels(row: OutboxRow) -> None:
        await labels_stub.CreateLabelVersion(labels_pb2.CreateLabelVersionRequest.FromString(row.payload), timeout=60)

    async def to_ranking(row: OutboxRow) -> None:
        await ranking_stub.SubmitAttention(ranking_pb2.SubmitAttentionRequest.FromString(row.payload), timeout=60)

    dispatcher = OutboxDispatcher(jobs.conn, jobs.lock, {LABELS_TOPIC: to_labels, RANKING_TOPIC: to_ranking}, metrics)
    loop = asyncio.get_running_loop()
    prior = RankingPrior(settings.ranking_target, settings.prior_refresh_s, settings.max_message_bytes)
    worker = Worker(
        jobs,
        blobs,
        dict(segmenters),
        metrics,
        prior=prior,
        attention_modes={c.version: c.attention_mode for c in configs},
        members={c.version: [m.name for m in c.members] for c in configs},
        max_attempts=settings.max_attempts,
        max_backoff_s=settings.max_backoff_s,
        retry_base_s=settings.retry_base_s,
        poll_s=settings.worker_poll_s,
        on_handoff=lambda: loop.call_soon_threadsafe(dispatcher.wake),
    )
    thread = threading.Thread(target=worker.run_forever, name="segmentation-worker", daemon=True)

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        segmentation_pb2_grpc.add_SegmentationServiceServicer_to_server(
            SegmentationServicer(jobs, blobs, worker, versions), server
        )
        return [segmentation_pb2.DESCRIPTOR.services_by_name["SegmentationService"].full_name]

    built = build_server(
        register=register,
        metrics=metrics,
        host=settings.grpc_host,
        port=settings.grpc_port,
        max_message_bytes=settings.max_message_bytes,
    )
    app = SegmentationApp(built, jobs, worker, dispatcher, dict(segmenters), thread)

    async def close() -> None:
        worker.stopping.set()
        worker.wake.set()
        if app.task is not None:
            app.task.cancel()
            await asyncio.gather(app.task, return_exceptions=True)
        if thread.is_alive():
            await asyncio.to_thread(thread.join, 30)
        await labels_channel.close()
        await ranking_channel.close()
        prior.close()
        for seg in app.segmenters.values():
            close_seg = getattr(seg, "close", None)
            if close_seg is not None:
                close_seg()
        jobs.close()

    built.on_stop.append(close)
    return app


async def amain(settings: SegmentationSettings) -> None:
    metrics = Metrics("segmentation")
    metrics.serve(settings.metrics_port, settings.grpc_host)
    app = await build_app(settings, metrics=metrics)
    app.thread.start()
    app.task = asyncio.create_task(app.dispatcher.run())

    def ready(b: BuiltServer) -> None:
        log.info("segmentation ready", extra={"fields": {"grpc_port": b.port, "ensemble": settings.ensemble}})

    await run_until_signalled(app.built, settings.shutdown_grace_s, ready)


def main() -> None:
    settings = SegmentationSettings.from_env(PREFIX)
    setup_logging("segmentation", settings.log_level)
    setup_tracing("atlasflow-segmentation")
    try:
        asyncio.run(amain(settings))
    finally:
        shutdown_tracing()
