"""The one database layer: SQLAlchemy Core 2 engines on SQLite (embedded) and PostgreSQL
(production), transactions, and Alembic migrations per service schema (no grpc).

URLs
----
`database_url(value)` accepts what a setting holds: a file path (SQLite, the embedded default),
``sqlite:///<path>``, or ``postgresql://user:pass@host:5432/db`` (also ``postgres://`` and
``postgresql+psycopg://``; the driver is always psycopg 3, the one the labels store uses).

Engines
-------
SQLite: the pragmas the hand-written stores set (atlasflow.common.sqlite): WAL (readers never
block the writer), ``synchronous=FULL`` (a commit survives power loss), foreign keys on, a busy
timeout of 30 s. pysqlite's own transaction handling is switched off; every transaction begins
with ``BEGIN IMMEDIATE`` (the write lock up front, so two writers never both read a stale state
and race to commit: the second waits) unless it is a read (`Database.read`, deferred ``BEGIN``).
SQLite has one writer at a time, so its transactions are serialisable whatever isolation a
caller asks for.

PostgreSQL: a QueuePool per process (`PoolSettings`: size, overflow, checkout timeout, recycle,
pre-ping so a connection the server or a proxy dropped is replaced instead of failing a call).
Writes run at READ COMMITTED unless the caller asks for more (`transaction(isolation=...)`);
claims lock rows (`Database.for_update(skip_locked=True)` -> ``FOR UPDATE SKIP LOCKED``) and
per-key hand-offs take a transaction-scoped advisory lock (`Database.lock`). Reads
(`Database.read`) run at REPEATABLE READ, read-only: a list's page, count and ranks come from
one snapshot.

Migrations (Alembic, per service schema)
----------------------------------------
Each service keeps its migrations in ``services/atlasflow/<service>/migrations/versions/`` and
describes them with a `Migrations` value in ``<service>/migrations/__init__.py``. `upgrade()`
runs Alembic programmatically (no alembic.ini, no env.py): the service's own version table
(``alembic_version_<service>``, so services may share one PostgreSQL database), all pending
revisions in ONE transaction taken under a lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: an
advisory lock per service), so replicas starting together apply each revision once. Services
call `open_database()` at start, which upgrades to ``head``; ``atlasflow db upgrade --service X
--url URL`` does the same from the command line.

Adopting a database made by the hand-written schema code (atlasflow.common.sqlite.migrate): it
has a ``schema_migrations`` table and the service's tables (`Migrations.legacy_tables`), and no
Alembic version table. `upgrade()` then first calls the
service's `Migrations.adopt_legacy` hook on the raw DB-API connection (it finishes the legacy
migrations, bringing the database to the state the baseline revision describes), stamps the
baseline revision, and upgrades from there. A database stamped with a revision this code does
not know (written by newer code) is refused: FailedPrecondition("SCHEMA_TOO_NEW").
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util.exc import CommandError

from atlasflow.common.errors import FailedPrecondition, InvalidArgument
from atlasflow.common.sqlite import enable_wal

Isolation = Literal["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"]

SQLITE_BUSY_TIMEOUT_MS = 30_000
LEGACY_VERSION_TABLE = "schema_migrations"
_DOMAIN = "atlasflow"


@dataclass(frozen=True)
class PoolSettings:
    """PostgreSQL connection pool of one process (SQLAlchemy QueuePool).

    size: connections kept open; max_overflow: extra connections under load (closed when
    returned); timeout_s: how long a checkout waits for a free connection; recycle_s: a
    connection older than this is replaced (survives server-side idle timeouts); pre_ping: test
    a connection before handing it out; connect_timeout_s: TCP + startup timeout."""

    size: int = 5
    max_overflow: int = 10
    timeout_s: float = 30.0
    recycle_s: int = 1800
    pre_ping: bool = True
    connect_timeout_s: int = 10


def database_url(value: str | Path) -> sa.URL:
    """The SQLAlchemy URL of a setting's value: a path (SQLite) or a sqlite/postgresql URL.

    Raises InvalidArgument("UNSUPPORTED_DATABASE_URL") for any other scheme (the message never
    repeats the URL: it may hold a password)."""
    text = str(value)
    if isinstance(value, Path) or "://" not in text:
        return sa.URL.create("sqlite", database=str(Path(text).expanduser().absolute()))
    try:
        url = sa.make_url(text)
    except sa.exc.ArgumentError:
        url = None
    if url is not None and url.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return url.set(drivername="postgresql+psycopg")
    if url is not None and url.drivername in ("sqlite", "sqlite+pysqlite"):
        return url.set(drivername="sqlite")
    raise InvalidArgument(
        "UNSUPPORTED_DATABASE_URL",
        "the database URL must be a file path, sqlite:///<path> or postgresql://...",
        domain=_DOMAIN,
        metadata={"scheme": text.split("://", 1)[0][:40]},
    )


def create_engine(value: str | Path | sa.URL, *, pool: PoolSettings | None = None) -> sa.Engine:
    """An engine for `value` (see `database_url`) with the project's settings (module docstring)."""
    url = value if isinstance(value, sa.URL) else database_url(value)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    p = pool or PoolSettings()
    return sa.create_engine(
        url,
        pool_size=p.size,
        max_overflow=p.max_overflow,
        pool_timeout=p.timeout_s,
        pool_recycle=p.recycle_s,
        pool_pre_ping=p.pre_ping,
        connect_args={"connect_timeout": p.connect_timeout_s},
    )


def _sqlite_engine(url: sa.URL) -> sa.Engine:
    memory = url.database in (None, "", ":memory:")
    if not memory:
        Path(str(url.database)).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000.0, "check_same_thread": False},
        # ":memory:" is one database per connection: keep exactly one.
        poolclass=sa.StaticPool if memory else sa.QueuePool,
    )

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # pysqlite must not BEGIN on its own; "begin" below does
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        enable_wal(cur, SQLITE_BUSY_TIMEOUT_MS)
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        mode = conn.get_execution_options().get("atlasflow_sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _lock_key(name: str) -> int:
    """Signed 64-bit advisory-lock key of `name` (first 8 bytes of its sha256)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class Database:
    """An engine and the transaction helpers every store uses (thread-safe: one connection
    from the pool per transaction)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.dialect: str = engine.dialect.name
        self.is_postgresql = self.dialect == "postgresql"

    @contextlib.contextmanager
    def transaction(self, isolation: Isolation | None = None) -> Iterator[sa.Connection]:
        """A write transaction: committed when the block ends, rolled back on any exception.

        SQLite: ``BEGIN IMMEDIATE`` (isolation is always serialisable). PostgreSQL: READ
        COMMITTED unless `isolation` says otherwise; a SERIALIZABLE caller must retry on
        ``sqlalchemy.exc.OperationalError`` (serialization failure)."""
        with self.engine.connect() as conn:
            if isolation is not None and self.is_postgresql:
                conn.execution_options(isolation_level=isolation)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A read-only transaction whose statements all see one snapshot (SQLite: deferred
        ``BEGIN``; PostgreSQL: REPEATABLE READ READ ONLY)."""
        with self.engine.connect() as conn:
            if self.is_postgresql:
                conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            else:
                conn.execution_options(atlasflow_sqlite_begin="DEFERRED")
            with conn.begin():
                yield conn

    def for_update(self, *, skip_locked: bool = False) -> str:
        """The row-lock suffix of a SELECT: " FOR UPDATE [SKIP LOCKED]" on PostgreSQL, "" on
        SQLite (its write transaction already holds the database's one write lock)."""
        if not self.is_postgresql:
            return ""
        return " FOR UPDATE SKIP LOCKED" if skip_locked else " FOR UPDATE"

    def lock(self, conn: sa.Connection, name: str, *, shared: bool = False) -> None:
        """Serialise the transactions of `conn`'s kind that name the same key (e.g. one case):
        ``pg_advisory_xact_lock`` on PostgreSQL (released at commit/rollback); nothing on SQLite,
        whose writers are serialised by BEGIN IMMEDIATE. ``shared``: a shared lock
        (``pg_advisory_xact_lock_shared``): shared holders run together, an exclusive holder of
        the key waits for them all and they for it."""
        if self.is_postgresql:
            fn = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
            conn.execute(sa.text(f"SELECT {fn}(:k)"), {"k": _lock_key(name)})

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


# ------------------------------------------------------------------------------- migrations


@dataclass(frozen=True)
class Migrations:
    """A service's Alembic migrations.

    service: the schema's name (version table ``alembic_version_<service>``, advisory lock);
    directory: the folder holding ``versions/``; baseline: the revision whose schema equals the
    final state of the legacy hand-written migrations ("" when the service had none);
    legacy_tables: the tables that mark the service's legacy schema (with ``schema_migrations``;
    another service's legacy tables in a shared database do not count); adopt_legacy: called
    with the raw DB-API connection (sqlite3 or psycopg) of a legacy database before the baseline
    is stamped; it must bring it to the baseline schema (idempotently: it may run again after a
    crash); legacy_unversioned: the legacy code kept no ``schema_migrations`` (it re-applied
    idempotent DDL at every start: the audit log, training's runs), so its tables alone mark a
    legacy database."""

    service: str
    directory: Path
    baseline: str = ""
    legacy_tables: tuple[str, ...] = ()
    adopt_legacy: Callable[[Any], None] | None = None
    legacy_unversioned: bool = False

    def is_legacy(self, tables: set[str]) -> bool:
        """Whether a database with `tables` (and no version table) holds this service's legacy schema."""
        marked = self.legacy_unversioned or LEGACY_VERSION_TABLE in tables
        return marked and bool(self.legacy_tables) and set(self.legacy_tables) <= tables

    @property
    def version_table(self) -> str:
        return f"alembic_version_{self.service}"

    def script(self) -> ScriptDirectory:
        cfg = Config()
        cfg.set_main_option("script_location", str(self.directory))
        return ScriptDirectory.from_config(cfg)


def adopt_idempotently(dbapi_conn: Any, *, pg_lock: int, pg_script: str, sqlite_statements: Sequence[str]) -> None:
    """An `adopt_legacy` for schemas whose legacy code re-applied idempotent DDL at every start:
    on PostgreSQL (psycopg, outside autocommit) `pg_script` in one transaction under the legacy
    code's advisory lock `pg_lock`; on SQLite (sqlite3 in autocommit, as `create_engine` sets it)
    `sqlite_statements` in one ``BEGIN IMMEDIATE`` transaction. Missing indexes or triggers are
    made again; rows are never touched."""
    postgres = type(dbapi_conn).__module__.startswith("psycopg")
    cur = dbapi_conn.cursor()
    try:
        if postgres:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (pg_lock,))
            cur.execute(pg_script)
            dbapi_conn.commit()
            return
        cur.execute("BEGIN IMMEDIATE")
        for sql in sqlite_statements:
            cur.execute(sql)
        cur.execute("COMMIT")
    except BaseException:
        if postgres:
            dbapi_conn.rollback()
        else:
            cur.execute("ROLLBACK")
        raise
    finally:
        cur.close()


def current_revision(engine: sa.Engine, migrations: Migrations) -> str | None:
    """The revision the database is stamped with (None: not under Alembic yet)."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": migrations.version_table})
        return ctx.get_current_revision()


def upgrade(engine: sa.Engine, migrations: Migrations, revision: str = "head") -> str:
    """Adopt a legacy database if needed, then apply every revision up to `revision`; return the
    database's revision. Idempotent; safe when several processes run it at once."""
    script = migrations.script()
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
    if migrations.version_table not in tables and migrations.is_legacy(tables):
        if not migrations.baseline or migrations.adopt_legacy is None:
            raise FailedPrecondition(
                "SCHEMA_NOT_ADOPTABLE",
                "the database holds a hand-written schema this service cannot adopt",
                domain=_DOMAIN,
                metadata={"service": migrations.service},
            )
        raw = engine.raw_connection()
        try:
            migrations.adopt_legacy(raw.driver_connection)
        finally:
            raw.close()
    with engine.connect() as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(f"alembic:{migrations.service}")})
        ctx = MigrationContext.configure(
            conn,
            opts={
                "version_table": migrations.version_table,
                "script": script,
                "fn": lambda rev, _ctx: script._upgrade_revs(revision, rev),
            },
        )
        try:
            current = ctx.get_current_revision()
            if current is None and migrations.is_legacy(set(sa.inspect(conn).get_table_names())):
                ctx.stamp(script, migrations.baseline)
            with Operations.context(ctx):
                ctx.run_migrations()
            head = ctx.get_current_revision()
        except (CommandError, ResolutionError) as exc:
            raise FailedPrecondition(
                "SCHEMA_TOO_NEW",
                "the database was written by a newer atlasflow version",
                domain=_DOMAIN,
                metadata={"service": migrations.service},
            ) from exc
    return head or ""


def open_database(value: str | Path | sa.URL, migrations: Migrations, *, pool: PoolSettings | None = None) -> Database:
    """The database at `value`, upgraded to the newest revision of `migrations` (what a
    service does at start)."""
    engine = create_engine(value, pool=pool)
    try:
        upgrade(engine, migrations)
    except BaseException:
        engine.dispose()
        raise
    return Database(engine)
