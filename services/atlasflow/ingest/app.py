"""`atlasflow serve ingest`: the instance store, the DICOM SCP, the IngestService gRPC API and
the background loops (assembler, outbox dispatcher to segmentation).

`build_app` wires them the common way (`atlasflow.common.app`): the SCP (its own pynetdicom
threads), the assembler and the outbox dispatcher (`TaskLoop`s on the server's event loop) are
the background parts, started in that order and stopped in reverse; stopping then closes the
segmentation channel and the store. C-STORE and the gRPC upload share one `Reception`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from atlasflow.common import db
from atlasflow.common.app import ServiceApp, TaskLoop, build_service_server, run_service
from atlasflow.common.audit_server import service_audit
from atlasflow.common.clients import aio_channel
from atlasflow.common.disk import DiskFloor
from atlasflow.common.metrics import Metrics
from atlasflow.common.outbox import OutboxDispatcher
from atlasflow.ingest.deletion import PURGE_TOPIC, SWEEP_TOPIC, Deletions, PurgeResult, purge_handler, sweep_handler
from atlasflow.ingest.gauges import series_readings
from atlasflow.ingest.migrations import MIGRATIONS
from atlasflow.ingest.reception import Reception
from atlasflow.ingest.scp import ScpConfig, StoreScp
from atlasflow.ingest.scp_audit import ScpAudit
from atlasflow.ingest.servicer import IngestServicer
from atlasflow.ingest.settings import PREFIX, IngestSettings
from atlasflow.ingest.store import IngestStore
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.ingest.worker import SEGMENT_TOPIC, Assembler, segmentation_handoff
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc

log = logging.getLogger(__name__)

# The generated gRPC modules carry no annotations: their stub and registration, typed here.
_SegmentationStub: Callable[[grpc.aio.Channel], segmentation_pb2_grpc.SegmentationServiceStub] = (
    segmentation_pb2_grpc.SegmentationServiceStub
)
_LabelStub: Callable[[grpc.aio.Channel], labels_pb2_grpc.LabelServiceStub] = labels_pb2_grpc.LabelServiceStub
_RankingStub: Callable[[grpc.aio.Channel], ranking_pb2_grpc.RankingServiceStub] = ranking_pb2_grpc.RankingServiceStub
_add_servicer: Callable[[IngestServicer, grpc.aio.Server], None] = ingest_pb2_grpc.add_IngestServiceServicer_to_server


def purge_client(
    segmentation: segmentation_pb2_grpc.SegmentationServiceStub,
    labels: labels_pb2_grpc.LabelServiceStub,
    ranking: ranking_pb2_grpc.RankingServiceStub,
) -> Callable[[str, str, list[str]], Awaitable[PurgeResult]]:
    """PurgeStudy on one of the other services, for the deletion's hand-offs."""
    calls: dict[str, tuple[Any, Any]] = {
        "segmentation": (segmentation.PurgeStudy, segmentation_pb2.PurgeStudyRequest),
        "labels": (labels.PurgeStudy, labels_pb2.PurgeStudyRequest),
        "ranking": (ranking.PurgeStudy, ranking_pb2.PurgeStudyRequest),
    }

    async def purge(service: str, case_id: str, check: list[str]) -> PurgeResult:
        rpc, request = calls[service]
        answer = await rpc(request(case_id=case_id, check_digests=check), timeout=60)
        return PurgeResult(dict(answer.deleted_rows), list(answer.released_digests), list(answer.referenced_digests))

    return purge


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
        if self.scp.tls_port:
            self.ready_fields["dicom_tls_port"] = self.scp.tls_port

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
    purges resumable uploads older than ``upload_ttl_s`` (again every hour) and the upload spool
    files of the previous process."""
    metrics = metrics or Metrics("ingest")
    blobs = settings.blob_store()
    store = await asyncio.to_thread(
        IngestStore,
        Path(settings.data_dir),
        blobs,
        database=settings.database_url or None,
        spool_segment_bytes=settings.spool_segment_mb * 1024 * 1024,
        claim_s=settings.assembly_claim_s,
    )
    await asyncio.to_thread(store.uploads.purge, settings.upload_ttl_s, at_start=True)
    local_blobs = settings.local_blob_dir()  # an object store has no disk floor of ours
    floor = DiskFloor(
        [settings.data_dir, *([local_blobs] if local_blobs else [])], settings.min_free_disk_mb * 1024 * 1024
    )
    reception = Reception(store, metrics, disk_floor=floor)
    # scrape-time gauges (docs/runbooks.md): series waiting and their claims, free disk vs the floor
    metrics.add_source("series", lambda: series_readings(store))
    metrics.add_disk("state", settings.data_dir, floor.min_free_bytes)
    if local_blobs:
        metrics.add_disk("blobs", local_blobs, floor.min_free_bytes)
    assembler = Assembler(store, blobs, metrics, settings.quiet_period_s, max_attempts=settings.max_assembly_attempts)
    # one audit log for the gRPC API and the DICOM SCP (docs/security.md "Audit")
    audit = await asyncio.to_thread(service_audit, settings)
    scp_audit = ScpAudit(audit.recorder.log)
    scp = StoreScp(ScpConfig.from_settings(settings), reception, audit=scp_audit)
    channel = aio_channel(
        settings.segmentation_target,
        settings.max_message_bytes,
        token=settings.token_source(),
        tls=settings.client_tls(),
    )
    dispatcher = OutboxDispatcher(
        store.outbox,
        None,
        {SEGMENT_TOPIC: segmentation_handoff(store, _SegmentationStub(channel))},
        metrics,
    )
    loop = asyncio.get_running_loop()

    def wake_dispatcher() -> None:  # from the assembler's thread
        loop.call_soon_threadsafe(dispatcher.wake)

    assembler.on_assembled = wake_dispatcher
    servicer = IngestServicer(store, reception, assembler, max_instance_bytes=settings.max_instance_mb * 1024 * 1024)

    # DeleteStudy (`atlasflow.ingest.deletion`): its PurgeStudy hand-offs ride the same outbox
    deletions = await asyncio.to_thread(
        Deletions,
        store,
        blobs,
        refuse_days=settings.deleted_study_refuse_days,
        grace_s=settings.deletion_blob_grace_s,
    )
    peer_channels = [
        aio_channel(target, settings.max_message_bytes, token=settings.token_source(), tls=settings.client_tls())
        for target in (settings.labels_target, settings.ranking_target)
    ]
    purge = purge_client(_SegmentationStub(channel), _LabelStub(peer_channels[0]), _RankingStub(peer_channels[1]))
    dispatcher.handlers[PURGE_TOPIC] = purge_handler(deletions, purge)
    dispatcher.handlers[SWEEP_TOPIC] = sweep_handler(deletions, purge)
    servicer.deletions = deletions
    servicer.wake_outbox = dispatcher.wake

    async def purge_uploads() -> None:  # abandoned resumable uploads and spool files, hourly
        while True:
            await asyncio.sleep(min(3600.0, settings.upload_ttl_s))
            await asyncio.to_thread(store.uploads.purge, settings.upload_ttl_s)

    def register(server: grpc.aio.Server) -> list[str]:
        _add_servicer(servicer, server)
        return [ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name]

    built = build_service_server(settings, register, metrics=metrics, tracer_provider=tracer_provider, audit=audit)

    async def stop_scp_then_flush() -> None:
        # the server's on_stop closes the audit log (last): the SCP stops before (it is stopped
        # again, a no-op, with the background parts) and its pending aggregates are written
        await asyncio.to_thread(scp.stop)
        await asyncio.to_thread(scp_audit.close)

    built.on_stop.append(stop_scp_then_flush)
    ready_fields: dict[str, Any] = {"dicom_port": settings.dicom_port, "ae_title": settings.ae_title}

    async def drain_spool() -> None:
        # a stopped replica leaves no acknowledged instance in its spool: the other replicas
        # assemble its series at once, and a StatefulSet scaled down leaves an empty volume
        # (what a kill leaves is replayed when the pod, with its volume, starts again)
        try:
            moved = await asyncio.to_thread(store.spool_drain.drain)
            log.info("spool drained at stop", extra={"fields": {"records": moved}})
        except Exception as exc:  # noqa: BLE001 - the records stay in the spool: replayed at the next start
            log.error(
                "spool not drained at stop; replayed at the next start",
                extra={"fields": {"error": type(exc).__name__}},
            )

    def release_outbox() -> None:  # another replica delivers them now, not after the claim expires
        try:
            store.outbox.release()
        except Exception:  # noqa: BLE001 - the database is away: the claims expire instead
            log.warning("outbox claims not released; they expire")

    return ServiceApp(
        "ingest",
        built,
        background=[
            ScpPart(scp, ready_fields),
            TaskLoop("assembler", assembler.run),
            TaskLoop("outbox", dispatcher.run),
            TaskLoop("upload-purge", purge_uploads),
        ],
        # reverse order: the channels, this replica's outbox claims given back, its spool
        # drained into the blob store, then the store
        closers=[store.close, drain_spool, release_outbox, channel.close, *(c.close for c in peer_channels)],
        parts={"store": store, "reception": reception, "scp": scp, "assembler": assembler, "servicer": servicer},
        ready_fields=ready_fields,
        metrics=metrics,
    )


def upgrade_database(database: str) -> str:
    """Apply ingest's schema migrations to `database` (URL or SQLite path; what the service does
    on start); return the database's revision. `atlasflow db upgrade --service ingest`."""
    engine = db.create_engine(database)
    try:
        return db.upgrade(engine, MIGRATIONS)
    finally:
        engine.dispose()


def main() -> None:
    run_service("ingest", IngestSettings.from_env(PREFIX), build_app)
