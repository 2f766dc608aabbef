"""The audit log's schema migrations (Alembic, run by `atlasflow.common.db.upgrade` when an
`atlasflow.common.audit.AuditLog` opens).

The audit log is not a service: every service (and the gateway) keeps one, in
``<data_dir>/audit.sqlite3`` or in the service's own PostgreSQL database. Its schema is
therefore named ``audit``: version table ``alembic_version_audit`` and advisory lock
``alembic:audit``, beside the service's own ``alembic_version_<service>`` in a shared database
(several services sharing one PostgreSQL database share one ``audit_log`` table and one chain,
as before).

Revision 0001 is the baseline: the ``audit_log`` table, its two indexes and its append-only
triggers exactly as the hand-written code made them (`LEGACY_SQLITE_MIGRATIONS`, applied with
`atlasflow.common.sqlite.migrate` on SQLite; `LEGACY_PG_SCHEMA` on PostgreSQL, which kept no
version table at all). Both are frozen here: they are what a legacy database holds, and the
baseline-equality test builds a legacy schema with them.

Adoption: a database that has ``audit_log`` and no ``alembic_version_audit`` was made by the
hand-written code (on SQLite its ``schema_migrations`` may belong to another service when the
audit log shares the service's file, so ``audit_log`` alone marks it). `adopt_legacy` re-applies
the legacy DDL idempotently (an index or trigger that is missing, e.g. dropped by hand, is made
again; rows are never touched), then 0001 is stamped.

Adding a change: a new ``versions/000N_<what>.py`` (``down_revision`` the previous one), in SQL
both SQLite and PostgreSQL accept; never edit a released revision; never add an UPDATE or
DELETE of ``audit_log`` rows (the triggers refuse it: the log is append-only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atlasflow.common.db import Migrations, adopt_idempotently

#: The hand-written SQLite schema (atlasflow.common.sqlite.migrate, version 1). Frozen.
LEGACY_SQLITE_MIGRATIONS = [
    """
    CREATE TABLE audit_log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        record_id TEXT NOT NULL UNIQUE,
        time TEXT NOT NULL,
        service TEXT NOT NULL,
        action TEXT NOT NULL,
        method TEXT NOT NULL,
        principal TEXT NOT NULL,
        roles TEXT NOT NULL,
        peer TEXT NOT NULL,
        client_identity TEXT NOT NULL,
        targets TEXT NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT NOT NULL,
        cause TEXT NOT NULL,
        suppressed INTEGER NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_log_by_time ON audit_log(time);
    CREATE INDEX audit_log_by_principal ON audit_log(principal, seq);
    CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    """,
]

#: The hand-written PostgreSQL schema (applied, idempotently, by every AuditLog that opened). Frozen.
LEGACY_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGSERIAL PRIMARY KEY,
    record_id TEXT NOT NULL UNIQUE,
    time TEXT NOT NULL,
    service TEXT NOT NULL,
    action TEXT NOT NULL,
    method TEXT NOT NULL,
    principal TEXT NOT NULL,
    roles TEXT NOT NULL,
    peer TEXT NOT NULL,
    client_identity TEXT NOT NULL,
    targets TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    cause TEXT NOT NULL,
    suppressed INTEGER NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_by_time ON audit_log(time);
CREATE INDEX IF NOT EXISTS audit_log_by_principal ON audit_log(principal, seq);
CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only';
END;
$$;
DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log;
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
"""

#: The advisory lock the hand-written PostgreSQL code took around its DDL and every append (an
#: AuditLog of this version still appends under it, so a rolling update never forks the chain).
LEGACY_PG_LOCK = 0x61756469_745F6C67 & 0x7FFFFFFFFFFFFFFF  # "audit_lg"

# The legacy SQLite statements in their idempotent form (adoption may meet a database whose
# triggers were dropped by hand; CREATE TABLE is never needed: audit_log marks a legacy database).
_SQLITE_ADOPT = [
    "CREATE INDEX IF NOT EXISTS audit_log_by_time ON audit_log(time)",
    "CREATE INDEX IF NOT EXISTS audit_log_by_principal ON audit_log(principal, seq)",
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log"
    " BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log"
    " BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END",
]


def adopt_legacy(dbapi_conn: Any) -> None:
    """Bring a legacy audit database (sqlite3 or psycopg connection) to the baseline: its
    indexes and append-only triggers, made again where missing; rows untouched."""
    adopt_idempotently(dbapi_conn, pg_lock=LEGACY_PG_LOCK, pg_script=LEGACY_PG_SCHEMA, sqlite_statements=_SQLITE_ADOPT)


# The hand-written PostgreSQL code kept no version table, and on SQLite ``schema_migrations``
# may be another service's: ``audit_log`` alone marks a legacy audit database.
MIGRATIONS = Migrations(
    service="audit",
    directory=Path(__file__).resolve().parent,
    baseline="0001",
    legacy_tables=("audit_log",),
    adopt_legacy=adopt_legacy,
    legacy_unversioned=True,
)
