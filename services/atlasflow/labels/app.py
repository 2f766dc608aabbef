"""`atlasflow serve labels`: label repository, export worker, version-event outbox and the
LabelService gRPC API.

`build_app` wires them the common way (`atlasflow.common.app`): the export worker and the
outbox dispatcher that tells ranking about new versions are `TaskLoop`s on the server's event
loop (their blocking work runs in threads); stopping closes the ranking channel, the ingest
client and the repository.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from atlasflow.common import db
from atlasflow.common.app import Closer, ServiceApp, TaskLoop, build_service_server, run_service
from atlasflow.common.blobstore import S3Options
from atlasflow.common.clients import aio_channel
from atlasflow.common.metrics import Metrics
from atlasflow.labels.deid import Pseudonymizer, ensure_key_file
from atlasflow.labels.export_jobs import parse_pacs_destinations
from atlasflow.labels.export_store import parse_s3_prefixes
from atlasflow.labels.ingest_sources import IngestSourceInstances
from atlasflow.labels.migrations import MIGRATIONS
from atlasflow.labels.ranking_leases import RankingLeases
from atlasflow.labels.repository import LabelRepository
from atlasflow.labels.servicer import LabelServicer, review_seconds_histogram
from atlasflow.labels.settings import PREFIX, LabelsSettings
from atlasflow.labels.storage import open_repository
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.labels.worker import Exporter, version_events
from atlasflow.ranking.v1 import ranking_pb2_grpc

# The generated gRPC modules carry no annotations: their stub and registration, typed here.
log = logging.getLogger(__name__)
_RankingStub: Callable[[grpc.aio.Channel], Any] = ranking_pb2_grpc.RankingServiceStub
_add_servicer: Callable[[LabelServicer, grpc.aio.Server], None] = labels_pb2_grpc.add_LabelServiceServicer_to_server


async def build_app(
    settings: LabelsSettings,
    *,
    metrics: Metrics | None = None,
    repository: LabelRepository | None = None,
    tracer_provider: Any = None,
) -> ServiceApp:
    """The labels service (built, not started); port 0 picks a free port.

    ``repository``: an open store to serve (the caller keeps it open after `ServiceApp.stop`);
    default `open_repository(settings.database_url, settings.data_dir)`, closed on stop."""
    metrics = metrics or Metrics("labels")
    blobs = settings.blob_store()
    owned = repository is None
    repo = (
        repository
        if repository is not None
        else await asyncio.to_thread(
            open_repository,
            settings.database_url,
            settings.data_dir,
            export_lease_s=settings.export_lease_s,
            max_export_claims=settings.export_max_claims,
            event_claim_s=settings.event_claim_s,
        )
    )
    sources = IngestSourceInstances(
        settings.ingest_target, settings.max_message_bytes, token=settings.token_source(), tls=settings.client_tls()
    )
    destinations = parse_pacs_destinations(settings.export_pacs_destinations)
    export_s3 = parse_s3_prefixes(
        settings.export_s3_prefixes,
        S3Options(
            endpoint_url=settings.blob_s3_endpoint_url,
            region=settings.blob_s3_region,
            addressing_style=settings.blob_s3_addressing_style,
        ),
    )
    key_file = (
        Path(settings.deid_key_file)
        if settings.deid_key_file
        else ensure_key_file(Path(settings.data_dir) / "deid.key")
    )
    exporter = Exporter(
        repo,
        blobs,
        metrics,
        sources=sources,
        pseudonymizer=Pseudonymizer.from_file(key_file),
        pacs_destinations=destinations,
        export_s3=export_s3,
    )
    export_root = Path(settings.export_dir).resolve() if settings.export_dir else None
    servicer = LabelServicer(repo, blobs, exporter, export_root, destinations, export_s3=export_s3)
    servicer.review_histogram = review_seconds_histogram(metrics.registry)
    servicer.metrics = metrics
    metrics.add_disk("state", settings.data_dir)

    def register(server: grpc.aio.Server) -> list[str]:
        _add_servicer(servicer, server)
        return [labels_pb2.DESCRIPTOR.services_by_name["LabelService"].full_name]

    built = build_service_server(settings, register, metrics=metrics, tracer_provider=tracer_provider)
    ranking_channel = aio_channel(
        settings.ranking_target, settings.max_message_bytes, token=settings.token_source(), tls=settings.client_tls()
    )
    events = version_events(repo, blobs, _RankingStub(ranking_channel), metrics)
    if settings.revise_requires_lease:
        # ReviseLabels only from the reviewer holding the case's lease (asked of ranking)
        servicer.leases = RankingLeases(_RankingStub(ranking_channel))
    else:
        log.warning("REVISE_REQUIRES_LEASE=false: revisions are not tied to a lease; isolated tests only")
    # closed in reverse order: the ranking channel, the ingest client, then the repository
    closers: list[Closer] = [repo.close] if owned else []
    closers += [sources.close, ranking_channel.close]
    return ServiceApp(
        "labels",
        built,
        background=[TaskLoop("labels-export", exporter.run), TaskLoop("labels-version-events", events.run)],
        closers=closers,
        parts={"repository": repo, "blobs": blobs, "exporter": exporter, "events": events, "servicer": servicer},
        metrics=metrics,
    )


def upgrade_database(database: str) -> str:
    """Apply the labels schema's migrations to `database` (URL or SQLite path; what the service
    does on start, adopting a database the hand-written migrations made); return the
    database's revision. `atlasflow db upgrade --service labels`."""
    engine = db.create_engine(database)
    try:
        return db.upgrade(engine, MIGRATIONS)
    finally:
        engine.dispose()


def main() -> None:
    run_service("labels", LabelsSettings.from_env(PREFIX), build_app)
