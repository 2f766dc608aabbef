"""The label repository on PostgreSQL (psycopg 3; production deployments; no grpc).

`PostgresLabelRepository` is `atlasflow.labels.sql.SqlLabelRepository` opened on a
``postgresql://`` URL: the one database layer (atlasflow.common.db) with its connection pool,
READ COMMITTED writes with a per-case advisory lock, REPEATABLE READ reads, the schema
upgraded with Alembic on open under an advisory lock (replicas starting together apply each
revision once; a database the hand-written migrations made is adopted). Several replicas may
share the database: version events are claimed with leases (``FOR UPDATE SKIP LOCKED``) and an
export job is run by the replica holding its lease.
"""

from __future__ import annotations

from typing import Any

from atlasflow.common.db import PoolSettings
from atlasflow.labels.sql import SqlLabelRepository


class PostgresLabelRepository(SqlLabelRepository):
    """`LabelRepository` on PostgreSQL. url: e.g. "postgresql://atlasflow@db:5432/atlasflow";
    max_connections: the pool's size plus overflow (default 8). kwargs: see
    `SqlLabelRepository`."""

    def __init__(self, url: str, *, max_connections: int = 8, **kwargs: Any) -> None:
        size = max(1, min(4, max_connections))
        kwargs.setdefault("pool", PoolSettings(size=size, max_overflow=max(0, max_connections - size)))
        super().__init__(url, **kwargs)
