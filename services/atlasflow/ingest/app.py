"""`atlasflow serve ingest`: the instance store, the DICOM SCP, the IngestService gRPC API and
the background loops (assembler, outbox dispatcher to segmentation).

`build_app` wires them the common way (`atlasflow.common.app`): the SCP (its own pynetdicom
threads), the assembler and the outbox dispatcher (`TaskLoop`s on the server's event loop) are
the background parts, started in that order and stopped in reverse; stopping then closes the
segmentation channel and the store. C-STORE and the gRPC upload share one `Reception`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from atlasflow.common.app import ServiceApp, TaskLoop, build_service_server, run_service
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.clients import aio_channel
from atlasflow.common.disk import DiskFloor
from atlasflow.common.metrics import Metrics
from atlasflow.common.outbox import OutboxDispatcher
from atlasflow.ingest.reception import Reception
from atlasflow.ingest.scp import ScpConfig, StoreScp
from atlasflow.ingest.servicer import IngestServicer
from atlasflow.ingest.settings import PREFIX, IngestSettings
from atlasflow.ingest.store import IngestStore
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.ingest.worker import SEGMENT_TOPIC, Assembler, segmentation_handoff
from atlasflow.segmentation.v1 import segmentation_pb2_grpc

# The generated gRPC modules carry no annotations: their stub and registration, typed here.
_SegmentationStub: Callable[[grpc.aio.Channel], segmentation_pb2_grpc.SegmentationServiceStub] = (
    segmentation_pb2_grpc.SegmentationServiceStub
)
_add_servicer: Callable[[IngestServicer, grpc.aio.Server], None] = ingest_pb2_grpc.add_IngestServiceServicer_to_server


@dataclass
class ScpPart:
    """The DICOM SCP as a background part; on start, its bound port goes into ``ready_fields``
    (the "ingest ready" log line) as ``dicom_port``."""

    scp: StoreScp
    ready_fields: dict[str, Any]
    name: str = "dicom-scp"

    async def start(self) -> None:
        self.scp.start()
        self.ready_fields["dicom_port"] = self.scp.port

    async def stop(self) -> None:
        await asyncio.to_thread(self.scp.stop)  # joins the association threads


async def build_app(
    settings: IngestSettings,
    *,
    metrics: Metrics | None = None,
    tracer_provider: Any = None,
) -> ServiceApp:
    """The ingest service (built, not started); port 0 picks a free port (gRPC and DICOM).

    Opening the store replays the spool left by a previous process (start-up recovery) and
    purges resumable uploads older than ``upload_ttl_s``."""
    metrics = metrics or Metrics("ingest")
    blobs = LocalBlobStore(settings.blob_dir)
    store = await asyncio.to_thread(
        IngestStore, Path(settings.data_dir), blobs, spool_segment_bytes=settings.spool_segment_mb * 1024 * 1024
    )
    await asyncio.to_thread(store.uploads.purge, settings.upload_ttl_s)
    floor = DiskFloor([settings.data_dir, settings.blob_dir], settings.min_free_disk_mb * 1024 * 1024)
    reception = Reception(store, metrics, disk_floor=floor)
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
        reception,
    )
    channel = aio_channel(
        settings.segmentation_target,
        settings.max_message_bytes,
        token=settings.token_source(),
        tls=settings.client_tls(),
    )
    dispatcher = OutboxDispatcher(
        store.conn,
        store.lock,
        {SEGMENT_TOPIC: segmentation_handoff(store, _SegmentationStub(channel))},
        metrics,
    )
    loop = asyncio.get_running_loop()

    def wake_dispatcher() -> None:  # from the assembler's thread
        loop.call_soon_threadsafe(dispatcher.wake)

    assembler.on_assembled = wake_dispatcher
    servicer = IngestServicer(store, reception, assembler)

    def register(server: grpc.aio.Server) -> list[str]:
        _add_servicer(servicer, server)
        return [ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name]

    built = build_service_server(settings, register, metrics=metrics, tracer_provider=tracer_provider)
    ready_fields: dict[str, Any] = {"dicom_port": settings.dicom_port, "ae_title": settings.ae_title}
    return ServiceApp(
        "ingest",
        built,
        background=[
            ScpPart(scp, ready_fields),
            TaskLoop("assembler", assembler.run),
            TaskLoop("outbox", dispatcher.run),
        ],
        closers=[store.close, channel.close],  # reverse order: the channel, then the store
        parts={"store": store, "reception": reception, "scp": scp, "assembler": assembler, "servicer": servicer},
        ready_fields=ready_fields,
        metrics=metrics,
    )


def main() -> None:
    run_service("ingest", IngestSettings.from_env(PREFIX), build_app)
