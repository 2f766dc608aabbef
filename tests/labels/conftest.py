"""Fixtures of the labels tests: a throwaway PostgreSQL 15 cluster for the whole session.

The PostgreSQL binaries refuse to run as root (sessions and CI run as root): the cluster lives
in a fresh temporary directory owned by the `postgres` user and is started with
`runuser -u postgres -- pg_ctl ...` on a free TCP port of 127.0.0.1 (trust authentication) with
its unix socket in the same directory; it is stopped (`-m immediate`) and removed at the end.
Each test asks `pg_database()` for a database of its own.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(*args: str) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return list(args)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """Admin URL "postgresql://postgres@127.0.0.1:<port>/postgres" of a running cluster."""
    root = Path(tempfile.mkdtemp(prefix="atlasflow-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    subprocess.run(
        _as_postgres(
            str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"
        ),
        check=True,
        capture_output=True,
        env=env,
        cwd=root,
    )
    options = (
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c full_page_writes=off -c shared_buffers=32MB -c max_connections=100"
    )
    subprocess.run(
        _as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "-t", "60", "start"
        ),
        check=True,
        capture_output=True,
        env=env,
        cwd=root,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"),
            capture_output=True,
            env=env,
            cwd=root,
        )
        shutil.rmtree(root, ignore_errors=True)


_db_counter = itertools.count()


@pytest.fixture
def pg_database(pg_server: str) -> Callable[[], str]:
    """Callable making a fresh empty database; returns its URL."""

    def make() -> str:
        name = f"t{os.getpid()}_{next(_db_counter)}"
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return pg_server.rsplit("/", 1)[0] + "/" + name

    return make
