"""`atlasflow serve labels`: label repository, export worker and the LabelService gRPC API."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.clients import aio_channel
from atlasflow.common.metrics import Metrics
from atlasflow.common.nifti import from_nifti_bytes
from atlasflow.common.outbox import OutboxDispatcher, OutboxRow
from atlasflow.common.server import BuiltServer, build_server, run_until_signalled
from atlasflow.common.settings import ServiceSettings
from atlasflow.common.telemetry import setup_logging, setup_tracing, shutdown_tracing
from atlasflow.labels.events import TOPIC, VersionEventStore, human_decided, organ_geometry, ranking_request
from atlasflow.labels.storage import open_repository
from atlasflow.labels.service import Exporter, IngestSourceInstances, LabelServicer
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2_grpc

log = logging.getLogger(__name__)
PREFIX = "ATLASFLOW_LABELS_"


@dataclass(frozen=True)
class LabelsSettings(ServiceSettings):
    grpc_port: int = 50054
    # When set, exports may only be written inside this directory (the cluster mounts a
    # volume here; the root filesystem is read-only). Empty: any absolute file:// path.
    export_dir: str = ""
    # ATLASFLOW_LABELS_DATABASE_URL: empty = SQLite at <data_dir>/labels.sqlite3 (embedded);
    # "postgresql://user@host:5432/db" = PostgreSQL (cluster). Migrations run on start.
    database_url: str = ""
    # ATLASFLOW_LABELS_INGEST_TARGET: host:port of the ingest service's gRPC API, from which
    # DICOM SEG exports fetch the source CT instances (IngestService.StreamSeriesInstances).
    ingest_target: str = "127.0.0.1:50051"
    # ATLASFLOW_LABELS_RANKING_TARGET: host:port of the ranking service, told about every new
    # label version (RankingService.RecordLabelVersion) through the version-event outbox.
    ranking_target: str = "127.0.0.1:50053"


async def amain(settings: LabelsSettings) -> None:
    metrics = Metrics("labels")
    metrics.serve(settings.metrics_port, settings.grpc_host)
    blobs = LocalBlobStore(settings.blob_dir)
    repo = open_repository(settings.database_url, settings.data_dir)
    sources = IngestSourceInstances(settings.ingest_target, settings.max_message_bytes)
    exporter = Exporter(repo, blobs, metrics, sources=sources)
    export_root = Path(settings.export_dir).resolve() if settings.export_dir else None

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        labels_pb2_grpc.add_LabelServiceServicer_to_server(LabelServicer(repo, blobs, exporter, export_root), server)
        return [labels_pb2.DESCRIPTOR.services_by_name["LabelService"].full_name]

    built = build_server(
        register=register,
        metrics=metrics,
        host=settings.grpc_host,
        port=settings.grpc_port,
        max_message_bytes=settings.max_message_bytes,
    )
    ranking_channel = aio_channel(settings.ranking_target, settings.max_message_bytes)
    ranking = ranking_pb2_grpc.RankingServiceStub(ranking_channel)

    def version_event(row: OutboxRow):  # type: ignore[no-untyped-def]
        record = repo.get_version(row.dedupe_key)
        human = human_decided(record)
        geometry = []
        if human:  # the label map is read (and verified) only when a human decided organs
            label_map, affine = from_nifti_bytes(blobs.get(record.label_map_digest))
            geometry = organ_geometry(label_map, affine, human)
        return ranking_request(record, int(row.payload), geometry)

    async def to_ranking(row: OutboxRow) -> None:
        request = await asyncio.to_thread(version_event, row)
        await ranking.RecordLabelVersion(request, timeout=30)

    events = OutboxDispatcher(VersionEventStore(repo), None, {TOPIC: to_ranking}, metrics, poll_s=0.5)
    tasks = [asyncio.create_task(exporter.run()), asyncio.create_task(events.run())]

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ranking_channel.close()
        sources.close()
        repo.close()

    built.on_stop.append(close)

    def ready(b: BuiltServer) -> None:
        log.info("labels ready", extra={"fields": {"grpc_port": b.port}})

    await run_until_signalled(built, settings.shutdown_grace_s, ready)


def main() -> None:
    settings = LabelsSettings.from_env(PREFIX)
    setup_logging("labels", settings.log_level)
    setup_tracing("atlasflow-labels")
    try:
        asyncio.run(amain(settings))
    finally:
        shutdown_tracing()
