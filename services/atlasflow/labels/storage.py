"""Which label repository a deployment uses (no grpc).

`open_repository` picks the backend from the labels service's database URL setting
(`ATLASFLOW_LABELS_DATABASE_URL`): SQLite (atlasflow.labels.sqlite) when it is empty,
PostgreSQL (atlasflow.labels.postgres, imported only then: psycopg is needed only there).
"""

from __future__ import annotations

from pathlib import Path

from atlasflow.common.errors import InvalidArgument
from atlasflow.labels.repository import DOMAIN
from atlasflow.labels.sql import SqlLabelRepository
from atlasflow.labels.sqlite import SqliteLabelRepository


def open_repository(database_url: str, data_dir: str | Path) -> SqlLabelRepository:
    """The repository a deployment is configured for.

    database_url: "" -> SQLite at `<data_dir>/labels.sqlite3`; "postgresql://..." (or
    "postgres://...") -> PostgreSQL. Anything else: InvalidArgument("INVALID_SETTING").
    """
    if not database_url:
        return SqliteLabelRepository(Path(data_dir) / "labels.sqlite3")
    if database_url.startswith(("postgresql://", "postgres://")):
        from atlasflow.labels.postgres import PostgresLabelRepository

        return PostgresLabelRepository(database_url)
    raise InvalidArgument(
        "INVALID_SETTING",
        "labels database URL must be empty (SQLite) or postgresql://...",
        domain=DOMAIN,
        metadata={"scheme": database_url.split(":", 1)[0][:20]},
    )
