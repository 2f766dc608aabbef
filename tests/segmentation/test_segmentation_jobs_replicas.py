"""Segmentation replicas on one database (SQLite and PostgreSQL, `db_url`): several job stores,
each run by a thread that claims, keeps the lease alive and finishes jobs the way
`Worker.run_forever` does, never run the same job; a replica killed while it holds a job leaves
it to the others once the lease expires, and the job is handed off once."""

from __future__ import annotations

import threading
import time
from collections import Counter

import sqlalchemy as sa

from atlasflow.segmentation.jobs import JobStore

JOBS = 24


def _submit_all(store: JobStore) -> list[str]:
    return [
        store.submit(
            case_id=f"case-{i}",
            series_id=f"ser-{i}",
            series_version=1,
            ensemble_version="abdomen-trio-v1",
            volume_digest="sha256:" + f"{i:064x}",
            volume_size=1,
            labelled_organs=[],
            traceparent="",
        )[0].job_id
        for i in range(JOBS)
    ]


def _replica(store: JobStore, claims: list[tuple[str, str]], lock: threading.Lock, start: threading.Barrier) -> None:
    """The worker's loop: claim, keep the lease alive while working, succeed; until no job is left."""
    start.wait(timeout=120)
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 3.0:
        job = store.claim_next()
        if job is None:
            time.sleep(0.02)
            continue
        idle_since = time.monotonic()
        with lock:
            claims.append((job.job_id, store.holder))
        with store.keep_alive(job.job_id, interval_s=0.05):
            store.progress(job.job_id, "INFERENCE", 0.5)
            time.sleep(0.01)
            assert store.succeed(
                job.job_id, {}, [("t", f"{job.job_id}:labels", b""), ("t", f"{job.job_id}:ranking", b"")], ""
            )


def test_replicas_never_run_the_same_job_and_take_over_a_killed_ones(db_url):
    stores = [JobStore(db_url, lease_s=2.0, holder=f"replica-{i}") for i in range(3)]
    try:
        ids = _submit_all(stores[0])
        # replica 0 claims the oldest job, then is killed (no heartbeat, no result)
        killed = stores[0].claim_next()
        assert killed is not None and killed.job_id == ids[0]
        claims: list[tuple[str, str]] = []
        lock = threading.Lock()
        start = threading.Barrier(2)
        threads = [threading.Thread(target=_replica, args=(s, claims, lock, start)) for s in stores[1:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not any(t.is_alive() for t in threads)

        per_job = Counter(job_id for job_id, _ in claims)
        assert per_job == Counter(ids), per_job.most_common(3)  # every job once, the killed one's too
        assert {holder for job_id, holder in claims if job_id == killed.job_id} <= {"replica-1", "replica-2"}
        with stores[0].db.read() as conn:
            states = Counter(r[0] for r in conn.execute(sa.text("SELECT state FROM jobs")))
            attempts = dict(conn.execute(sa.text("SELECT job_id, attempts FROM jobs")).all())
            keys = Counter(r[0] for r in conn.execute(sa.text("SELECT dedupe_key FROM outbox")))
        assert states == {"SUCCEEDED": JOBS}
        assert attempts[killed.job_id] == 2 and {attempts[i] for i in ids[1:]} == {1}
        assert len(keys) == 2 * JOBS and max(keys.values()) == 1
        # the killed replica comes back: its job is done by another, it commits nothing
        assert not stores[0].succeed(killed.job_id, {"late": True}, [("t", "late", b"")], "")
        assert stores[0].get(killed.job_id).result == {}
    finally:
        for s in stores:
            s.close()
