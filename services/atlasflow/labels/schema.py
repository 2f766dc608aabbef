"""The label repository's hand-written schema, FROZEN: what databases made before Alembic hold.

The schema now lives in Alembic revisions (atlasflow.labels.migrations, via
atlasflow.common.db). These lists stay only for adopting a database the hand-written code
made (`atlasflow.labels.migrations.adopt_legacy` finishes them, then the baseline revision 0001
is stamped): never change them, never append to them; a schema change is a new Alembic
revision.

`LEGACY_MIGRATIONS` (SQLite, applied by atlasflow.common.sqlite.migrate) and
`LEGACY_PG_MIGRATIONS` (PostgreSQL, applied by `migrate_postgres`) hold the same numbers and the
same tables, columns, indexes and triggers, each in its own dialect:

1. label_versions (the immutable chain: one root per case, one child per version), case_heads,
   export_jobs;
2. per-organ provenance and the append-only audit trail;
3. version events (the outbox to ranking), one per existing version;
4. export job options and per-case export outcomes (`legacy_export_options_sql` moves the
   stop-gap's DICOM SEG options out of destination URIs);
5. review time stored with each version: the case's seconds and a JSON object organ id ->
   seconds (0 and '{}' on rows written before: not measured);
6. how much a revision changed each organ it decided: a JSON object organ id -> ml ('{}' on
   rows written before).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any


def legacy_export_options_sql(dialect: str) -> str:
    """Migration-4 statements that move the DICOM SEG options of jobs queued by the stop-gap
    (`<uri>?dicom_seg=1[&pacs_host=H&pacs_port=P&pacs_called_ae=A&pacs_calling_ae=C]`, keys
    in that order, values form-encoded) into `options` and strip the query. Values are
    percent-decoded for the characters a host name or AE title plausibly holds (space : & =
    + / ? # @ %). dialect: "sqlite" or "postgres". Part of migration 4: never change it.
    """
    find = "instr" if dialect == "sqlite" else "strpos"
    u = "destination_uri"

    def between(key: str, next_key: str | None) -> str:
        start = f"{find}({u}, '{key}') + {len(key)}"
        if next_key is None:
            return f"substr({u}, {start})"
        return f"substr({u}, {start}, {find}({u}, '{next_key}') - ({start}))"

    def decoded(expr: str) -> str:
        expr = f"replace({expr}, '+', ' ')"
        for code, char in (
            ("%3A", ":"),
            ("%26", "&"),
            ("%3D", "="),
            ("%2B", "+"),
            ("%2F", "/"),
            ("%3F", "?"),
            ("%23", "#"),
            ("%40", "@"),
            ("%20", " "),
            ("%25", "%"),
        ):
            expr = f"replace({expr}, '{code}', '{char}')"
        return expr

    host = decoded(between("&pacs_host=", "&pacs_port="))
    port = f"CAST({between('&pacs_port=', '&pacs_called_ae=')} AS INTEGER)"
    called = decoded(between("&pacs_called_ae=", "&pacs_calling_ae="))
    calling = decoded(between("&pacs_calling_ae=", None))
    if dialect == "sqlite":
        seg = "json_object('include_dicom_seg', json('true'))"
        pacs = (
            f"json_object('include_dicom_seg', json('true'), 'pacs', json_object("
            f"'called_ae', {called}, 'calling_ae', {calling}, 'host', {host}, 'port', {port}))"
        )
    else:
        seg = "json_build_object('include_dicom_seg', true)::text"
        pacs = (
            f"json_build_object('include_dicom_seg', true, 'pacs', json_build_object("
            f"'called_ae', {called}, 'calling_ae', {calling}, 'host', {host},"
            f" 'port', {port}))::text"
        )
    return f"""
    UPDATE export_jobs SET options = {seg} WHERE {find}({u}, '?dicom_seg=1') > 0;
    UPDATE export_jobs SET options = {pacs}
        WHERE {find}({u}, '?dicom_seg=1&pacs_host=') > 0;
    UPDATE export_jobs SET {u} = substr({u}, 1, {find}({u}, '?') - 1) WHERE {find}({u}, '?') > 0;
    """


# SQLite (FROZEN)
LEGACY_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE label_versions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        version_id TEXT NOT NULL UNIQUE,
        case_id TEXT NOT NULL,
        parent_version_id TEXT REFERENCES label_versions(version_id),
        label_map_digest TEXT NOT NULL,
        label_map_size INTEGER NOT NULL,
        ct_digest TEXT NOT NULL,
        ct_size INTEGER NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('ai', 'radiologist', 'original')),
        model_version TEXT NOT NULL DEFAULT '',
        job_id TEXT NOT NULL DEFAULT '',
        reviewer TEXT NOT NULL DEFAULT '',
        weights_trained INTEGER NOT NULL DEFAULT 0,
        organs TEXT NOT NULL,
        shape TEXT NOT NULL,
        affine TEXT NOT NULL,
        request_id TEXT NOT NULL UNIQUE,
        request_fingerprint TEXT NOT NULL,
        create_time TEXT NOT NULL
    );
    CREATE UNIQUE INDEX label_versions_one_root ON label_versions(case_id)
        WHERE parent_version_id IS NULL;
    CREATE UNIQUE INDEX label_versions_one_child ON label_versions(parent_version_id)
        WHERE parent_version_id IS NOT NULL;
    CREATE INDEX label_versions_by_case ON label_versions(case_id, seq);
    CREATE TABLE case_heads (
        case_id TEXT PRIMARY KEY,
        head_version_id TEXT NOT NULL REFERENCES label_versions(version_id),
        version_count INTEGER NOT NULL
    );
    CREATE TABLE export_jobs (
        job_id TEXT PRIMARY KEY,
        state TEXT NOT NULL
            CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
        destination_uri TEXT NOT NULL,
        case_ids TEXT NOT NULL,
        versions TEXT NOT NULL,
        cases_done INTEGER NOT NULL DEFAULT 0,
        cases_total INTEGER NOT NULL,
        error_reason TEXT NOT NULL DEFAULT '',
        request_id TEXT UNIQUE,
        create_time TEXT NOT NULL,
        update_time TEXT NOT NULL
    );
    CREATE INDEX export_jobs_by_state ON export_jobs(state, create_time);
    """,
    # 2: per-organ provenance ('{}' on rows written before: the version's own provenance
    # applies to every organ) and the append-only audit trail.
    """
    ALTER TABLE label_versions ADD COLUMN organ_provenance TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE audit_records (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        record_id TEXT NOT NULL UNIQUE,
        time TEXT NOT NULL,
        principal TEXT NOT NULL,
        method TEXT NOT NULL,
        case_id TEXT NOT NULL DEFAULT '',
        version_ids TEXT NOT NULL DEFAULT '[]',
        job_id TEXT NOT NULL DEFAULT '',
        outcome TEXT NOT NULL
    );
    CREATE INDEX audit_records_by_case ON audit_records(case_id, seq);
    CREATE INDEX audit_records_by_principal ON audit_records(principal, seq);
    CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    """,
    # 3: version events (outbox to ranking); one per existing version, oldest first.
    """
    CREATE TABLE version_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        version_id TEXT NOT NULL UNIQUE REFERENCES label_versions(version_id),
        case_id TEXT NOT NULL,
        version_number INTEGER NOT NULL,
        traceparent TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX version_events_due ON version_events(state, next_attempt_at, seq);
    INSERT INTO version_events(version_id, case_id, version_number)
        SELECT v.version_id, v.case_id,
               (SELECT COUNT(*) FROM label_versions p
                WHERE p.case_id = v.case_id AND p.seq <= v.seq)
        FROM label_versions v ORDER BY v.seq;
    """,
    # 4: export job options (a JSON object) and per-case export outcomes. Jobs queued by the
    # stop-gap that carried the DICOM SEG options as the destination URI's query get them
    # moved into `options` (see `legacy_export_options_sql`).
    """
    ALTER TABLE export_jobs ADD COLUMN options TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE export_case_outcomes (
        job_id TEXT NOT NULL REFERENCES export_jobs(job_id),
        case_id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        time TEXT NOT NULL,
        PRIMARY KEY (job_id, case_id)
    );
    """
    + legacy_export_options_sql("sqlite"),
    # 5: the reviewer's time for the revision that created a version (seconds; 0 and '{}' on
    # rows written before: not measured).
    """
    ALTER TABLE label_versions ADD COLUMN review_seconds REAL NOT NULL DEFAULT 0;
    ALTER TABLE label_versions ADD COLUMN organ_review_seconds TEXT NOT NULL DEFAULT '{}';
    """,
    # 6: how much a revision changed each organ it decided: organ id -> ml of voxels whose
    # membership in the organ changed against the parent ('{}' on rows written before).
    """
    ALTER TABLE label_versions ADD COLUMN organ_changed_ml TEXT NOT NULL DEFAULT '{}';
    """,
)


# PostgreSQL: the same migrations in its dialect (FROZEN).
LEGACY_PG_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE label_versions (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        version_id TEXT NOT NULL UNIQUE,
        case_id TEXT NOT NULL,
        parent_version_id TEXT REFERENCES label_versions(version_id),
        label_map_digest TEXT NOT NULL,
        label_map_size BIGINT NOT NULL,
        ct_digest TEXT NOT NULL,
        ct_size BIGINT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('ai', 'radiologist', 'original')),
        model_version TEXT NOT NULL DEFAULT '',
        job_id TEXT NOT NULL DEFAULT '',
        reviewer TEXT NOT NULL DEFAULT '',
        weights_trained BOOLEAN NOT NULL DEFAULT FALSE,
        organs TEXT NOT NULL,
        shape TEXT NOT NULL,
        affine TEXT NOT NULL,
        request_id TEXT NOT NULL UNIQUE,
        request_fingerprint TEXT NOT NULL,
        create_time TIMESTAMPTZ NOT NULL
    );
    CREATE UNIQUE INDEX label_versions_one_root ON label_versions(case_id)
        WHERE parent_version_id IS NULL;
    CREATE UNIQUE INDEX label_versions_one_child ON label_versions(parent_version_id)
        WHERE parent_version_id IS NOT NULL;
    CREATE INDEX label_versions_by_case ON label_versions(case_id, seq);
    CREATE TABLE case_heads (
        case_id TEXT PRIMARY KEY,
        head_version_id TEXT NOT NULL REFERENCES label_versions(version_id),
        version_count INTEGER NOT NULL
    );
    CREATE TABLE export_jobs (
        job_id TEXT PRIMARY KEY,
        state TEXT NOT NULL
            CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
        destination_uri TEXT NOT NULL,
        case_ids TEXT NOT NULL,
        versions TEXT NOT NULL,
        cases_done INTEGER NOT NULL DEFAULT 0,
        cases_total INTEGER NOT NULL,
        error_reason TEXT NOT NULL DEFAULT '',
        request_id TEXT UNIQUE,
        create_time TIMESTAMPTZ NOT NULL,
        update_time TIMESTAMPTZ NOT NULL
    );
    CREATE INDEX export_jobs_by_state ON export_jobs(state, create_time);
    """,
    """
    ALTER TABLE label_versions ADD COLUMN organ_provenance TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE audit_records (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        record_id TEXT NOT NULL UNIQUE,
        time TIMESTAMPTZ NOT NULL,
        principal TEXT NOT NULL,
        method TEXT NOT NULL,
        case_id TEXT NOT NULL DEFAULT '',
        version_ids TEXT NOT NULL DEFAULT '[]',
        job_id TEXT NOT NULL DEFAULT '',
        outcome TEXT NOT NULL
    );
    CREATE INDEX audit_records_by_case ON audit_records(case_id, seq);
    CREATE INDEX audit_records_by_principal ON audit_records(principal, seq);
    CREATE FUNCTION audit_records_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit records are append-only';
    END;
    $$;
    CREATE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE ON audit_records
        FOR EACH ROW EXECUTE FUNCTION audit_records_append_only();
    """,
    """
    CREATE TABLE version_events (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        version_id TEXT NOT NULL UNIQUE REFERENCES label_versions(version_id),
        case_id TEXT NOT NULL,
        version_number INTEGER NOT NULL,
        traceparent TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX version_events_due ON version_events(state, next_attempt_at, seq);
    INSERT INTO version_events(version_id, case_id, version_number)
        SELECT version_id, case_id,
               ROW_NUMBER() OVER (PARTITION BY case_id ORDER BY seq)
        FROM label_versions ORDER BY seq;
    """,
    """
    ALTER TABLE export_jobs ADD COLUMN options TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE export_case_outcomes (
        job_id TEXT NOT NULL REFERENCES export_jobs(job_id),
        case_id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        time TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (job_id, case_id)
    );
    """
    + legacy_export_options_sql("postgres"),
    """
    ALTER TABLE label_versions ADD COLUMN review_seconds DOUBLE PRECISION NOT NULL DEFAULT 0;
    ALTER TABLE label_versions ADD COLUMN organ_review_seconds TEXT NOT NULL DEFAULT '{}';
    """,
    """
    ALTER TABLE label_versions ADD COLUMN organ_changed_ml TEXT NOT NULL DEFAULT '{}';
    """,
)


_MIGRATION_LOCK = 0x61746C61_7366_6C6F & 0x7FFFFFFFFFFFFFFF  # "atlasflo": the hand-written code's lock


def migrate_postgres(conn: Any, migrations: Sequence[str]) -> int:
    """Apply the missing hand-written PostgreSQL migrations in order, each in its own
    transaction, as the hand-written code did (FROZEN; adoption and tests only); return the
    version. conn: a psycopg 3 connection in autocommit mode. Concurrent callers serialise on
    the hand-written code's advisory lock."""
    with conn.transaction():  # IF NOT EXISTS alone races between concurrent starters
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ( version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
        )
    for version, script in enumerate(migrations, start=1):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            if conn.execute("SELECT 1 FROM schema_migrations WHERE version = %s", (version,)).fetchone():
                continue
            conn.execute(script)
            conn.execute(
                "INSERT INTO schema_migrations(version, applied_at) VALUES (%s, %s)", (version, datetime.now(UTC))
            )
    row = conn.execute("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations").fetchone()
    return int(row["v"] if isinstance(row, dict) else row[0])
