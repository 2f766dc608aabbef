"""DeleteStudy's ingest side (`atlasflow.ingest.deletion`) with the real stores of every service:
ingest's rows go at once, the tombstone refuses the study's new instances, the hand-offs purge
the other services through the real outbox dispatcher, and the blob sweep deletes only blobs no
service references (a volume and a mask shared with another study stay). The same on a real
stack over gRPC, with roles: tests/e2e/test_e2e_delete_study.py."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.errors import FailedPrecondition, InvalidArgument
from atlasflow.common.metrics import Metrics
from atlasflow.common.outbox import OutboxDispatcher
from atlasflow.ingest.deletion import PURGE_TOPIC, SWEEP_TOPIC, Deletions, PurgeResult, purge_handler, sweep_handler
from atlasflow.ingest.identity import atlas_id
from atlasflow.ingest.store import IngestStore
from atlasflow.labels.repository import Provenance
from atlasflow.labels.sqlite import SqliteLabelRepository
from atlasflow.ranking.entries import OrganAttention
from atlasflow.ranking.worklist import SqliteWorklist
from atlasflow.segmentation.jobs import JobStore

CASE_A, CASE_B = atlas_id("case", "1.2.3.1"), atlas_id("case", "1.2.3.2")


@pytest.fixture
def world(tmp_path):
    blobs = LocalBlobStore(tmp_path / "blobs")
    store = IngestStore(tmp_path / "ingest", blobs, spool_segment_bytes=1 << 20, spool_spares=1)
    jobs = JobStore(tmp_path)
    labels = SqliteLabelRepository(tmp_path / "labels.sqlite")
    ranking = SqliteWorklist(tmp_path / "ranking.sqlite3")
    yield blobs, store, jobs, labels, ranking
    for s in (store, jobs, labels, ranking):
        s.close()


def seed(blobs, store, jobs, labels, ranking):
    """Study A (two instances) and study B (one) whose volumes are identical, and whose
    segmentations produced the same mask; A's heatmap is its own."""
    store.store_instance(b"A1", "1.2.3.1", "1.2.3.1.1", "1.2.3.1.1.1")
    store.store_instance(b"A2", "1.2.3.1", "1.2.3.1.1", "1.2.3.1.1.2")
    store.store_instance(b"B1", "1.2.3.2", "1.2.3.2.1", "1.2.3.2.1.1")
    store.spool_drain.drain()
    vol, mask, heat_a, heat_b = (blobs.put(x) for x in (b"VOLUME", b"MASK", b"HEAT-A", b"HEAT-B"))
    for series, case in (("1.2.3.1.1", CASE_A), ("1.2.3.2.1", CASE_B)):
        sid = atlas_id("ser", series)
        store.mark_assembled(sid, 1, vol.digest, vol.size_bytes, {}, "segmentation.SegmentSeries", b"", "")
        job = jobs.submit(
            case_id=case,
            series_id=sid,
            series_version=1,
            ensemble_version="e1",
            volume_digest=vol.digest,
            volume_size=vol.size_bytes,
            labelled_organs=[],
            traceparent="",
        )[0]
        jobs.claim()
        heat = heat_a if case == CASE_A else heat_b
        jobs.succeed(job.job_id, {"label_map": mask.digest, "heatmap": heat.digest}, [], "")
        labels.create_version(
            case, mask, vol, Provenance("ai", job_id=job.job_id), job.job_id, organs=(5,), shape=(1, 1, 1)
        )
        ranking.submit(case, sid, job.job_id, [OrganAttention(5, 1.0, 1.0, 10.0)], heatmap_digest=heat.digest)
    return vol, mask, heat_a, heat_b


def purge_in_process(jobs, labels, ranking):
    """PurgeStudy of each service's real store, called in-process (the gRPC path runs in the
    e2e test)."""
    by_service = {"segmentation": jobs, "labels": labels, "ranking": ranking}

    async def purge(service: str, case_id: str, check: list[str]) -> PurgeResult:
        s = by_service[service]
        counts, released = s.purge_study(case_id)
        return PurgeResult(counts, list(released), list(s.referenced(check)))

    return purge


def test_delete_study_everywhere_keeps_shared_blobs(world):
    blobs, store, jobs, labels, ranking = world
    vol, mask, heat_a, heat_b = seed(*world)
    instance_a = [d for d in store.instance_digests(atlas_id("ser", "1.2.3.1.1"), 1)]
    assert len(instance_a) == 2 and all(blobs.exists(d) for d in instance_a)
    deletions = Deletions(store, blobs, grace_s=3600)

    with pytest.raises(InvalidArgument) as e:
        deletions.start(CASE_A, "  ", "admin-1")
    assert e.value.metadata["field"] == "reason"
    deletion, created = deletions.start(CASE_A, "consent withdrawn", "admin-1")
    assert created and deletion.state == "RUNNING" and deletion.requested_by == "admin-1"
    steps = {s.service: s for s in deletion.steps}
    assert list(steps) == ["ingest", "segmentation", "labels", "ranking", "blobs"]
    assert steps["ingest"].state == "SUCCEEDED"
    assert steps["ingest"].counts["instances"] == 2 and steps["ingest"].counts["series_versions"] == 1
    assert [s.case_id for s in store.list_series(100, "")[0]] == [CASE_B]
    # idempotent: the same operation, the first call's reason
    again, created = deletions.start(CASE_A, "another reason", "admin-2")
    assert not created and again.deletion_id == deletion.deletion_id and again.reason == "consent withdrawn"
    # the tombstone: new instances of the study are refused, other studies are not
    with pytest.raises(FailedPrecondition) as e:
        store.store_instance(b"A3", "1.2.3.1", "1.2.3.1.9", "1.2.3.1.9.1")
    assert e.value.reason == "STUDY_DELETED" and e.value.metadata["deletion_id"] == deletion.deletion_id
    store.store_instance(b"C1", "1.2.3.3", "1.2.3.3.1", "1.2.3.3.1.1")

    purge = purge_in_process(jobs, labels, ranking)
    dispatcher = OutboxDispatcher(
        store.outbox,
        None,
        {PURGE_TOPIC: purge_handler(deletions, purge), SWEEP_TOPIC: sweep_handler(deletions, purge)},
        Metrics("ingest-test"),
    )

    def deliver() -> None:
        asyncio.run(dispatcher.deliver_due())
        with store.db.transaction() as conn:  # due now (skip the backoff)
            conn.execute(sa.text("UPDATE outbox SET next_attempt_at = 0 WHERE state = 'pending'"))

    deliver()  # the three purges, which queue the sweep
    deliver()  # the sweep: the blobs are younger than the grace period, it waits
    d = deletions.get(deletion.deletion_id)
    steps = {s.service: s for s in d.steps}
    assert d.state == "RUNNING" and all(steps[s].state == "SUCCEEDED" for s in ("segmentation", "labels", "ranking"))
    assert steps["segmentation"].counts == {"jobs": 1, "outbox": 0}
    assert steps["labels"].counts["label_versions"] == 1 and steps["ranking"].counts["worklist"] == 1
    assert steps["blobs"].state == "QUEUED" and "BLOB_GRACE" in steps["blobs"].last_error
    assert all(blobs.exists(x.digest) for x in (vol, mask, heat_a))

    deletions.grace_s = 0.0
    deliver()
    d = deletions.get(deletion.deletion_id)
    blob_step = d.steps[-1]
    assert d.state == "SUCCEEDED" and blob_step.state == "SUCCEEDED" and blob_step.last_error == ""
    # gone: A's instances and heatmap; kept: the volume and the mask study B uses too
    assert not any(blobs.exists(x) for x in instance_a) and not blobs.exists(heat_a.digest)
    assert blobs.exists(vol.digest) and blobs.exists(mask.digest) and blobs.exists(heat_b.digest)
    assert blob_step.counts["deleted"] == 3 and blob_step.counts["kept_shared"] == 2
    # every service still has study B, none has A
    assert labels.head(CASE_B) is not None and labels.head(CASE_A) is None
    assert ranking.get(CASE_B)[0].case_id == CASE_B
    assert [j.case_id for j in jobs.list(100, "")[0]] == [CASE_B]

    # the operation and the tombstone survive a restart
    store.close()
    store2 = IngestStore(store.db_path.parent, blobs, spool_segment_bytes=1 << 20, spool_spares=1)
    try:
        assert Deletions(store2, blobs).get(deletion.deletion_id).state == "SUCCEEDED"
        with pytest.raises(FailedPrecondition):
            store2.store_instance(b"A4", "1.2.3.1", "1.2.3.1.1", "1.2.3.1.1.4")
    finally:
        store2.close()


def test_tombstone_expires(world):
    blobs, store, *_ = world
    store.store_instance(b"A1", "1.2.3.1", "1.2.3.1.1", "1.2.3.1.1.1")
    deletions = Deletions(store, blobs, refuse_days=0.0)
    first, _ = deletions.start(CASE_A, "test", "admin-1")
    # after the retention the study is received as a new one, and a new deletion starts anew
    store.store_instance(b"A1", "1.2.3.1", "1.2.3.1.1", "1.2.3.1.1.1")
    second, created = deletions.start(CASE_A, "test", "admin-1")
    assert created and second.deletion_id != first.deletion_id
