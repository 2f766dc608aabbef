"""Scrape-time gauges (`atlasflow.common.metrics`): a scrape of the registry shows the values
the stores hold at that moment (queue depth, lease age, expired leases, outbox lag, free disk,
Triton availability), a failing or hanging source costs only its own series, and the stage
histogram counts observations. Stores are real (SQLite, and PostgreSQL where the store runs on
both); values are checked against what the test put in them."""

from __future__ import annotations

import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from atlasflow.common.blobstore import BlobInfo, LocalBlobStore, digest_of
from atlasflow.common.metrics import GAUGES, Metrics, Reading
from atlasflow.common.outbox import OutboxDispatcher, enqueue
from atlasflow.common.ports import free_ports
from atlasflow.ingest.gauges import series_readings
from atlasflow.ingest.store import IngestStore
from atlasflow.labels.events import VersionEventStore
from atlasflow.labels.repository import Provenance
from atlasflow.labels.storage import open_repository
from atlasflow.ranking.entries import OrganAttention
from atlasflow.ranking.worklist import SqlWorklist, worklist_readings
from atlasflow.segmentation.gauges import job_readings, triton_readings
from atlasflow.segmentation.jobs import JobStore
from atlasflow.segmentation.triton_client import TritonSegmenter
from atlasflow.testing import peers


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape (the text exposition, parsed back): (name, labels) -> value."""
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_sources_are_read_at_scrape_time_and_win_over_pushed_values():
    m = Metrics("svc")
    depth = {"n": 3}
    m.set_queue_depth("jobs", 99)  # pushed by a loop: the source's reading replaces it
    m.set_queue_depth("other", 7)
    m.add_source("jobs", lambda: [Reading("atlasflow_queue_depth", "jobs", float(depth["n"]))])
    assert value(scrape(m), "atlasflow_queue_depth", service="svc", queue="jobs") == 3
    depth["n"] = 5
    s = scrape(m)
    assert value(s, "atlasflow_queue_depth", service="svc", queue="jobs") == 5
    assert value(s, "atlasflow_queue_depth", service="svc", queue="other") == 7


def test_failing_and_hanging_sources_cost_only_their_series():
    m = Metrics("svc")
    release = threading.Event()

    def broken() -> list[Reading]:
        raise RuntimeError("database is gone")

    calls = {"hanging": 0}

    def hanging() -> list[Reading]:
        calls["hanging"] += 1
        release.wait(30)
        return [Reading("atlasflow_queue_depth", "slow", 1.0)]

    m.add_source("broken", broken)
    m.add_source("unknown", lambda: [Reading("atlasflow_no_such_gauge", "", 1.0)])
    m.add_source("hanging", hanging, timeout_s=0.3)
    m.add_source("fine", lambda: [Reading("atlasflow_queue_depth", "fine", 2.0)])
    t0 = time.monotonic()
    s = scrape(m)
    assert time.monotonic() - t0 < 20  # the hanging source did not hold the scrape
    assert value(s, "atlasflow_queue_depth", service="svc", queue="fine") == 2
    assert value(s, "atlasflow_queue_depth", service="svc", queue="slow") is None
    for source in ("broken", "unknown", "hanging"):
        assert value(s, "atlasflow_gauge_source_up", service="svc", source=source) == 0
    assert value(s, "atlasflow_gauge_source_up", service="svc", source="fine") == 1
    # the failures counter (read before the sources in a scrape) shows them from the next one
    s = scrape(m)
    assert calls["hanging"] == 1  # a call still running is not started again
    assert value(s, "atlasflow_gauge_source_up", service="svc", source="hanging") == 0
    release.set()
    assert value(s, "atlasflow_gauge_source_failures_total", service="svc", source="broken") == 1
    assert value(s, "atlasflow_gauge_source_failures_total", service="svc", source="fine") is None


def test_stage_histogram_and_disk_gauges(tmp_path):
    m = Metrics("ingest")
    m.observe_stage("assemble_volume", 0.2)
    m.observe_stage("assemble_volume", 40.0)
    m.add_disk("state", tmp_path, 1024**3)
    s = scrape(m)
    assert value(s, "atlasflow_stage_duration_seconds_count", service="ingest", stage="assemble_volume") == 2
    assert (
        value(s, "atlasflow_stage_duration_seconds_bucket", service="ingest", stage="assemble_volume", le="0.25") == 1
    )
    assert value(s, "atlasflow_disk_floor_bytes", service="ingest", dir="state") == 1024**3
    free = value(s, "atlasflow_disk_free_bytes", service="ingest", dir="state")
    assert free is not None and abs(free - shutil.disk_usage(tmp_path).free) < 256 * 1024**2


def test_ranking_queue_and_lease_gauges(db_url):
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    clock = {"t": now}
    with SqlWorklist(db_url, clock=lambda: clock["t"]) as w:
        for i in range(4):
            w.submit(f"case-{i}", "s", "j", [OrganAttention(5, float(i) + 1, 1.0, 100.0)])
        w.lease("case-0", "dr-a", 600)  # held 90 s at the scrape, live
        clock["t"] = now + timedelta(seconds=30)
        w.lease("case-1", "dr-b", 60)  # expires before the scrape, never released
        clock["t"] = now + timedelta(seconds=90)
        m = Metrics("ranking")
        m.add_source("worklist", lambda: worklist_readings(w))
        s = scrape(m)
    assert value(s, "atlasflow_queue_depth", service="ranking", queue="worklist") == 4
    assert value(s, "atlasflow_queue_depth", service="ranking", queue="worklist_pending") == 3
    assert value(s, "atlasflow_queue_depth", service="ranking", queue="cases_open") == 4
    assert value(s, "atlasflow_lease_oldest_age_seconds", service="ranking", queue="review") == pytest.approx(90)
    assert value(s, "atlasflow_leases_expired", service="ranking", queue="review") == 1


def test_segmentation_job_and_outbox_gauges(tmp_path):
    clock = {"t": time.time() - 120}  # the claim happened 120 s before the scrape
    jobs = JobStore(tmp_path, lease_s=60, clock=lambda: clock["t"])
    try:
        for v in (1, 2, 3):
            jobs.submit(
                case_id="case-a",
                series_id="ser-a",
                series_version=v,
                ensemble_version="e1",
                volume_digest="d" * 64,
                volume_size=1,
                labelled_organs=[],
                traceparent="",
            )
        assert jobs.claim() is not None  # its 60 s lease expired 60 s ago, nobody took it back
        with jobs.db.transaction() as conn:
            for i in range(2):
                enqueue(conn, "t", f"k{i}", b"", "")
            conn.execute(sa.text("UPDATE outbox SET create_time = create_time - 300 WHERE dedupe_key = 'k0'"))
        m = Metrics("segmentation")
        m.add_source("jobs", lambda: job_readings(jobs))
        OutboxDispatcher(jobs.outbox, None, {}, m)  # registers the outbox source
        s = scrape(m)
    finally:
        jobs.close()
    assert value(s, "atlasflow_queue_depth", service="segmentation", queue="segmentation_jobs") == 3
    age = value(s, "atlasflow_lease_oldest_age_seconds", service="segmentation", queue="segmentation_jobs")
    assert age is not None and 119 <= age < 180
    assert value(s, "atlasflow_leases_expired", service="segmentation", queue="segmentation_jobs") == 1
    assert value(s, "atlasflow_queue_depth", service="segmentation", queue="outbox") == 2
    lag = value(s, "atlasflow_outbox_lag_seconds", service="segmentation", outbox="outbox")
    assert lag is not None and 299 <= lag < 360


def test_triton_up_is_zero_when_triton_is_unreachable():
    (port,) = free_ports(1)  # nothing listens there
    seg = TritonSegmenter(f"127.0.0.1:{port}", "abdomen", connect_retries=0)
    try:
        assert triton_readings([seg]) == [Reading("atlasflow_triton_up", "", 0.0)]
    finally:
        seg.close()
    assert triton_readings([object()]) == []  # in-process segmenters cannot tell


def test_every_gauge_family_is_described_even_without_readings():
    names = {fam.name for fam in text_string_to_metric_families(generate_latest(Metrics("x").registry).decode())}
    assert set(GAUGES) <= names


@pytest.fixture(scope="module")
def two_series(tmp_path_factory) -> list[list[Path]]:
    root = tmp_path_factory.mktemp("ct")
    return [peers.build_ct_series(root / f"s{i}", 3, seed=f"gauges-{i}") for i in range(2)]


def test_ingest_series_and_claim_gauges(tmp_path, db_url, two_series):
    blobs = LocalBlobStore(tmp_path / "blobs")
    a = IngestStore(tmp_path / "a", blobs, database=db_url, spool_segment_bytes=1 << 20, spool_spares=1, claim_s=60)
    # replica b's claims last 0.05 s: one that stops heart-beating expires at once
    b = IngestStore(tmp_path / "b", blobs, database=db_url, spool_segment_bytes=1 << 20, spool_spares=1, claim_s=0.05)
    try:
        ids = []
        for files in two_series:
            for path in files:
                ds = pydicom.dcmread(path)
                stored = a.store_instance(
                    path.read_bytes(), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
                )
            ids.append(stored.series_id)
        m = Metrics("ingest")
        m.add_source("series", lambda: series_readings(a))
        OutboxDispatcher(a.outbox, None, {}, m)
        s = scrape(m)
        assert value(s, "atlasflow_queue_depth", service="ingest", queue="series_receiving") == 2
        assert value(s, "atlasflow_lease_oldest_age_seconds", service="ingest", queue="series_assembly") == 0
        assert value(s, "atlasflow_leases_expired", service="ingest", queue="series_assembly") == 0
        assert a.begin_assembly(ids[0], 1, 3) == 1  # a's live claim
        assert b.begin_assembly(ids[1], 1, 3) == 1  # b's claim, expired 0.05 s later
        time.sleep(0.5)
        s = scrape(m)
        age = value(s, "atlasflow_lease_oldest_age_seconds", service="ingest", queue="series_assembly")
        assert age is not None and 0.4 <= age < 30
        assert value(s, "atlasflow_leases_expired", service="ingest", queue="series_assembly") == 1
        assert a.mark_assembled(ids[0], 1, "d" * 64, 1, {}, "segment", b"", "") is not False
        s = scrape(m)
        assert value(s, "atlasflow_queue_depth", service="ingest", queue="series_receiving") == 1
        assert value(s, "atlasflow_queue_depth", service="ingest", queue="series_open") == 2
        assert value(s, "atlasflow_queue_depth", service="ingest", queue="outbox") == 1
        lag = value(s, "atlasflow_outbox_lag_seconds", service="ingest", outbox="outbox")
        assert lag is not None and 0 <= lag < 30
    finally:
        a.close()
        b.close()


def test_labels_outbox_depth_and_lag(tmp_path, db_url):
    url = db_url if db_url.startswith("postgresql://") else ""
    repo = open_repository(url, tmp_path)
    try:
        versions = [
            repo.create_version(
                f"case-{i}",
                BlobInfo(digest_of(f"lm-{i}".encode()), 4),
                BlobInfo(digest_of(f"ct-{i}".encode()), 4),
                Provenance("ai", model_version="trio-v1", job_id=f"job-{i}", weights_trained=False),
                f"req-{i}",
                "",
                organs=(5,),
                shape=(4, 5, 6),
                affine=tuple(float(a) for a in np.eye(4).ravel()),
            )
            for i in range(3)
        ]
        store = VersionEventStore(repo)
        m = Metrics("labels")
        OutboxDispatcher(store, None, {}, m)
        # the first version was stored 10 minutes ago and its event delivered; the second 5
        # minutes ago, not delivered: the lag is 5 minutes
        long_ago = datetime.now(UTC) - timedelta(minutes=10)
        with repo._db.write() as tx:  # noqa: SLF001 - backdating needs the repository's own SQL
            for v, minutes in ((versions[0], 10), (versions[1], 5)):
                t = repo._db.timestamp(long_ago + timedelta(minutes=10 - minutes))  # noqa: SLF001
                tx.run("UPDATE label_versions SET create_time = ? WHERE version_id = ?", (t, v.version_id))
        (first, *_) = store.due(time.time(), 10)
        store.mark(first.id, "done", "", 0.0)
        s = scrape(m)
    finally:
        repo.close()
    assert value(s, "atlasflow_queue_depth", service="labels", queue="outbox") == 2
    lag = value(s, "atlasflow_outbox_lag_seconds", service="labels", outbox="outbox")
    assert lag is not None and 299 <= lag < 360
