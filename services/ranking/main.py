"""`atlasflow serve ranking`: the worklist store behind the RankingService gRPC API."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlasflow.common.metrics import Metrics
from atlasflow.common.server import BuiltServer, build_server, run_until_signalled
from atlasflow.common.settings import ServiceSettings
from atlasflow.common.telemetry import setup_logging, setup_tracing, shutdown_tracing
from atlasflow.ranking.service import RankingServicer
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.ranking.worklist import DEFAULT_LEASE_S, SqliteWorklist

log = logging.getLogger(__name__)
PREFIX = "ATLASFLOW_RANKING_"


@dataclass(frozen=True)
class RankingSettings(ServiceSettings):
    """ATLASFLOW_RANKING_* settings. lease_seconds: default review lease length, s (1 .. 28800)."""

    grpc_port: int = 50053
    lease_seconds: float = DEFAULT_LEASE_S


def build_ranking_server(settings: RankingSettings, worklist: SqliteWorklist, metrics: Metrics,
                         *, tracer_provider: Any = None) -> BuiltServer:
    """The ranking gRPC server (built, not started) over `worklist`; port 0 picks a free port.
    The caller owns `worklist` (close it after stopping the server)."""

    def register(server) -> list[str]:  # type: ignore[no-untyped-def]
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(
            RankingServicer(worklist, metrics), server)
        return [ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name]

    return build_server(register=register, metrics=metrics, host=settings.grpc_host,
                        port=settings.grpc_port, max_message_bytes=settings.max_message_bytes,
                        tracer_provider=tracer_provider)


async def amain(settings: RankingSettings) -> None:
    metrics = Metrics("ranking")
    metrics.serve(settings.metrics_port, settings.grpc_host)
    worklist = SqliteWorklist(Path(settings.data_dir) / "ranking.sqlite3",
                              default_lease_s=settings.lease_seconds)
    built = build_ranking_server(settings, worklist, metrics)
    built.on_stop.append(worklist.close)

    def ready(b: BuiltServer) -> None:
        log.info("ranking ready", extra={"fields": {"grpc_port": b.port}})

    await run_until_signalled(built, settings.shutdown_grace_s, ready)


def main() -> None:
    settings = RankingSettings.from_env(PREFIX)
    setup_logging("ranking", settings.log_level)
    setup_tracing("atlasflow-ranking")
    try:
        asyncio.run(amain(settings))
    finally:
        shutdown_tracing()
