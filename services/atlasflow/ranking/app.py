"""`atlasflow serve ranking`: the worklist store behind the RankingService gRPC API.

`build_app` wires the worklist store, the servicer and the gRPC server; ranking has no
background loop of its own (labels and segmentation push to it). Replicas: any number may
serve one PostgreSQL database; what each keeps in memory is listed in
`atlasflow.ranking.store` ("Per-process state").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from atlasflow.common import db
from atlasflow.common.app import ServiceApp, build_service_server, run_service
from atlasflow.common.metrics import Metrics
from atlasflow.ranking.migrations import MIGRATIONS
from atlasflow.ranking.servicer import RankingServicer
from atlasflow.ranking.settings import PREFIX, RankingSettings
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.ranking.worklist import SqlWorklist, worklist_readings

# The generated gRPC module carries no annotations: its registration, typed here.
_add_servicer: Callable[[RankingServicer, grpc.aio.Server], None] = (
    ranking_pb2_grpc.add_RankingServiceServicer_to_server
)


async def build_app(
    settings: RankingSettings,
    *,
    metrics: Metrics | None = None,
    worklist: SqlWorklist | None = None,
    tracer_provider: Any = None,
) -> ServiceApp:
    """The ranking service (built, not started); port 0 picks a free port.

    ``worklist``: an open store to serve (the caller keeps it open after `ServiceApp.stop`);
    default a `SqlWorklist` on ``settings.database_url`` (empty: SQLite in
    ``settings.data_dir``), migrated to the newest schema, closed on stop."""
    metrics = metrics or Metrics("ranking")
    owned = worklist is None
    store = (
        worklist
        if worklist is not None
        else await asyncio.to_thread(
            SqlWorklist,
            settings.database_url or Path(settings.data_dir) / "ranking.sqlite3",
            default_lease_s=settings.lease_seconds,
        )
    )
    servicer = RankingServicer(store, metrics)
    # the learned model in force, and any rescoring a killed replica left unfinished
    await asyncio.to_thread(servicer.learned.refit)
    metrics.add_source("worklist", lambda: worklist_readings(store))
    metrics.add_disk("state", settings.data_dir)

    def register(server: grpc.aio.Server) -> list[str]:
        _add_servicer(servicer, server)
        return [ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name]

    built = build_service_server(settings, register, metrics=metrics, tracer_provider=tracer_provider)
    return ServiceApp(
        "ranking",
        built,
        closers=[store.close] if owned else [],
        parts={"worklist": store, "servicer": servicer},
        metrics=metrics,
    )


def upgrade_database(database: str) -> str:
    """Apply ranking's schema migrations to `database` (URL or SQLite path; what the service
    does on start); return the database's revision. `atlasflow db upgrade --service ranking`."""
    engine = db.create_engine(database)
    try:
        return db.upgrade(engine, MIGRATIONS)
    finally:
        engine.dispose()


def main() -> None:
    run_service("ranking", RankingSettings.from_env(PREFIX), build_app)
