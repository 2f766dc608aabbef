"""Which label repository a deployment uses (no grpc).

`open_repository` opens the database named by the labels service's database URL setting
(`ATLASFLOW_LABELS_DATABASE_URL`): a SQLite file under the data directory when it is empty,
PostgreSQL otherwise; both through the one database layer (atlasflow.common.db).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atlasflow.common.errors import InvalidArgument
from atlasflow.labels.postgres import PostgresLabelRepository
from atlasflow.labels.repository import DOMAIN
from atlasflow.labels.sql import SqlLabelRepository
from atlasflow.labels.sqlite import SqliteLabelRepository


def open_repository(database_url: str, data_dir: str | Path, **options: Any) -> SqlLabelRepository:
    """The repository a deployment is configured for.

    database_url: "" -> SQLite at `<data_dir>/labels.sqlite3`; "postgresql://..." (or
    "postgres://...") -> PostgreSQL. Anything else: InvalidArgument("INVALID_SETTING").
    options: `SqlLabelRepository`'s keyword arguments (leases and claims).
    """
    if not database_url:
        return SqliteLabelRepository(Path(data_dir) / "labels.sqlite3", **options)
    if database_url.startswith(("postgresql://", "postgres://")):
        return PostgresLabelRepository(database_url, **options)
    raise InvalidArgument(
        "INVALID_SETTING",
        "labels database URL must be empty (SQLite) or postgresql://...",
        domain=DOMAIN,
        metadata={"scheme": database_url.split(":", 1)[0][:20]},
    )
