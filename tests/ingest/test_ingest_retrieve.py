"""`atlasflow retrieve` against a real Orthanc (Debian 1.10): C-FIND, then C-MOVE to the ingest
service's SCP (or C-GET + gRPC upload), and the errors a user meets (association rejected,
no match, unknown move destination).

Orthanc is started with a generated config whose DicomModalities name the ingest SCP, loaded
with two CT series of one study by dcmtk storescu; the ingest service runs as a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import grpc
import pydicom
import pytest

from atlasflow.common.clients import sync_channel
from atlasflow.ingest.identity import atlas_id
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.testing import peers

REPO = Path(__file__).resolve().parents[2]

N_A, N_B = 6, 4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("qr")
    a = peers.build_ct_series(root / "a", N_A, seed="qr-a")
    b = peers.build_ct_series(root / "b", N_B, seed="qr-b")
    study = peers.bench_uid("qr-a", "study")
    for p in b:  # series B joins study A
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study
        ds.save_as(p, enforce_file_format=True)
    ingest = peers.IngestProcess(root / "ingest").start()
    orthanc = peers.OrthancProcess(
        root / "orthanc",
        modalities={"atlasflow": ("ATLASFLOW", "127.0.0.1", ingest.dicom_port), "qr": ("ATLASFLOW_QR", "127.0.0.1", 1)},
    )
    orthanc.config["DicomCheckCalledAet"] = True
    orthanc.start()
    try:
        loaded = peers.storescu(a + b, orthanc.dicom_port, aec="ORTHANC")
        assert loaded.returncode == 0, loaded.stderr[-2000:]
        # Wait until the PACS has indexed both series (its REST API) before querying it.
        deadline = time.monotonic() + 30
        while len(orthanc.get("/series")) < 2 or len(orthanc.get("/instances")) < N_A + N_B:
            assert time.monotonic() < deadline, "Orthanc did not index the loaded series"
            time.sleep(0.2)
        yield {
            "ingest": ingest,
            "orthanc": orthanc,
            "study": study,
            "series_a": peers.bench_uid("qr-a", "series"),
            "series_b": peers.bench_uid("qr-b", "series"),
        }
    finally:
        orthanc.stop()
        ingest.stop()


def _retrieve(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(peers.PYTHON),
            "-m",
            "atlasflow.cli.main",
            "retrieve",
            "--pacs",
            f"127.0.0.1:{env['orthanc'].dicom_port}",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(peers.os.environ, TCP_NODELAY="1"),
    )


def _count(env, series_uid: str) -> int:
    with sync_channel(env["ingest"].target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        try:
            return stub.GetSeries(
                ingest_pb2.GetSeriesRequest(series_id=atlas_id("ser", series_uid)), timeout=10
            ).series.instance_count
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            return 0


def test_find_and_move_one_series_then_the_study(env):
    r = _retrieve(env, "--pacs-aet", "ORTHANC", "--study-uid", env["study"], "--series-uid", env["series_b"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["series"] == [{"series_uid": env["series_b"], "modality": "CT", "instance_count": N_B}]
    assert [(t["series_uid"], t["completed"], t["failed"]) for t in out["transfers"]] == [(env["series_b"], N_B, 0)]
    assert (_count(env, env["series_a"]), _count(env, env["series_b"])) == (0, N_B)

    r = _retrieve(env, "--pacs-aet", "ORTHANC", "--study-uid", env["study"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert sorted((s["series_uid"], s["instance_count"]) for s in out["series"]) == sorted(
        [(env["series_a"], N_A), (env["series_b"], N_B)]
    )
    assert sum(t["completed"] for t in out["transfers"]) == N_A + N_B
    # complete in ingest; series B's second copy is a duplicate, not a new instance
    assert (_count(env, env["series_a"]), _count(env, env["series_b"])) == (N_A, N_B)


def test_c_get_uploads_over_grpc(env, tmp_path):
    series = peers.build_ct_series(tmp_path / "c", 3, seed="qr-c")
    assert peers.storescu(series, env["orthanc"].dicom_port, aec="ORTHANC").returncode == 0
    r = _retrieve(
        env,
        "--pacs-aet",
        "ORTHANC",
        "--study-uid",
        peers.bench_uid("qr-c", "study"),
        "--get",
        "--target",
        env["ingest"].target,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [(t["completed"], t["uploaded"]) for t in out["transfers"]] == [(3, 3)]
    assert _count(env, peers.bench_uid("qr-c", "series")) == 3


@pytest.mark.parametrize(
    ("args", "reason", "words"),
    [
        (["--pacs-aet", "WRONG"], "ASSOCIATION_REJECTED", "called AE title not recognised"),
        (["--pacs-aet", "ORTHANC", "--series-uid", "1.2.3.4"], "NO_MATCH", "no such series"),
        # Orthanc 1.10 answers an unknown move destination with 0xC000, not 0xA801
        (["--pacs-aet", "ORTHANC", "--move-dest", "NOBODY"], "MOVE_FAILED", "status 0xC000"),
    ],
)
def test_errors_say_why(env, args, reason, words):
    r = _retrieve(env, "--study-uid", env["study"], *args)
    assert r.returncode == 1
    assert reason in r.stderr and words in r.stderr, r.stderr


def test_unknown_study_is_no_match(env):
    r = _retrieve(env, "--pacs-aet", "ORTHANC", "--study-uid", "1.2.3.999")
    assert r.returncode == 1 and "NO_MATCH" in r.stderr and "no study" in r.stderr, r.stderr
