"""`atlasflow serve ingest`: wires settings, stores, the DICOM SCP, the gRPC server and the
background loops (assembler, outbox dispatcher) of the ingest service."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.clients import aio_channel
from atlasflow.common.metrics import Metrics
from atlasflow.common.outbox import OutboxDispatcher
from atlasflow.common.server import BuiltServer, build_server, run_until_signalled
from atlasflow.common.settings import ServiceSettings
from atlasflow.common.telemetry import setup_logging, setup_tracing, shutdown_tracing
from atlasflow.ingest.scp import ScpConfig, StoreScp
from atlasflow.ingest.service import SEGMENT_TOPIC, Assembler, IngestServicer, segmentation_handoff
from atlasflow.ingest.store import IngestStore
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.segmentation.v1 import segmentation_pb2_grpc

log = logging.getLogger(__name__)
PREFIX = "ATLASFLOW_INGEST_"


@dataclass(frozen=True)
class IngestSettings(ServiceSettings):
    grpc_port: int = 50051
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    ae_title: str = "ATLASFLOW"
    accepted_calling_aets: tuple[str, ...] = ()
    max_associations: int = 16
    acse_timeout_s: float = 5.0  # see ScpConfig.acse_timeout_s
    check_called_aet: bool = True  # see ScpConfig.check_called_aet
    max_pdu: int = 0
    quiet_period_s: float = 5.0
    spool_segment_mb: int = 128  # zero-filled spool segments, 2 prepared ahead (store.py)
    segmentation_target: str = "127.0.0.1:50052"
    upload_ttl_s: float = 7 * 86400  # incomplete resumable uploads older than this are purged


async def amain(settings: IngestSettings) -> None:
    metrics = Metrics("ingest")
    metrics.serve(settings.metrics_port, settings.grpc_host)
    blobs = LocalBlobStore(settings.blob_dir)
    store = IngestStore(Path(settings.data_dir), blobs, spool_segment_bytes=settings.spool_segment_mb * 1024 * 1024)
    store.purge_uploads(settings.upload_ttl_s)
    assembler = Assembler(store, blobs, metrics, settings.quiet_period_s)
    scp = StoreScp(
        ScpConfig(
            settings.dicom_host,
            settings.dicom_port,
            settings.ae_title,
            settings.accepted_calling_aets,
            settings.max_pdu,
            settings.max_associations,
            acse_timeout_s=settings.acse_timeout_s,
            check_called_aet=settings.check_called_aet,
        ),
        store,
        metrics,
    )
    channel = aio_channel(settings.segmentation_target, settings.max_message_bytes)
    dispatcher = OutboxDispatcher(
        store.conn,
        store.lock,
        {SEGMENT_TOPIC: segmentation_handoff(store, segmentation_pb2_grpc.SegmentationServiceStub(channel))},
        metrics,
    )
    loop = asyncio.get_running_loop()
    assembler.on_assembled = lambda: loop.call_soon_threadsafe(dispatcher.wake)

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(IngestServicer(store, scp, assembler), server)
        return [ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name]

    built = build_server(
        register=register,
        metrics=metrics,
        host=settings.grpc_host,
        port=settings.grpc_port,
        max_message_bytes=settings.max_message_bytes,
    )
    scp.start()
    tasks = [asyncio.create_task(assembler.run()), asyncio.create_task(dispatcher.run())]

    async def close() -> None:
        scp.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await channel.close()
        store.close()

    built.on_stop.append(close)

    def ready(b: BuiltServer) -> None:
        log.info(
            "ingest ready",
            extra={"fields": {"grpc_port": b.port, "dicom_port": scp.port, "ae_title": settings.ae_title}},
        )

    await run_until_signalled(built, settings.shutdown_grace_s, ready)


def main() -> None:
    settings = IngestSettings.from_env(PREFIX)
    setup_logging("ingest", settings.log_level)
    setup_tracing("atlasflow-ingest")
    try:
        asyncio.run(amain(settings))
    finally:
        shutdown_tracing()
