"""Segmentation's legacy hand-written SQLite schema (no grpc), frozen: how a database made before
Alembic is adopted (`atlasflow.segmentation.migrations.adopt_legacy`). Never append to it: a
change is a new Alembic revision in ``segmentation/migrations/versions/``."""

from __future__ import annotations

from atlasflow.common.outbox import OUTBOX_MIGRATION

LEGACY_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY,
        case_id TEXT NOT NULL,
        series_id TEXT NOT NULL,
        series_version INTEGER NOT NULL,
        ensemble_version TEXT NOT NULL,
        volume_digest TEXT NOT NULL,
        volume_size INTEGER NOT NULL,
        labelled_organs TEXT NOT NULL DEFAULT '[]',
        state TEXT NOT NULL,                 -- QUEUED | RUNNING | SUCCEEDED | FAILED | CANCELLED
        stage TEXT NOT NULL DEFAULT '',
        fraction REAL NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        result_json TEXT NOT NULL DEFAULT '',
        error_reason TEXT NOT NULL DEFAULT '',
        traceparent TEXT NOT NULL DEFAULT '',
        create_time REAL NOT NULL,
        update_time REAL NOT NULL,
        UNIQUE (series_id, series_version, ensemble_version)
    );
    CREATE INDEX jobs_due ON jobs(state, next_attempt_at);
    """,
    OUTBOX_MIGRATION,  # legacy step 2: the hand-written outbox table (frozen)
)
