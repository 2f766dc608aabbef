"""A bad series fails itself, never the assembler: whatever its assembly raises (not only an
AtlasflowError), the version ends FAILED with a reason that names no patient data, the assembler
loop goes on with the next series, and after a restart the failed version is not picked up again."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.metrics import Metrics
from atlasflow.ingest import worker
from atlasflow.ingest.store import IngestStore
from atlasflow.ingest.worker import Assembler
from atlasflow.testing import peers

SEG = 2 * 1024 * 1024  # small spool segments: fast zero-fill
SECRET = "DOE^JANE"  # stands for patient data in an exception message


def _receive(store: IngestStore, paths: list[Path], mutate=None) -> str:
    """Store a series' files as reception would; returns its series_id."""
    series_id = ""
    for p in paths:
        ds = pydicom.dcmread(p)
        if mutate is not None:
            mutate(ds)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        stored = store.store_instance(out.getvalue(), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        series_id = stored.series_id
    return series_id


async def _assemble_until_settled(assembler: Assembler, store: IngestStore, timeout: float = 60.0) -> None:
    """Run the real assembler loop until no series is RECEIVING (it must not die meanwhile)."""
    task = asyncio.create_task(assembler.run())
    deadline = time.monotonic() + timeout
    try:
        while await asyncio.to_thread(store.due_for_assembly, 0.0):
            assert not task.done(), f"the assembler loop died: {task.exception()!r}"
            assert time.monotonic() < deadline, "series still RECEIVING"
            await asyncio.sleep(0.05)
        assert not task.done(), "the assembler loop ended"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture()
def series(tmp_path):
    bad = peers.build_ct_series(tmp_path / "bad", 3, seed="robust-bad")
    good = peers.build_ct_series(tmp_path / "good", 3, seed="robust-good")
    return bad, good


def _check(tmp_path: Path, blobs: LocalBlobStore, bad_id: str, good_id: str, reason: str) -> None:
    """The bad version is FAILED with ``reason``, the good one ASSEMBLED with its hand-off queued,
    and a reopened store (a restart) has nothing due for assembly."""
    store = IngestStore(tmp_path / "data", blobs, spool_segment_bytes=SEG)
    try:
        failed, assembled = store.get_series(bad_id), store.get_series(good_id)
        assert (failed.state, failed.failure_reason) == ("FAILED", reason)
        assert SECRET not in failed.failure_reason
        assert assembled.state == "ASSEMBLED" and assembled.volume_digest
        with store.db.read() as conn:
            keys = [r[0] for r in conn.execute(sa.text("SELECT dedupe_key FROM outbox"))]
        assert keys == [f"{good_id}:1"]
        assert store.due_for_assembly(0.0) == []
    finally:
        store.close()


def test_an_unexpected_exception_fails_its_series_and_the_next_one_still_assembles(tmp_path, series, monkeypatch):
    bad_paths, good_paths = series
    bad_uid = pydicom.dcmread(bad_paths[0]).SeriesInstanceUID
    real = worker.assemble_series

    def assemble_series(datasets, policy):
        if datasets[0].SeriesInstanceUID == bad_uid:
            raise OverflowError(f"crafted pixel attributes of {SECRET}")
        return real(datasets, policy=policy)

    monkeypatch.setattr(worker, "assemble_series", assemble_series)
    blobs = LocalBlobStore(tmp_path / "blobs")
    store = IngestStore(tmp_path / "data", blobs, spool_segment_bytes=SEG)
    metrics = Metrics("ingest")
    try:
        bad_id = _receive(store, bad_paths)  # received first: assembled (and failing) first
        time.sleep(0.01)
        good_id = _receive(store, good_paths)
        asyncio.run(_assemble_until_settled(Assembler(store, blobs, metrics, quiet_period_s=0.0), store))
    finally:
        store.close()
    _check(tmp_path, blobs, bad_id, good_id, "ASSEMBLY_FAILED: OverflowError")
    sample = metrics.registry.get_sample_value
    assert sample("atlasflow_events_total", {"service": "ingest", "event": "series_failed"}) == 1.0
    assert sample("atlasflow_events_total", {"service": "ingest", "event": "series_assembled"}) == 1.0


def test_a_crafted_rescale_slope_fails_its_series_not_the_assembler(tmp_path, series):
    """A real crafted attribute, no monkeypatch: RescaleSlope 1e308 (stored past reception's
    check) made numpy raise UFuncTypeError while the pixels were rescaled; assembly now refuses
    it from the header (CORRUPT_DICOM, check rescale) and the series fails with that reason."""
    bad_paths, good_paths = series
    blobs = LocalBlobStore(tmp_path / "blobs")
    store = IngestStore(tmp_path / "data", blobs, spool_segment_bytes=SEG)
    try:
        bad_id = _receive(store, bad_paths, mutate=lambda ds: setattr(ds, "RescaleSlope", "1e308"))
        time.sleep(0.01)
        good_id = _receive(store, good_paths)
        asyncio.run(_assemble_until_settled(Assembler(store, blobs, Metrics("ingest"), quiet_period_s=0.0), store))
    finally:
        store.close()
    _check(tmp_path, blobs, bad_id, good_id, "CORRUPT_DICOM")
