"""Ingest spool/series bookkeeping: durability across reopen, duplicates, conflicts, versions."""

from __future__ import annotations

import time

import pytest

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.errors import InvalidArgument, NotFound
from atlasflow.ingest.store import IngestStore

SEG = 2 * 1024 * 1024  # small spool segments: fast zero-fill


@pytest.fixture()
def store(tmp_path):
    s = IngestStore(tmp_path / "data", LocalBlobStore(tmp_path / "blobs"), spool_segment_bytes=SEG)
    yield s
    s.close()


def test_instances_are_durable_across_reopen(tmp_path):
    blobs = LocalBlobStore(tmp_path / "blobs")
    s = IngestStore(tmp_path / "data", blobs, spool_segment_bytes=SEG)
    a = s.store_instance(b"A", "study", "series", "sop-1", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    s.store_instance(b"B", "study", "series", "sop-2")
    s.close()
    s2 = IngestStore(tmp_path / "data", blobs, spool_segment_bytes=SEG)
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
    rows = store.conn.execute("SELECT topic, dedupe_key FROM outbox").fetchall()
    assert [tuple(r) for r in rows] == [("t", f"{a.series_id}:1")]


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


def test_volume_look_up_uses_its_index(tmp_path):
    """Migration 6 indexes the volume digest; a database written before it is upgraded."""
    from atlasflow.common import sqlite as db
    from atlasflow.ingest.schema import MIGRATIONS

    conn = db.connect(tmp_path / "data" / "ingest.sqlite3")
    db.migrate(conn, MIGRATIONS[:5])
    conn.close()
    s = IngestStore(tmp_path / "data", LocalBlobStore(tmp_path / "blobs"), spool_segment_bytes=SEG)
    try:
        versions = [r[0] for r in s.conn.execute("SELECT version FROM schema_migrations")]
        assert versions == list(range(1, len(MIGRATIONS) + 1))  # 6 and every later one
        seen: list[str] = []
        s.conn.set_trace_callback(seen.append)  # the statements the look-up runs
        with pytest.raises(NotFound):
            s.series_by_volume("sha256:" + "0" * 64)
        s.conn.set_trace_callback(None)
        (query,) = [q for q in seen if "volume_digest" in q]
        plan = " ".join(str(r[3]) for r in s.conn.execute("EXPLAIN QUERY PLAN " + query))
        assert "USING INDEX series_by_volume" in plan, plan
    finally:
        s.close()
