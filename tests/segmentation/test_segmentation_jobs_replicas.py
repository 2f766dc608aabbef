"""Segmentation replicas on one database (SQLite and PostgreSQL, `db_url`): several job stores,
each run by a thread that claims, keeps the lease alive and finishes jobs the way
`Worker.run_forever` does, never run the same job; a replica killed while it holds a job leaves
it to the others once the lease expires, and the job is handed off once."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import sqlalchemy as sa

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.metrics import Metrics
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.segmentation.jobs import JobStore
from atlasflow.segmentation.outputs import PipelineOutput
from atlasflow.segmentation.worker import Worker

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


class _Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class _Segmenter:
    """Stands in for Triton: labels the whole grid liver; `during` runs inside the call."""

    def __init__(self, during=lambda: None) -> None:
        self.during = during

    def segment(self, volume_hu, affine, labelled_organs=()):
        self.during()
        stats = np.zeros((9, 4))
        stats[4] = (1.0, 0.0, 0.0, 1.0)
        return PipelineOutput(np.full(volume_hu.shape, 5, np.uint8), np.zeros(volume_hu.shape, np.uint8), stats, False)


def test_a_worker_that_lost_its_lease_hands_nothing_off(db_url, tmp_path):
    """Replica A's inference outlives its lease; replica B takes the job over meanwhile. A's
    result is discarded (counted as a lost lease), B's is the one committed and handed off."""
    clock = _Clock()
    blobs = LocalBlobStore(tmp_path / "blobs")
    volume = blobs.put(to_nifti_bytes(np.zeros((4, 4, 3), np.int16), np.eye(4)))
    a = JobStore(db_url, lease_s=30.0, holder="a", clock=clock)
    b = JobStore(db_url, lease_s=30.0, holder="b", clock=clock)
    try:
        job, _ = a.submit(
            case_id="case-1",
            series_id="ser-1",
            series_version=1,
            ensemble_version="v",
            volume_digest=volume.digest,
            volume_size=volume.size_bytes,
            labelled_organs=[],
            traceparent="",
        )
        taken: list = []

        def a_stalls() -> None:
            clock.now += 31  # A's lease runs out during inference ...
            taken.append(b.claim_next())  # ... and B takes the job over

        metrics_a, metrics_b = Metrics("seg-a"), Metrics("seg-b")
        worker_a = Worker(a, blobs, _Segmenter(a_stalls), metrics_a, members=[])
        worker_b = Worker(b, blobs, _Segmenter(), metrics_b, members=[])
        worker_a.run_one(a.claim_next())
        assert taken[0].job_id == job.job_id and taken[0].lease_holder == "b"
        events = {"service": "seg-a", "event": "jobs_lease_lost"}
        assert metrics_a.registry.get_sample_value("atlasflow_events_total", events) == 1
        assert b.get(job.job_id).state == "RUNNING"
        with a.db.read() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM outbox")).scalar_one() == 0
        worker_b.run_one(taken[0])
        done = b.get(job.job_id)
        assert done.state == "SUCCEEDED" and done.attempts == 2
        assert sorted(r.dedupe_key for r in b.outbox.due(clock.now + 1, 8)) == [
            f"{job.job_id}:labels",
            f"{job.job_id}:ranking",
        ]
    finally:
        a.close()
        b.close()
