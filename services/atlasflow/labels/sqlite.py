"""The label repository on a SQLite file (the embedded default; no grpc).

`SqliteLabelRepository` is `atlasflow.labels.sql.SqlLabelRepository` opened on a file path:
the one database layer (atlasflow.common.db) with its SQLite settings (WAL, ``BEGIN
IMMEDIATE`` writers, a busy timeout), the schema upgraded with Alembic on open (a database the
hand-written migrations made is adopted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atlasflow.labels.sql import SqlLabelRepository


class SqliteLabelRepository(SqlLabelRepository):
    """`LabelRepository` on an SQLite file. Thread-safe; several instances (threads, processes)
    on the same file are safe. kwargs: see `SqlLabelRepository`."""

    def __init__(self, path: str | Path, **kwargs: Any) -> None:
        super().__init__(Path(path), **kwargs)
