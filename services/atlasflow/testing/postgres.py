"""A throwaway PostgreSQL 15 cluster for tests and benchmarks (the real server, never a fake).

    with PostgresCluster() as pg:
        url = pg.create_database()     # "postgresql://postgres@127.0.0.1:<port>/<fresh db>"

The binaries refuse to run as root (sessions and CI run as root): the cluster lives in a fresh
temporary directory owned by the `postgres` user and is started with
``runuser -u postgres -- pg_ctl ...`` on a free TCP port of 127.0.0.1 (trust authentication,
fsync off: a test cluster) with its unix socket in the same directory; `stop()` stops it
(``-m immediate``) and removes the directory. As tests/labels/conftest.py has done since the
labels store; the shared fixtures (tests/conftest.py ``postgres``, ``db_url``) use this class.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Self

PG_BIN = Path(os.environ.get("ATLASFLOW_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(*args: str) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return list(args)


class PostgresCluster:
    """One initdb'd cluster on loopback; `create_database()` hands out empty databases."""

    def __init__(self, *, max_connections: int = 200) -> None:
        self.max_connections = max_connections
        self.root: Path | None = None
        self.port = 0
        self._names = itertools.count()
        self._env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> Self:
        root = Path(tempfile.mkdtemp(prefix="atlasflow-pg-"))
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        self.root, self.port = root, _free_port()
        data = root / "data"
        subprocess.run(
            _as_postgres(
                str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"
            ),
            check=True,
            capture_output=True,
            env=self._env,
            cwd=root,
        )
        options = (
            f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
            f"-c full_page_writes=off -c shared_buffers=32MB -c max_connections={self.max_connections}"
        )
        subprocess.run(
            _as_postgres(
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(root / "log"),
                "-w",
                "-t",
                "60",
                "start",
            ),
            check=True,
            capture_output=True,
            env=self._env,
            cwd=root,
        )
        return self

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; its URL (``postgresql://``, psycopg's and common.db's form)."""
        import psycopg

        name = f"{prefix}{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.admin_url.rsplit("/", 1)[0] + "/" + name

    def stop(self) -> None:
        if self.root is None:
            return
        subprocess.run(
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop"),
            capture_output=True,
            env=self._env,
            cwd=self.root,
        )
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_legacy_schema(url: str, pg_schema: str, sqlite_migrations: list[str]) -> None:
    """A database as a store's hand-written code made it, for adoption tests: on PostgreSQL
    (``postgresql://``) ``pg_schema`` in one transaction; else the SQLite file ``url`` (a path
    or ``sqlite:///``) through ``atlasflow.common.sqlite.migrate``."""
    if url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
            conn.execute(pg_schema)
        return
    from atlasflow.common import sqlite as sq

    db = sq.connect(url)
    sq.migrate(db, sqlite_migrations)
    db.close()
