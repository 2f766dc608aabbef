"""Ingest spool/series bookkeeping: durability across reopen, duplicates, conflicts, versions;
the quiet period on the database's clock and assembly claims between replicas. Every store test
runs on SQLite and on a real PostgreSQL 15 (`db_url`); adoption of a database made by the
hand-written schema on SQLite (the only back-end it ever ran on)."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.errors import InvalidArgument, NotFound
from atlasflow.ingest.store import IngestStore

SEG = 2 * 1024 * 1024  # small spool segments: fast zero-fill


def _sql(store: IngestStore, query: str, **params) -> list[tuple]:
    with store.db.read() as conn:
        return [tuple(r) for r in conn.execute(sa.text(query), params)]


@pytest.fixture()
def store(tmp_path, db_url):
    s = IngestStore(tmp_path / "data", LocalBlobStore(tmp_path / "blobs"), database=db_url, spool_segment_bytes=SEG)
    yield s
    s.close()


def test_instances_are_durable_across_reopen(tmp_path, db_url):
    blobs = LocalBlobStore(tmp_path / "blobs")
    s = IngestStore(tmp_path / "data", blobs, database=db_url, spool_segment_bytes=SEG)
    a = s.store_instance(b"A", "study", "series", "sop-1", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    s.store_instance(b"B", "study", "series", "sop-2")
    s.close()
    s2 = IngestStore(tmp_path / "data", blobs, database=db_url, spool_segment_bytes=SEG)
    sv = s2.get_series(a.series_id)
    assert (sv.version, sv.state, sv.instance_count) == (1, "RECEIVING", 2)
    assert sv.traceparent.startswith("00-" + "1" * 32)
    assert sorted(blobs.get(d) for d in s2.instance_digests(a.series_id, 1)) == [b"A", b"B"]
    s2.close()


def test_duplicate_same_bytes_is_stored_once_and_different_bytes_is_a_conflict(store):
    first = store.store_instance(b"A", "st", "se", "sop")
    again = store.store_instance(b"A", "st", "se", "sop")
    other = store.store_instance(b"A-modified", "st", "se", "sop")
    assert (first.duplicate, again.duplicate, other.duplicate) == (False, True, False)
    assert other.conflict and not again.conflict
    assert store.get_series(first.series_id).instance_count == 1
    assert store.conflict_count() == 1
    # the first bytes are kept
    assert [store.blobs.get(d) for d in store.instance_digests(first.series_id, 1)] == [b"A"]


def test_late_instance_opens_a_new_version(store):
    a = store.store_instance(b"A", "st", "se", "sop-1")
    sv = store.due_for_assembly(0.0)[0]
    store.mark_assembled(
        sv.series_id,
        1,
        "sha256:" + "0" * 64,
        10,
        {"shape": [1, 1, 1], "affine": [0.0] * 16, "spacing_mm": [1, 1, 1]},
        "t",
        b"payload",
        "",
    )
    assert store.get_series(a.series_id).state == "ASSEMBLED"
    late = store.store_instance(b"B", "st", "se", "sop-2")
    assert late.version == 2
    sv2 = store.get_series(a.series_id)
    assert (sv2.version, sv2.state, sv2.instance_count) == (2, "RECEIVING", 2)
    assert len(store.instance_digests(a.series_id, 2)) == 2
    assert len(store.instance_digests(a.series_id, 1)) == 1
    # the hand-off of version 1 is in the outbox, exactly once
    assert _sql(store, "SELECT topic, dedupe_key FROM outbox") == [("t", f"{a.series_id}:1")]


def test_quiet_period_and_listing(store):
    for i in range(3):
        store.store_instance(b"x%d" % i, "st", f"se-{i}", "sop")
    assert store.due_for_assembly(60.0) == []
    time.sleep(0.05)
    assert len(store.due_for_assembly(0.01)) == 3
    page1, token = store.list_series(2, "")
    page2, token2 = store.list_series(2, token)
    assert len(page1) == 2 and len(page2) == 1 and token2 == ""
    assert len({s.series_id for s in page1 + page2}) == 3
    with pytest.raises(InvalidArgument):
        store.list_series(2, "garbage!")
    with pytest.raises(NotFound):
        store.get_series("ser-unknown")


def _assemble(store, series_id: str, version: int, digest: str) -> None:
    store.mark_assembled(
        series_id,
        version,
        digest,
        10,
        {"shape": [1, 1, 1], "affine": [0.0] * 16, "spacing_mm": [1, 1, 1]},
        "t",
        b"payload",
        "",
    )


def test_series_version_and_volume_look_ups(store):
    a = store.store_instance(b"A", "st", "se", "sop-1")
    _assemble(store, a.series_id, 1, "sha256:" + "1" * 64)
    store.store_instance(b"B", "st", "se", "sop-2")  # opens version 2
    _assemble(store, a.series_id, 2, "sha256:" + "2" * 64)
    v1 = store.get_series_version(a.series_id, 1)
    assert (v1.version, v1.instance_count, v1.volume_digest) == (1, 1, "sha256:" + "1" * 64)
    assert store.get_series_version(a.series_id, 2).instance_count == 2
    assert store.series_by_volume("sha256:" + "1" * 64) == v1
    assert store.series_by_volume("sha256:" + "2" * 64).version == 2
    # another series assembling an identical volume later: the most recently updated wins
    time.sleep(0.01)
    b = store.store_instance(b"A", "st", "se-other", "sop-1")
    _assemble(store, b.series_id, 1, "sha256:" + "1" * 64)
    assert store.series_by_volume("sha256:" + "1" * 64).series_id == b.series_id
    for call, reason in (
        (lambda: store.get_series_version(a.series_id, 3), "SERIES_VERSION_NOT_FOUND"),
        (lambda: store.get_series_version("ser-unknown", 1), "SERIES_NOT_FOUND"),
        (lambda: store.series_by_volume("sha256:" + "0" * 64), "VOLUME_NOT_FOUND"),
        (lambda: store.series_by_volume(""), "VOLUME_NOT_FOUND"),
    ):
        with pytest.raises(NotFound) as e:
            call()
        assert e.value.reason == reason


def test_a_legacy_database_is_adopted_and_its_volume_look_up_uses_its_index(tmp_path):
    """A database made by the hand-written schema (here stopped at legacy step 5, before the
    volume index) keeps its rows: its legacy steps are finished, Alembic's baseline is stamped
    and the claim revision applied; the volume look-up then uses its index."""
    from atlasflow.common import sqlite as db
    from atlasflow.common.db import current_revision
    from atlasflow.ingest.migrations import MIGRATIONS as ALEMBIC
    from atlasflow.ingest.schema import LEGACY_MIGRATIONS

    conn = db.connect(tmp_path / "data" / "ingest.sqlite3")
    db.migrate(conn, LEGACY_MIGRATIONS[:5])
    with db.transaction(conn):
        conn.execute(
            "INSERT INTO series_versions(series_id, version, case_id, state, instance_count, last_instance_at,"
            " volume_digest, create_time, update_time) VALUES ('ser-old', 1, 'case-old', 'ASSEMBLED', 1, 1.0,"
            " 'sha256:old', 1.0, 1.0)"
        )
        conn.execute(
            "INSERT INTO outbox(topic, dedupe_key, payload, next_attempt_at) VALUES ('t', 'ser-old:1', x'01', 5.0)"
        )
    conn.close()
    s = IngestStore(tmp_path / "data", LocalBlobStore(tmp_path / "blobs"), spool_segment_bytes=SEG)
    try:
        versions = [r[0] for r in _sql(s, "SELECT version FROM schema_migrations")]
        assert versions == list(range(1, len(LEGACY_MIGRATIONS) + 1))  # 6 and every later one
        assert current_revision(s.db.engine, ALEMBIC) == "0004"
        old = s.series_by_volume("sha256:old")
        assert (old.series_id, old.state, old.assembly_attempts) == ("ser-old", "ASSEMBLED", 0)
        # its pending hand-off is delivered by the claiming outbox (created when it was due)
        (row,) = s.outbox.due(time.time(), 8)
        assert (row.dedupe_key, row.payload) == ("ser-old:1", b"\x01")
        assert s.outbox.oldest_pending_age(105.0) == 100.0
        seen: list[str] = []
        sa.event.listen(s.db.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
        with pytest.raises(NotFound):
            s.series_by_volume("sha256:" + "0" * 64)
        (query,) = [q for q in seen if "volume_digest" in q]
        with s.db.read() as c:
            plan = " ".join(
                str(r[3]) for r in c.exec_driver_sql("EXPLAIN QUERY PLAN " + query, ("sha256:" + "0" * 64,))
            )
        assert "USING INDEX series_by_volume" in plan, plan
    finally:
        s.close()


def test_quiet_period_runs_on_the_database_clock(store, db_url):
    """last_instance_at is written with the database's clock, not the receiving process's."""
    a = store.store_instance(b"A", "st", "se", "sop-1")
    with store.db.read() as conn:
        db_now = conn.execute(sa.text("SELECT " + store._now)).scalar()
    last = store.get_series(a.series_id).last_instance_at
    assert abs(last - db_now) < 5.0 and last <= db_now
    assert store.due_for_assembly(60.0) == []
    # a row whose last instance is 61 s old on the database's clock is due, whatever this process's clock says
    with store.db.transaction() as conn:
        conn.execute(sa.text(f"UPDATE series_versions SET last_instance_at = {store._now} - 61"))
    assert [sv.series_id for sv in store.due_for_assembly(60.0)] == [a.series_id]


def _replica(tmp_path, db_url, name: str, claim_s: float = 30.0) -> IngestStore:
    return IngestStore(
        tmp_path / name,
        LocalBlobStore(tmp_path / "blobs"),
        database=db_url,
        spool_segment_bytes=SEG,
        spool_spares=1,
        claim_s=claim_s,
    )


def test_assembly_is_claimed_by_one_replica_and_taken_over_after_expiry(tmp_path, db_url):
    a, b = _replica(tmp_path, db_url, "a", claim_s=1.0), _replica(tmp_path, db_url, "b", claim_s=1.0)
    try:
        sid = a.store_instance(b"A", "st", "se", "sop-1").series_id
        b.store_instance(b"B", "st", "se", "sop-2")
        assert a.get_series(sid).instance_count == 2  # one version, instances from both replicas
        assert a.begin_assembly(sid, 1, 3) == 1
        assert b.begin_assembly(sid, 1, 3) is None  # held by a
        assert b.due_for_assembly(0.0) == []  # nor listed for b while a's claim lives
        time.sleep(0.7)
        assert a.renew_claim(sid, 1)  # a's heartbeat: still a's after the first second
        time.sleep(0.5)
        assert b.begin_assembly(sid, 1, 3) is None
        time.sleep(1.2)  # a died: no heartbeat, its claim expires
        assert [sv.series_id for sv in b.due_for_assembly(0.0)] == [sid]
        assert b.begin_assembly(sid, 1, 3) == 2  # taken over; a's attempt stays counted
        assert not a.renew_claim(sid, 1)
        # an instance that arrives during b's assembly: b's volume of 2 instances is not recorded
        a.store_instance(b"C", "st", "se", "sop-3")
        assert not b.mark_assembled(sid, 1, "sha256:" + "1" * 64, 1, {}, "t", b"p", "", instance_count=2)
        b.end_assembly_attempt(sid, 1)
        assert b.get_series(sid).state == "RECEIVING" and b.get_series(sid).assembly_attempts == 1
        assert a.begin_assembly(sid, 1, 3) == 2
        assert a.mark_assembled(sid, 1, "sha256:" + "1" * 64, 1, {}, "t", b"p", "", instance_count=3)
        assert _sql(a, "SELECT dedupe_key FROM outbox") == [(f"{sid}:1",)]
    finally:
        a.close()
        b.close()


def test_a_restarted_replica_takes_its_own_claim_back_at_once(tmp_path, db_url):
    a = _replica(tmp_path, db_url, "a")
    sid = a.store_instance(b"A", "st", "se", "sop-1").series_id
    assert a.begin_assembly(sid, 1, 3) == 1
    a.close()  # killed while assembling
    again, other = _replica(tmp_path, db_url, "a"), _replica(tmp_path, db_url, "b")
    try:
        assert other.begin_assembly(sid, 1, 3) is None
        assert again.begin_assembly(sid, 1, 3) == 2
    finally:
        again.close()
        other.close()


def test_cli_db_upgrade_ingest(tmp_path, db_url, capsys):
    """`atlasflow db upgrade --service ingest` brings an empty database to the newest revision;
    a store opened on it then finds nothing to do."""
    from atlasflow.cli.main import main

    assert main(["db", "upgrade", "--service", "ingest", "--url", db_url]) == 0
    assert "ingest: at revision 0004" in capsys.readouterr().out
    s = IngestStore(tmp_path / "data", LocalBlobStore(tmp_path / "blobs"), database=db_url, spool_segment_bytes=SEG)
    try:
        assert s.store_instance(b"A", "st", "se", "sop").version == 1
    finally:
        s.close()


def test_another_replicas_deletion_refuses_the_study_here(tmp_path, db_url):
    """A study deleted through replica a (its deletion row committed) is refused by replica b,
    whose own in-memory tombstones know nothing of it."""
    from atlasflow.common.errors import FailedPrecondition
    from atlasflow.ingest.deletion import Deletions

    a, b = _replica(tmp_path, db_url, "a"), _replica(tmp_path, db_url, "b")
    try:
        kept = b.store_instance(b"B", "st-other", "se-other", "sop-1")
        gone = b.store_instance(b"A", "st", "se", "sop-1")
        deletion, created = Deletions(a, a.blobs).start(gone.case_id, "test", "admin")
        assert created and b.tombstones == {}
        with pytest.raises(FailedPrecondition) as e:
            b.store_instance(b"A2", "st", "se", "sop-2")
        assert e.value.reason == "STUDY_DELETED" and e.value.metadata["deletion_id"] == deletion.deletion_id
        assert b.store_instance(b"B2", "st-other", "se-other", "sop-2").case_id == kept.case_id
        with pytest.raises(NotFound):
            b.get_series(gone.series_id)
    finally:
        a.close()
        b.close()
