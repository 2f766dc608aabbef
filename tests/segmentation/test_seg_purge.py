"""`JobStore.purge_study` (ingest's DeleteStudy hand-off): the case's jobs and their pending
hand-offs go; a job still running when its study is purged hands nothing off; a label map
another case's job produced too is reported as still referenced."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from atlasflow.common.errors import NotFound
from atlasflow.segmentation.jobs import JobStore

VOL_A, VOL_B = "sha256:" + "1" * 64, "sha256:" + "2" * 64
MASK_SHARED, HEAT_A, HEAT_B = "sha256:" + "3" * 64, "sha256:" + "4" * 64, "sha256:" + "5" * 64


def submit(jobs: JobStore, case: str, series: str, volume: str, version: int = 1):
    return jobs.submit(
        case_id=case,
        series_id=series,
        series_version=version,
        ensemble_version="e1",
        volume_digest=volume,
        volume_size=1,
        labelled_organs=[],
        traceparent="",
    )[0]


def finish(jobs: JobStore, job_id: str, heat: str) -> bool:
    result = {"label_map": MASK_SHARED, "label_map_size": 1, "heatmap": heat, "heatmap_size": 1}
    return jobs.succeed(job_id, result, [("t", f"{job_id}:labels", b"x"), ("t", f"{job_id}:ranking", b"y")], "")


def outbox_keys(jobs: JobStore) -> list[str]:
    with jobs.db.read() as conn:
        return sorted(r[0] for r in conn.execute(sa.text("SELECT dedupe_key FROM outbox")))


def test_purge_study(tmp_path):
    jobs = JobStore(tmp_path)
    a = submit(jobs, "case-a", "ser-a", VOL_A)
    b = submit(jobs, "case-b", "ser-b", VOL_B)
    for job in (a, b):
        assert jobs.claim() is not None
        assert finish(jobs, job.job_id, HEAT_A if job is a else HEAT_B)
    running = submit(jobs, "case-a", "ser-a", VOL_A, version=2)
    assert jobs.claim().job_id == running.job_id

    counts, released = jobs.purge_study("case-a")

    assert counts == {"jobs": 2, "outbox": 2}
    assert released == sorted({VOL_A, MASK_SHARED, HEAT_A})
    with pytest.raises(NotFound):
        jobs.get(a.job_id)
    assert jobs.get(b.job_id).case_id == "case-b"
    assert outbox_keys(jobs) == sorted([f"{b.job_id}:labels", f"{b.job_id}:ranking"])
    # the job that was running finishes after the purge: nothing is handed off
    assert not finish(jobs, running.job_id, HEAT_A)
    assert outbox_keys(jobs) == sorted([f"{b.job_id}:labels", f"{b.job_id}:ranking"])
    # the shared label map is still case-b's; case-a's volume and heatmap are free
    assert jobs.referenced(released) == [MASK_SHARED]
    assert jobs.purge_study("case-a") == ({"jobs": 0, "outbox": 0}, [])
    jobs.close()
