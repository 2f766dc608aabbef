"""`atlasflow serve segmentation`: job store, worker thread (calls Triton), gRPC server and the
outbox dispatcher that hands results to the label and ranking services."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.clients import aio_channel
from atlasflow.common.metrics import Metrics
from atlasflow.common.outbox import OutboxDispatcher, OutboxRow
from atlasflow.common.server import BuiltServer, build_server, run_until_signalled
from atlasflow.common.settings import ServiceSettings
from atlasflow.common.telemetry import setup_logging, setup_tracing, shutdown_tracing
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.segmentation.ensemble import load_ensemble, triton_model_name
from atlasflow.segmentation.jobs import JobStore
from atlasflow.segmentation.service import (
    LABELS_TOPIC,
    RANKING_TOPIC,
    SegmentationServicer,
    Worker,
)
from atlasflow.segmentation.triton_client import TritonSegmenter
from atlasflow.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc

log = logging.getLogger(__name__)
PREFIX = "ATLASFLOW_SEGMENTATION_"


@dataclass(frozen=True)
class SegmentationSettings(ServiceSettings):
    grpc_port: int = 50052
    triton_url: str = "127.0.0.1:8001"
    ensemble: str = "abdomen-trio-v1"
    labels_target: str = "127.0.0.1:50054"
    ranking_target: str = "127.0.0.1:50053"
    max_attempts: int = 8
    triton_timeout_s: float = 900.0


async def amain(settings: SegmentationSettings) -> None:
    metrics = Metrics("segmentation")
    metrics.serve(settings.metrics_port, settings.grpc_host)
    blobs = LocalBlobStore(settings.blob_dir)
    jobs = JobStore(Path(settings.data_dir))
    config = load_ensemble(settings.ensemble)
    segmenter = TritonSegmenter(settings.triton_url, triton_model_name(settings.ensemble),
                                timeout_s=settings.triton_timeout_s)
    labels_channel = aio_channel(settings.labels_target, settings.max_message_bytes)
    ranking_channel = aio_channel(settings.ranking_target, settings.max_message_bytes)
    labels_stub = labels_pb2_grpc.LabelServiceStub(labels_channel)
    ranking_stub = ranking_pb2_grpc.RankingServiceStub(ranking_channel)

    async def to_labels(row: OutboxRow) -> None:
        await labels_stub.CreateLabelVersion(
            labels_pb2.CreateLabelVersionRequest.FromString(row.payload), timeout=60)

    async def to_ranking(row: OutboxRow) -> None:
        await ranking_stub.SubmitAttention(
            ranking_pb2.SubmitAttentionRequest.FromString(row.payload), timeout=60)

    dispatcher = OutboxDispatcher(jobs.conn, jobs.lock,
                                  {LABELS_TOPIC: to_labels, RANKING_TOPIC: to_ranking}, metrics)
    loop = asyncio.get_running_loop()
    worker = Worker(jobs, blobs, segmenter, metrics,
                    members=[m.name for m in config.members], max_attempts=settings.max_attempts,
                    on_handoff=lambda: loop.call_soon_threadsafe(dispatcher.wake))
    thread = threading.Thread(target=worker.run_forever, name="segmentation-worker", daemon=True)

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        segmentation_pb2_grpc.add_SegmentationServiceServicer_to_server(
            SegmentationServicer(jobs, blobs, worker, [settings.ensemble]), server)
        return [segmentation_pb2.DESCRIPTOR.services_by_name["SegmentationService"].full_name]

    built = build_server(register=register, metrics=metrics, host=settings.grpc_host,
                         port=settings.grpc_port, max_message_bytes=settings.max_message_bytes)
    thread.start()
    task = asyncio.create_task(dispatcher.run())

    async def close() -> None:
        worker.stopping.set()
        worker.wake.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(thread.join, 30)
        await labels_channel.close()
        await ranking_channel.close()
        jobs.close()

    built.on_stop.append(close)

    def ready(b: BuiltServer) -> None:
        log.info("segmentation ready", extra={"fields": {
            "grpc_port": b.port, "ensemble": settings.ensemble}})

    await run_until_signalled(built, settings.shutdown_grace_s, ready)


def main() -> None:
    settings = SegmentationSettings.from_env(PREFIX)
    setup_logging("segmentation", settings.log_level)
    setup_tracing("atlasflow-segmentation")
    try:
        asyncio.run(amain(settings))
    finally:
        shutdown_tracing()
