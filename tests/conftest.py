"""Shared test configuration: hooks, and the shared PostgreSQL fixtures. Test support (the test
data, peers, oracles, in-process servers) is the package `atlasflow.testing`; this file is never
imported.

Stores on both back-ends: a test (or a store fixture) that takes ``db_url`` runs twice, on a
fresh SQLite file and on a fresh database of one real PostgreSQL 15 cluster per session
(`atlasflow.testing.postgres`, started only when a test asks for it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from atlasflow.testing import auth
from atlasflow.testing.data import TEST_DATA
from atlasflow.testing.postgres import PostgresCluster


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once when the real CT test data is missing (see `atlasflow.testing.data`); create
    the session's token issuer and the all-roles client token (`atlasflow.testing.auth`)."""
    assert TEST_DATA.is_dir(), f"test data not found at {TEST_DATA}"
    auth.install()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL 15 cluster for the session (`create_database()` per test)."""
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh empty database: a SQLite file path, or a ``postgresql://`` URL."""
    if request.param == "sqlite":
        return str(tmp_path / "store.sqlite3")
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.create_database()
