"""Ranking's typed settings: ``ATLASFLOW_RANKING_*`` environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from atlasflow.common.settings import ServiceSettings
from atlasflow.ranking.leases import DEFAULT_LEASE_S

PREFIX = "ATLASFLOW_RANKING_"


@dataclass(frozen=True)
class RankingSettings(ServiceSettings):
    """ATLASFLOW_RANKING_* settings. lease_seconds: default review lease length, s (1 .. 28800)."""

    grpc_port: int = 50053
    lease_seconds: float = DEFAULT_LEASE_S
    # ATLASFLOW_RANKING_DATABASE_URL: empty = SQLite at <data_dir>/ranking.sqlite3 (embedded);
    # "postgresql://user:pass@host:5432/db" = PostgreSQL (cluster; replicas share it). Alembic
    # migrations run on start (atlasflow.ranking.migrations).
    database_url: str = ""
