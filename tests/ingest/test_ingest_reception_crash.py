"""Crash test: SIGKILL the ingest service in the middle of a C-STORE stream from dcmtk storescu.

After a restart every instance that storescu saw acknowledged with Success is stored with its
exact bytes (re-sending exactly those files adds only duplicates), and the
sender's retry of the whole series completes it: instance_count == number of files, duplicates
reported, no conflicts, and the series assembles from the stored blobs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from atlasflow.common.clients import sync_channel
from atlasflow.ingest.identity import atlas_id
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.testing import peers

REPO = Path(__file__).resolve().parents[2]

N_SLICES = 60
KILL_AFTER = 20


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return peers.build_ct_series(tmp_path_factory.mktemp("series"), N_SLICES, seed="crash-test")


def test_sigkill_mid_stream_loses_no_acknowledged_instance(series, tmp_path):
    # 8 MiB spool segments: the stream crosses segment rotations, including the growing-file
    # fallback once the two prepared spares are used up.
    ingest = peers.IngestProcess(tmp_path / "ingest", env={"SPOOL_SEGMENT_MB": "8"})
    ingest.start()
    try:
        exe = shutil.which("storescu")
        assert exe
        proc = subprocess.Popen(
            [
                exe,
                "-v",
                "-aet",
                "CRASHTEST",
                "-aec",
                "ATLASFLOW",
                "127.0.0.1",
                str(ingest.dicom_port),
                *map(str, series),
            ],
            env=dict(os.environ, TCP_NODELAY="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        lines, successes, killed = [], 0, False
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            lines.append(line)
            if "Received Store Response (Success" in line:
                successes += 1
                if successes == KILL_AFTER and not killed:
                    ingest.kill()  # SIGKILL: no shutdown code runs
                    killed = True
            assert time.monotonic() < deadline, "storescu hung"
        proc.wait(30)
        assert killed, "the stream ended before the kill"
        acked = peers.acknowledged_files("".join(lines))
        assert KILL_AFTER <= len(acked) < N_SLICES, (len(acked), proc.returncode)
        assert proc.returncode != 0  # storescu saw the association die

        ingest.start()  # same ports, data and blob directories: start-up replays the spool
        series_id = atlas_id("ser", peers.bench_uid("crash-test", "series"))
        with sync_channel(ingest.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            after_crash = stub.GetSeries(ingest_pb2.GetSeriesRequest(series_id=series_id), timeout=10).series
            assert after_crash.instance_count >= len(acked)
            # every acknowledged instance is there, byte for byte: re-sending exactly those
            # files stores nothing new (each is a duplicate: same SOP Instance UID, same bytes)
            again = peers.storescu([Path(p) for p in acked], ingest.dicom_port, aet="CRASHTEST")
            assert again.returncode == 0, again.stderr[-2000:]
            sv1 = stub.GetSeries(ingest_pb2.GetSeriesRequest(series_id=series_id), timeout=10).series
            assert sv1.instance_count == after_crash.instance_count
            assert sv1.duplicate_count == after_crash.duplicate_count + len(acked)
            assert sv1.conflict_count == 0

            # the sender's retry of the whole series completes it
            retry = peers.storescu(series, ingest.dicom_port, aet="CRASHTEST")
            assert retry.returncode == 0, retry.stderr[-2000:]
            assert len(peers.acknowledged_files(retry.stdout + retry.stderr)) == N_SLICES
            sv = stub.GetSeries(ingest_pb2.GetSeriesRequest(series_id=series_id), timeout=10).series
            assert sv.instance_count == N_SLICES
            assert sv.conflict_count == 0
            assert sv.duplicate_count >= 2 * len(acked)  # both re-sends
            assert sv.state == ingest_pb2.SERIES_STATE_RECEIVING
            committed = stub.CommitSeries(ingest_pb2.CommitSeriesRequest(series_id=series_id), timeout=120).series
        assert committed.state == ingest_pb2.SERIES_STATE_ASSEMBLED, committed.failure_reason
        assert list(committed.geometry.shape) == [512, 512, N_SLICES]
        log = ingest.log_text()
        assert "spool recovered" in log
    finally:
        ingest.stop()
