"""A series version whose assembly kills the process is not retried forever: each assembly is
counted durably before it starts, and after `max_assembly_attempts` (3) started-and-never-
finished attempts the version ends FAILED ASSEMBLY_ABANDONED_AFTER_3_ATTEMPTS; other series
still assemble. The kill is real: a subprocess runs the assembler on the store and is
SIGKILLed while it assembles (crash-test style of test_ingest_reception_crash.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from atlasflow.common import sqlite as db
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.metrics import Metrics
from atlasflow.ingest.reception import GRPC, Reception
from atlasflow.ingest.schema import LEGACY_MIGRATIONS
from atlasflow.ingest.store import IngestStore
from atlasflow.testing import peers

# Runs the assembler once over every due series version. For the poison series (argv[3]) the
# volume build announces itself and then hangs, as a decoder stuck or crashing on its data would.
_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from atlasflow.common.blobstore import LocalBlobStore
    from atlasflow.common.metrics import Metrics
    from atlasflow.ingest.store import IngestStore
    from atlasflow.ingest.worker import Assembler

    root, poison = Path(sys.argv[1]), sys.argv[2]
    blobs = LocalBlobStore(root / "blobs")
    store = IngestStore(root / "data", blobs, spool_segment_bytes=1 << 20)
    assembler = Assembler(store, blobs, Metrics("ingest"), 0.0, max_attempts=3)
    build = assembler._build_volume

    def poisoned(digests):
        if current == poison:
            print("ASSEMBLING", flush=True)
            time.sleep(600)
        return build(digests)

    assembler._build_volume = poisoned
    for sv in store.due_for_assembly(0.0):
        current = sv.series_id
        assembler.assemble(sv)
    print("DONE", flush=True)
    """
)


def _run_child(root: Path, poison: str) -> str:
    """Run the assembler child; SIGKILL it once it says it is assembling the poison series.
    Returns what it printed ("ASSEMBLING" when killed, "DONE" when it finished)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(root), poison],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # blocks until the child says something or exits
    if line == "ASSEMBLING":
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        return line
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return line


def _store_series(root: Path, series: dict[str, list[Path]]) -> dict[str, str]:
    store = IngestStore(root / "data", LocalBlobStore(root / "blobs"), spool_segment_bytes=1 << 20)
    try:
        reception = Reception(store, Metrics("ingest"))
        ids = {}
        for name, files in series.items():
            ids[name] = {reception.receive(p.read_bytes(), GRPC).series_id for p in files}.pop()
        return ids
    finally:
        store.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("series")
    return {
        "poison": peers.build_ct_series(out / "poison", 3, seed="attempts-poison"),
        "good": peers.build_ct_series(out / "good", 3, seed="attempts-good"),
    }


def test_a_series_that_kills_assembly_is_abandoned_after_three_attempts(tmp_path, files):
    root = tmp_path / "ingest"
    ids = _store_series(root, {"poison": files["poison"]})
    for attempt in (1, 2, 3):
        assert _run_child(root, ids["poison"]) == "ASSEMBLING", f"attempt {attempt} did not start"
        store = IngestStore(root / "data", LocalBlobStore(root / "blobs"), spool_segment_bytes=1 << 20)
        try:
            sv = store.get_series(ids["poison"])
            assert (sv.state, sv.assembly_attempts) == ("RECEIVING", attempt)  # durable before the kill
        finally:
            store.close()
    # a good series arrives meanwhile; the next start abandons the poison one and assembles it
    ids.update(_store_series(root, {"good": files["good"]}))
    assert _run_child(root, ids["poison"]) == "DONE"
    store = IngestStore(root / "data", LocalBlobStore(root / "blobs"), spool_segment_bytes=1 << 20)
    try:
        poison = store.get_series(ids["poison"])
        assert (poison.state, poison.failure_reason) == ("FAILED", "ASSEMBLY_ABANDONED_AFTER_3_ATTEMPTS")
        assert poison.assembly_attempts == 3
        good = store.get_series(ids["good"])
        assert (good.state, good.assembly_attempts) == ("ASSEMBLED", 1)
        assert store.due_for_assembly(0.0) == []  # not tried again
    finally:
        store.close()


def test_attempts_column_is_added_to_an_existing_database(tmp_path, files):
    """A database written before the migration (a RECEIVING version in it) is upgraded, its
    versions start at 0 attempts and still assemble."""
    root = tmp_path / "ingest"
    ids = _store_series(root, {"good": files["good"]})
    # make it the database of a release before Alembic and before the attempts column: the
    # hand-written schema's steps up to the one before, recorded in schema_migrations
    step = 1 + next(i for i, m in enumerate(LEGACY_MIGRATIONS) if "assembly_attempts" in m)
    conn = db.connect(root / "data" / "ingest.sqlite3")
    with db.transaction(conn):
        for column in ("claim_expire_at", "claim_holder", "assembly_attempts"):
            conn.execute(f"ALTER TABLE series_versions DROP COLUMN {column}")
        for column in ("claimed_by", "claim_expires_at", "create_time"):  # Alembic's outbox claims
            conn.execute(f"ALTER TABLE outbox DROP COLUMN {column}")
        conn.execute("ALTER TABLE uploads DROP COLUMN owner_replica")  # Alembic's 0004
        for table in ("alembic_version_ingest", "deletion_steps", "deletions"):  # later steps' tables
            conn.execute(f"DROP TABLE {table}")
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        conn.executemany("INSERT INTO schema_migrations VALUES (?, '')", [(v,) for v in range(1, step)])
    conn.close()
    assert _run_child(root, "none") == "DONE"
    store = IngestStore(root / "data", LocalBlobStore(root / "blobs"), spool_segment_bytes=1 << 20)
    try:
        with store.db.read() as c:
            columns = {r[1] for r in c.exec_driver_sql("PRAGMA table_info(series_versions)")}
        assert {"assembly_attempts", "claim_holder"} <= columns
        sv = store.get_series(ids["good"])
        assert (sv.state, sv.assembly_attempts) == ("ASSEMBLED", 1)
    finally:
        store.close()
