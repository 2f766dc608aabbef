"""The ingest database's legacy hand-written schema (no grpc).

The schema itself is migrated by Alembic (`atlasflow.ingest.migrations`; revision 0001 = the
state `LEGACY_MIGRATIONS` leave). `LEGACY_MIGRATIONS` only finish a database made before Alembic
when it is adopted (`atlasflow.common.sqlite.migrate`): frozen, never append to it (add an
Alembic revision instead). Tables: series_versions, instances, instance_conflicts
(`atlasflow.ingest.store`), the outbox, uploads (`atlasflow.ingest.uploads`), deletions
(`atlasflow.ingest.deletion`)."""

from __future__ import annotations

from atlasflow.common.outbox import OUTBOX_MIGRATION

LEGACY_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE series_versions (
        series_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        case_id TEXT NOT NULL,
        state TEXT NOT NULL,                 -- RECEIVING | ASSEMBLED | DISPATCHED | FAILED
        instance_count INTEGER NOT NULL DEFAULT 0,
        last_instance_at REAL NOT NULL,
        volume_digest TEXT NOT NULL DEFAULT '',
        volume_size INTEGER NOT NULL DEFAULT 0,
        geometry_json TEXT NOT NULL DEFAULT '',
        failure_reason TEXT NOT NULL DEFAULT '',
        traceparent TEXT NOT NULL DEFAULT '',
        create_time REAL NOT NULL,
        update_time REAL NOT NULL,
        PRIMARY KEY (series_id, version)
    );
    CREATE INDEX series_state ON series_versions(state, last_instance_at);
    CREATE TABLE instances (
        series_id TEXT NOT NULL,
        sop_key TEXT NOT NULL,               -- sha256 of the SOP Instance UID
        version_added INTEGER NOT NULL,
        digest TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        received_at REAL NOT NULL,
        PRIMARY KEY (series_id, sop_key)
    );
    CREATE TABLE instance_conflicts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        series_id TEXT NOT NULL,
        sop_key TEXT NOT NULL,
        digest TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        received_at REAL NOT NULL
    );
    """,
    OUTBOX_MIGRATION,  # legacy step 2: the hand-written outbox table (frozen)
    """
    ALTER TABLE series_versions ADD COLUMN duplicate_count INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE series_versions ADD COLUMN conflict_count INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX instance_conflicts_key ON instance_conflicts(series_id, sop_key, digest);
    """,
    # content_key: see `content_key`; '' = not computed yet (rows written before it existed, and
    # first receptions: computed from the stored bytes when the SOP Instance UID comes again)
    """
    ALTER TABLE instances ADD COLUMN content_key TEXT NOT NULL DEFAULT '';
    ALTER TABLE instance_conflicts ADD COLUMN content_key TEXT NOT NULL DEFAULT '';
    """,
    # resumable gRPC uploads (see `atlasflow.ingest.uploads.UploadStore.write`)
    """
    CREATE TABLE uploads (
        upload_id TEXT PRIMARY KEY,
        committed_offset INTEGER NOT NULL,
        complete INTEGER NOT NULL DEFAULT 0,
        sha256 TEXT NOT NULL DEFAULT '',
        receipt_json TEXT NOT NULL DEFAULT '',
        create_time REAL NOT NULL,
        update_time REAL NOT NULL
    );
    """,
    # series versions by the volume they assembled (`series_by_volume`, StreamSeriesInstances)
    """
    CREATE INDEX series_by_volume ON series_versions(volume_digest, update_time);
    """,
    # assemblies started per series version (`IngestStore.begin_assembly`): a version whose
    # assembly killed the process `max_assembly_attempts` times ends FAILED, not crash-looping
    """
    ALTER TABLE series_versions ADD COLUMN assembly_attempts INTEGER NOT NULL DEFAULT 0;
    """,
    # study deletions (`atlasflow.ingest.deletion`): the operation, its steps per service, and
    # the tombstone that refuses new instances of a deleted study for a while
    """
    CREATE TABLE deletions (
        deletion_id TEXT PRIMARY KEY,
        case_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        state TEXT NOT NULL,                 -- RUNNING | SUCCEEDED
        create_time REAL NOT NULL,
        update_time REAL NOT NULL
    );
    CREATE INDEX deletions_by_case ON deletions(case_id, create_time);
    CREATE TABLE deletion_steps (
        deletion_id TEXT NOT NULL REFERENCES deletions(deletion_id),
        service TEXT NOT NULL,
        position INTEGER NOT NULL,
        state TEXT NOT NULL,                 -- QUEUED | SUCCEEDED
        counts_json TEXT NOT NULL DEFAULT '{}',
        released_json TEXT NOT NULL DEFAULT '[]',
        last_error TEXT NOT NULL DEFAULT '',
        done_time REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (deletion_id, service)
    );
    """,
)

MIGRATIONS = LEGACY_MIGRATIONS  # the name older code and tests import
