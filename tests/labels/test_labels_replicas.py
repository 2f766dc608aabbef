"""Several labels replicas on one PostgreSQL: the version-event outbox is delivered once per
event by whichever replica claimed it (a dead claimer's events are redelivered after the claim
expired), and an export job is run by one replica at a time (leases, heartbeats, take-over)."""

from __future__ import annotations

import asyncio
import collections
import threading
import time

import numpy as np
import pytest

from atlasflow.common.blobstore import BlobInfo, LocalBlobStore, digest_of
from atlasflow.common.metrics import Metrics
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.common.outbox import OutboxDispatcher, OutboxRow
from atlasflow.labels.deid import Pseudonymizer
from atlasflow.labels.events import TOPIC, VersionEventStore
from atlasflow.labels.postgres import PostgresLabelRepository
from atlasflow.labels.repository import Provenance
from atlasflow.labels.worker import Exporter

AI = Provenance("ai", model_version="trio-v1", job_id="job-1")
AFFINE = tuple(float(a) for a in np.eye(4).ravel())


def blob(tag: str) -> BlobInfo:
    return BlobInfo(digest_of(tag.encode()), len(tag))


@pytest.fixture
def pg_url(pg_database) -> str:
    return str(pg_database())


def test_two_replicas_deliver_every_version_event_once(pg_url):
    """Two repositories (replicas) write N versions each; their two dispatchers run at once on
    the one database and ranking (here: a recording handler) hears of each version exactly once."""
    n = 12
    replicas = [PostgresLabelRepository(pg_url, claimer=f"r{i}") for i in range(2)]
    try:
        written = {
            r.create_version(f"case-{i}-{k}", blob(f"lm-{i}-{k}"), blob("ct"), AI, f"req-{i}-{k}").version_id
            for i, r in enumerate(replicas)
            for k in range(n)
        }
        heard: collections.Counter[str] = collections.Counter()
        by: dict[str, set[str]] = collections.defaultdict(set)

        def handler(name: str):
            async def deliver(row: OutboxRow) -> None:
                heard[row.dedupe_key] += 1
                by[name].add(row.dedupe_key)
                await asyncio.sleep(0.01)  # a slow callee: the other replica claims meanwhile

            return deliver

        dispatchers = [
            OutboxDispatcher(VersionEventStore(r), None, {TOPIC: handler(f"r{i}")}, Metrics("labels"))
            for i, r in enumerate(replicas)
        ]
        for r in replicas:
            r.events.batch = 3  # small claims: both replicas get some

        async def drain(d: OutboxDispatcher) -> None:
            while await asyncio.to_thread(d.pending):
                await d.deliver_due()

        async def both() -> None:
            await asyncio.wait_for(asyncio.gather(*(drain(d) for d in dispatchers)), 120)

        asyncio.run(both())
        assert set(heard) == written and set(heard.values()) == {1}
        assert all(by.values())  # both replicas delivered some
        assert replicas[0].version_event_backlog() == 0
    finally:
        for r in replicas:
            r.close()


def test_a_dead_claimers_events_are_redelivered_after_the_claim_expires(pg_url):
    """A replica that claimed events and died (never marked them) holds them until its claim
    expires; then another replica delivers them. A late mark of the dead one changes nothing."""
    dead = PostgresLabelRepository(pg_url, claimer="dead", event_claim_s=30.0)
    alive = PostgresLabelRepository(pg_url, claimer="alive", event_claim_s=30.0)
    try:
        for k in range(3):
            dead.create_version(f"case-{k}", blob(f"lm-{k}"), blob("ct"), AI, f"req-{k}")
        now = time.time()
        claimed = dead.events.due(now, 32)
        assert [r.payload for r in claimed] == [b"1"] * 3
        assert alive.events.due(now + 1, 32) == []  # claimed by the dead replica
        again = alive.events.due(now + 31, 32)  # its claim expired
        assert [r.dedupe_key for r in again] == [r.dedupe_key for r in claimed]
        dead.events.mark(claimed[0].id, "pending", "UNAVAILABLE", now + 100)  # too late: not its claim
        for row in again:
            alive.events.mark(row.id, "done", "", 0.0)
        assert alive.version_event_backlog() == 0
    finally:
        dead.close()
        alive.close()


def test_an_export_job_is_held_by_one_replica_and_taken_over_after_expiry(pg_url):
    a = PostgresLabelRepository(pg_url, claimer="a", export_lease_s=30.0)
    b = PostgresLabelRepository(pg_url, claimer="b", export_lease_s=30.0)
    try:
        a.create_version("case-1", blob("lm"), blob("ct"), AI, "req-1")
        job = a.create_export_job([], "file:///tmp/x")
        now = time.time()
        assert a.claim_export_job(now).job_id == job.job_id
        assert b.claim_export_job(now + 1) is None  # a holds it
        assert a.renew_export_claim(job.job_id, now + 20)  # a's heartbeat: until now + 50
        assert b.claim_export_job(now + 40) is None
        taken = b.claim_export_job(now + 51)  # a stopped beating: b takes over
        assert taken is not None and taken.job_id == job.job_id
        assert not a.renew_export_claim(job.job_id, now + 52)  # a learns it lost the job
        assert b.export_job_holder(job.job_id)[0] == "b"
        b.update_export_job(job.job_id, state="RUNNING")
        b.update_export_job(job.job_id, state="SUCCEEDED")
        assert b.export_job_holder(job.job_id) == ("", 0.0)  # finished: nobody's
        assert a.claim_export_job(now + 1000) is None
    finally:
        a.close()
        b.close()


def test_an_export_job_that_keeps_killing_its_replica_fails(pg_url):
    """A job whose holder's lease expired after `max_export_claims` takes is FAILED
    LEASE_EXPIRED instead of going round for ever; a clean release does not count as a death."""
    r = PostgresLabelRepository(pg_url, claimer="r", export_lease_s=10.0, max_export_claims=2)
    try:
        r.create_version("case-1", blob("lm"), blob("ct"), AI, "req-1")
        job = r.create_export_job([], "file:///tmp/x")
        now = time.time()
        assert r.claim_export_job(now) is not None  # take 1
        r.release_export_claim(job.job_id)  # a clean stop (a rolling update)
        assert r.claim_export_job(now + 1) is not None  # take 2
        assert r.claim_export_job(now + 12) is None  # take 2's holder died: failed, not taken again
        failed = r.get_export_job(job.job_id)
        assert (failed.state, failed.error_reason) == ("FAILED", "LEASE_EXPIRED")
    finally:
        r.close()


def test_two_export_workers_never_run_one_job_at_once(pg_url, tmp_path):
    """Two replicas' export loops on four queued jobs: each job runs on exactly one of them
    (never two at once), all succeed."""
    blobs = LocalBlobStore(tmp_path / "blobs")
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1:3, 1:3, 1:3] = 5
    lm = blobs.put(to_nifti_bytes(labels, np.eye(4)))
    ct = blobs.put(to_nifti_bytes(np.zeros((4, 4, 4), np.int16), np.eye(4)))
    replicas = [PostgresLabelRepository(pg_url, claimer=f"r{i}", export_lease_s=30.0) for i in range(2)]
    running: dict[str, str] = {}
    ran: collections.Counter[str] = collections.Counter()
    overlap: list[str] = []
    lock = threading.Lock()

    class Watched(Exporter):
        def run_job(self, job, lease=None):
            with lock:
                if job.job_id in running:
                    overlap.append(job.job_id)
                running[job.job_id] = self.repo.claimer
                ran[job.job_id] += 1
            try:
                time.sleep(0.2)  # long enough for the other replica to try the same job
                super().run_job(job, lease)
            finally:
                with lock:
                    running.pop(job.job_id, None)

    try:
        replicas[0].create_version("case-1", lm, ct, AI, "req-1", organs=(5,), shape=(4, 4, 4), affine=AFFINE)
        jobs = [replicas[0].create_export_job([], (tmp_path / f"out-{k}").as_uri()) for k in range(4)]
        exporters = [Watched(r, blobs, Metrics("labels"), pseudonymizer=Pseudonymizer(b"k" * 32)) for r in replicas]

        async def run() -> None:
            tasks = [asyncio.create_task(e.run()) for e in exporters]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                states = [await asyncio.to_thread(replicas[0].get_export_job, j.job_id) for j in jobs]
                if all(s.state == "SUCCEEDED" for s in states):
                    break
                await asyncio.sleep(0.1)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(run())
        assert [replicas[0].get_export_job(j.job_id).state for j in jobs] == ["SUCCEEDED"] * 4
        assert overlap == [] and set(ran.values()) == {1}
    finally:
        for r in replicas:
            r.close()
