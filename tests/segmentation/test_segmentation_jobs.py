"""The segmentation job store's contract on SQLite and PostgreSQL (`db_url`): idempotent submit,
claims with leases (exclusive, heartbeat, take-over after expiry, a lost lease commits nothing),
cancellation, purge and blob references, the lease gauges, and adoption of a database made by
the hand-written schema (stamped baseline, then upgraded; `atlasflow db upgrade`)."""

from __future__ import annotations

import json
import sqlite3

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from atlasflow.common import sqlite as sq
from atlasflow.common.db import create_engine, current_revision, upgrade
from atlasflow.common.outbox import OUTBOX_MIGRATION, enqueue
from atlasflow.segmentation.jobs import JobStore
from atlasflow.segmentation.migrations import MIGRATIONS
from atlasflow.segmentation.schema import LEGACY_MIGRATIONS

VOL_A, VOL_B = "sha256:" + "1" * 64, "sha256:" + "2" * 64
MASK, HEAT = "sha256:" + "3" * 64, "sha256:" + "4" * 64
T0 = 1_800_000_000.0


class Clock:
    """Moved by the test; each reading ticks 1 ms (jobs submitted in a row keep their order)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


def submit(jobs: JobStore, series: str = "ser-a", version: int = 1, case: str = "case-a", volume: str = VOL_A):
    return jobs.submit(
        case_id=case,
        series_id=series,
        series_version=version,
        ensemble_version="abdomen-trio-v1",
        volume_digest=volume,
        volume_size=10,
        labelled_organs=[3, 1, 3],
        traceparent="",
    )


def handoffs(job_id: str) -> list[tuple[str, str, bytes]]:
    return [("t.labels", f"{job_id}:labels", b"l"), ("t.ranking", f"{job_id}:ranking", b"r")]


def outbox_keys(jobs: JobStore) -> list[str]:
    with jobs.db.read() as conn:
        return sorted(r[0] for r in conn.execute(sa.text("SELECT dedupe_key FROM outbox")))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pair(db_url, clock):
    """Two replicas' stores on one database, one clock."""
    a = JobStore(db_url, lease_s=60.0, holder="replica-a", clock=clock)
    b = JobStore(db_url, lease_s=60.0, holder="replica-b", clock=clock)
    yield a, b
    a.close()
    b.close()


def test_submit_is_idempotent_across_replicas(pair, clock):
    a, b = pair
    job, created = submit(a)
    again, created_again = submit(b)
    assert created and not created_again and again.job_id == job.job_id
    assert job.state == "QUEUED" and job.labelled_organs == [1, 3]
    clock.now += 1
    assert submit(b, version=2)[1]  # a new series version is a new job
    listed, token = a.list(10, "", case_id="case-a")
    assert [j.series_version for j in listed] == [2, 1] and token == ""


def test_claims_are_leased_and_taken_over_after_expiry(pair, clock):
    a, b = pair
    job, _ = submit(a)
    claimed = a.claim_next()
    assert claimed is not None and claimed.job_id == job.job_id
    assert claimed.state == "RUNNING" and claimed.attempts == 1 and claimed.lease_holder == "replica-a"
    assert b.claim_next() is None  # a holds it
    clock.now += 50
    assert a.heartbeat(job.job_id)
    clock.now += 50  # 100 s after the claim, 50 s after the heartbeat: still a's
    assert b.claim_next() is None
    assert b.expired_leases(clock.now) == 0 and b.oldest_running_age(clock.now) == pytest.approx(50, abs=0.1)
    clock.now += 11  # a's lease expired: a died
    assert b.expired_leases(clock.now) == 1
    taken = b.claim_next()
    assert taken is not None and taken.job_id == job.job_id and taken.attempts == 2
    assert taken.lease_holder == "replica-b"
    # a comes back: it no longer holds the job, nothing it does applies
    assert not a.heartbeat(job.job_id)
    a.progress(job.job_id, "POSTPROCESSING", 0.9)
    a.retry_later(job.job_id, "TRITON_UNAVAILABLE", 5)
    a.fail(job.job_id, "INTERNAL")
    assert not a.succeed(job.job_id, {"label_map": MASK}, handoffs(job.job_id), "")
    assert outbox_keys(a) == []
    now = b.get(job.job_id)
    assert (now.state, now.stage, now.lease_holder) == ("RUNNING", "LOADING", "replica-b")
    b.progress(job.job_id, "INFERENCE", 0.1)
    assert b.succeed(job.job_id, {"label_map": MASK}, handoffs(job.job_id), "")
    done = a.get(job.job_id)
    assert (done.state, done.result, done.lease_holder) == ("SUCCEEDED", {"label_map": MASK}, "")
    assert outbox_keys(a) == [f"{job.job_id}:labels", f"{job.job_id}:ranking"]
    assert a.queued_count() == 0 and a.oldest_running_age(clock.now) == 0.0


def test_retry_cancel_and_fail(pair, clock):
    a, b = pair
    first, _ = submit(a)
    second, _ = submit(a, series="ser-b")
    assert a.claim_next().job_id == first.job_id
    a.retry_later(first.job_id, "TRITON_UNAVAILABLE", 30)
    requeued = a.get(first.job_id)
    assert (requeued.state, requeued.error_reason, requeued.lease_holder) == ("QUEUED", "TRITON_UNAVAILABLE", "")
    assert b.claim_next().job_id == second.job_id  # the first is not due for 30 s
    assert b.cancel(second.job_id).cancel_requested
    assert not a.cancel_if_requested(second.job_id)  # only the holder acts on it
    assert b.cancel_if_requested(second.job_id) and b.get(second.job_id).state == "CANCELLED"
    assert a.cancel(first.job_id).state == "CANCELLED"  # QUEUED: at once
    third, _ = submit(a, series="ser-c")
    clock.now += 1
    assert a.claim_next().job_id == third.job_id
    b.fail(third.job_id, "INTERNAL")  # not b's
    a.fail(third.job_id, "INVALID_VOLUME")
    assert a.get(third.job_id).state == "FAILED" and a.get(third.job_id).error_reason == "INVALID_VOLUME"
    assert a.claim_next() is None


def test_purge_and_references(pair):
    a, b = pair
    done, _ = submit(a)
    other, _ = submit(a, case="case-b", series="ser-x", volume=VOL_B)
    for job in (done, other):
        assert a.claim_next().job_id == job.job_id
        assert a.succeed(job.job_id, {"label_map": MASK, "heatmap": HEAT}, handoffs(job.job_id), "")
    running, _ = submit(a, version=2)
    assert b.claim_next().job_id == running.job_id
    counts, released = a.purge_study("case-a")
    assert counts == {"jobs": 2, "outbox": 2}
    assert released == sorted({VOL_A, MASK, HEAT})
    assert not b.succeed(running.job_id, {"label_map": MASK}, handoffs(running.job_id), "")  # purged: no hand-off
    assert outbox_keys(a) == [f"{other.job_id}:labels", f"{other.job_id}:ranking"]
    assert a.referenced([VOL_A, VOL_B, MASK, HEAT, "sha256:" + "9" * 64]) == sorted([VOL_B, MASK, HEAT])
    assert a.latest_for_case("case-b").job_id == other.job_id and a.latest_for_case("case-a") is None
    assert a.purge_study("case-a") == ({"jobs": 0, "outbox": 0}, [])


def test_keep_alive_renews_the_lease(db_url):
    a = JobStore(db_url, lease_s=1.0, holder="a")
    b = JobStore(db_url, lease_s=1.0, holder="b")
    try:
        job, _ = submit(a)
        assert a.claim_next() is not None
        with a.keep_alive(job.job_id, interval_s=0.1):
            for _ in range(6):  # 1.8 s in all, longer than the lease
                assert b.claim_next() is None
                sq_sleep(0.3)
        sq_sleep(1.3)  # no more heartbeats: the lease runs out and b takes the job over
        assert b.claim_next().job_id == job.job_id
    finally:
        a.close()
        b.close()


def sq_sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


def test_adopts_a_database_made_by_the_hand_written_schema(tmp_path):
    path = tmp_path / "segmentation.sqlite3"
    conn = sq.connect(path)
    sq.migrate(conn, LEGACY_MIGRATIONS)
    assert LEGACY_MIGRATIONS[1].split() == OUTBOX_MIGRATION.split()  # the outbox as the legacy code made it
    with sq.transaction(conn):
        conn.execute(
            "INSERT INTO jobs(job_id, case_id, series_id, series_version, ensemble_version, volume_digest,"
            " volume_size, labelled_organs, state, next_attempt_at, result_json, create_time, update_time)"
            " VALUES ('seg-old', 'case-a', 'ser-a', 1, 'abdomen-trio-v1', ?, 10, '[2]', 'RUNNING', 0, '', 1, 1)",
            (VOL_A,),
        )
        enqueue(conn, "t.labels", "seg-done:labels", b"x", "")
    conn.close()
    assert isinstance(conn, sqlite3.Connection)

    # `atlasflow db upgrade --service segmentation` adopts it (the service does the same on start)
    from atlasflow.cli.main import cli

    result = CliRunner().invoke(cli, ["db", "upgrade", "--service", "segmentation", "--url", str(path)])
    assert result.exit_code == 0, result.output
    assert "segmentation: at revision 0003" in result.output
    engine = create_engine(path)
    assert current_revision(engine, MIGRATIONS) == "0003"
    engine.dispose()

    jobs = JobStore(tmp_path, holder="new")  # the data directory: its segmentation.sqlite3
    try:
        taken = jobs.claim_next()  # left RUNNING by the old code: no lease, taken at once
        assert taken is not None and taken.job_id == "seg-old" and taken.labelled_organs == [2]
        assert jobs.outbox.pending() == 1 and jobs.outbox.oldest_pending_age(T0) > 0
        assert jobs.succeed("seg-old", {"heatmap": HEAT}, handoffs("seg-old"), "")
        assert jobs.outbox.pending() == 3
        with jobs.db.read() as c:
            assert json.loads(c.execute(sa.text("SELECT result_json FROM jobs")).scalar_one()) == {"heatmap": HEAT}
    finally:
        jobs.close()


def test_a_job_whose_lease_keeps_expiring_fails(db_url, clock):
    """A job that kills every replica running it (claimed, lease expired, `max_claims` times) is
    FAILED LEASE_EXPIRED instead of going round for ever."""
    stores = [JobStore(db_url, lease_s=10.0, holder=f"r{i}", clock=clock, max_claims=2) for i in range(2)]
    try:
        job, _ = submit(stores[0])
        assert stores[0].claim_next().attempts == 1
        clock.now += 11
        assert stores[1].claim_next().attempts == 2
        clock.now += 11
        assert stores[0].claim_next() is None
        failed = stores[0].get(job.job_id)
        assert (failed.state, failed.error_reason, failed.lease_holder) == ("FAILED", "LEASE_EXPIRED", "")
    finally:
        for s in stores:
            s.close()


def _columns(engine: sa.Engine) -> dict[str, set[tuple[str, bool]]]:
    insp = sa.inspect(engine)
    out = {}
    for t in insp.get_table_names():
        if t.startswith(("alembic_version", "schema_migrations", "sqlite_")):
            continue
        pk = set(insp.get_pk_constraint(t)["constrained_columns"])
        out[t] = {(c["name"], bool(c["nullable"]) and c["name"] not in pk) for c in insp.get_columns(t)}
    return out


def test_baseline_equals_the_hand_written_schema(tmp_path, db_url):
    """Revision 0001 makes the tables and columns (same names, same NOT NULL) the hand-written
    migrations made, on either back-end (what adoption stamps)."""
    legacy = sq.connect(tmp_path / "legacy.sqlite3")
    sq.migrate(legacy, LEGACY_MIGRATIONS)
    legacy.close()
    old, new = create_engine(tmp_path / "legacy.sqlite3"), create_engine(db_url)
    try:
        assert upgrade(new, MIGRATIONS, "0001") == "0001"
        assert _columns(new) == _columns(old)
        assert upgrade(new, MIGRATIONS) == "0003"
    finally:
        old.dispose()
        new.dispose()
