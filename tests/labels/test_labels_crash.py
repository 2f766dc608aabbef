"""Crash test: SIGKILL the labels service (a real subprocess) while many CreateLabelVersion and
ReviseLabels calls are in flight, restart it, and find every case intact: each version's blobs
readable and verified, its label map fitting the CT, the parent chain linear and complete, the
head its last link, no version without its audit record, and every acknowledged write
present. Runs on both backends (SQLite file; PostgreSQL, which survives the kill)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.v1 import common_pb2
from atlasflow.labels.assembly import encode_mask_delta
from atlasflow.labels.storage import open_repository
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.labels.validate import validate_label_map
from atlasflow.testing import auth

REPO_ROOT = Path(__file__).resolve().parents[2]
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
SHAPE = (24, 20, 10)
CASES = [f"case-{i}" for i in range(6)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "atlasflow.cli.main", "serve", "labels"],
        env=env,
        cwd=REPO_ROOT,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            if (
                health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                channel.close()
                return proc
        except grpc.RpcError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("labels service did not become ready: " + log.read_text()[-2000:])


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sigkill_during_writes_leaves_old_or_new_never_torn(backend, tmp_path, request):
    url = request.getfixturevalue("pg_database")() if backend == "postgres" else ""
    port = _free_port()
    env = {
        **os.environ,
        "ATLASFLOW_LABELS_GRPC_PORT": str(port),
        "ATLASFLOW_LABELS_DATA_DIR": str(tmp_path / "data"),
        "ATLASFLOW_LABELS_BLOB_DIR": str(tmp_path / "blobs"),
        "ATLASFLOW_LABELS_DATABASE_URL": url,
        "OTEL_SDK_DISABLED": "true",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        **auth.auth_env("ATLASFLOW_LABELS_"),
        # the label store's atomicity under SIGKILL, without a ranking service to hold leases
        # (the lease check: tests/labels/test_labels_revise_lease.py)
        "ATLASFLOW_LABELS_REVISE_REQUIRES_LEASE": "false",
    }
    blobs = LocalBlobStore(tmp_path / "blobs")
    rng = np.random.default_rng(7)
    ct = rng.integers(-1000, 400, SHAPE).astype(np.int16)
    ct_ref = common_pb2.BlobRef(digest=blobs.put(to_nifti_bytes(ct, AFFINE)).digest)
    maps = []
    for i in range(12):
        m = np.zeros(SHAPE, np.uint8)
        m[i : i + 8, 2:12, :] = 5
        m[16:22, 4 + i % 5 : 14, 2:8] = 8
        maps.append(common_pb2.BlobRef(digest=blobs.put(to_nifti_bytes(m, AFFINE)).digest))

    log = tmp_path / "service.log"
    proc = _start(env, port, log)
    stub = labels_pb2_grpc.LabelServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    acked: dict[str, str] = {}  # request_id -> version_id, acknowledged before the kill
    sent: list[tuple[str, labels_pb2.CreateLabelVersionRequest]] = []
    # tokens minted before the threads start: the writers act as the segmentation service's hand-off
    service = auth.service_metadata("segmentation")
    reviewers = {t: auth.metadata("reviewer", subject=f"dr-{t}") for t in range(2)}
    stop = threading.Event()
    lock = threading.Lock()

    def writer(t: int) -> None:
        i = 0
        while not stop.is_set():
            case = CASES[(t + i) % len(CASES)]
            req = labels_pb2.CreateLabelVersionRequest(
                case_id=case,
                label_map=maps[(t * 7 + i) % len(maps)],
                ct=ct_ref,
                provenance=labels_pb2.Provenance(source=labels_pb2.LABEL_SOURCE_AI),
                request_id=f"w{t}-{i}-{uuid.uuid4().hex[:6]}",
            )
            with lock:
                sent.append((case, req))
            i += 1
            try:
                v = stub.CreateLabelVersion(req, metadata=service, timeout=20).version
            except grpc.RpcError:
                continue
            with lock:
                acked[req.request_id] = v.version_id

    def reviewer(t: int) -> None:
        meta = reviewers[t]
        while not stop.is_set():
            try:
                head = stub.ListLabelVersions(
                    labels_pb2.ListLabelVersionsRequest(case_id=CASES[t], page_size=1), metadata=meta, timeout=20
                ).versions
                if not head:
                    time.sleep(0.01)
                    continue
                labels, _ = from_nifti_bytes(blobs.get(head[0].label_map.digest))
                liver = labels == 5
                fixed = liver.copy()
                fixed[:, :, 0] = False
                req = labels_pb2.ReviseLabelsRequest(
                    case_id=CASES[t],
                    expected_parent_version_id=head[0].version_id,
                    request_id=uuid.uuid4().hex,
                    revisions=[
                        labels_pb2.OrganRevision(
                            organ=common_pb2.ORGAN_LIVER, xor_delta=encode_mask_delta(liver, fixed)
                        )
                    ],
                )
                v = stub.ReviseLabels(req, metadata=meta, timeout=20).version
            except grpc.RpcError:
                continue
            with lock:
                acked[req.request_id] = v.version_id

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    threads += [threading.Thread(target=reviewer, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 30
    while len(acked) < 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-flight: the writers are still sending
    proc.wait(10)
    stop.set()
    for th in threads:
        th.join(30)
    in_flight = len(sent) - sum(1 for _, r in sent if r.request_id in acked)
    print(f"[{backend}] acknowledged {len(acked)}, unacknowledged {in_flight} at the kill")
    assert len(acked) >= 60 and in_flight > 0

    # ---- restart and check every case
    proc = _start(env, port, log)
    try:
        repo = open_repository(url, tmp_path / "data")
        total = 0
        for case in CASES:
            chain = repo.history(case)
            listed, token = repo.list_versions(case, 1000)
            assert token == ""
            assert [v.version_id for v in chain] == [v.version_id for v in reversed(listed)]
            assert chain and chain[0].parent_version_id == ""
            for prev, nxt in zip(chain, chain[1:]):
                assert nxt.parent_version_id == prev.version_id
            assert repo.head(case) == chain[-1]
            for v in chain:
                labels, label_affine = from_nifti_bytes(blobs.get(v.label_map_digest))  # verified
                assert blobs.get(v.ct_digest)
                assert validate_label_map(labels, label_affine, SHAPE, AFFINE) == v.organs
                assert set(v.organ_provenance) == set(range(1, 10))
            total += len(chain)
        for request_id, version_id in acked.items():
            found = repo.version_for_request(request_id)
            assert found is not None and found[0].version_id == version_id
        # every stored version has the audit record of its write (same transaction)
        audited = set()
        records, token = repo.list_audit_records(page_size=1000)
        while True:
            audited |= {
                vid
                for r in records
                if r.method in ("CreateLabelVersion", "ReviseLabels") and r.outcome == "OK"
                for vid in r.version_ids
            }
            if not token:
                break
            records, token = repo.list_audit_records(page_size=1000, page_token=token)
        stored = {v.version_id for c in CASES for v in repo.history(c)}
        assert stored <= audited
        if backend == "sqlite":
            import sqlite3

            conn = sqlite3.connect(tmp_path / "data" / "labels.sqlite3")
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            conn.close()
        # replaying every request that was in flight is harmless: exactly-once per request_id
        stub = labels_pb2_grpc.LabelServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        committed_unacked = sum(
            1 for _, r in sent if r.request_id not in acked and repo.version_for_request(r.request_id) is not None
        )
        print(
            f"[{backend}] in flight at the kill: {in_flight}, of which committed (new "
            f"version found): {committed_unacked}, absent (old version): "
            f"{in_flight - committed_unacked}"
        )
        replayed = [r for _, r in sent if r.request_id not in acked][:10]
        new = 0
        for r in replayed:
            before = repo.version_for_request(r.request_id)
            v = stub.CreateLabelVersion(r, metadata=service, timeout=20).version
            if before is not None:
                assert v.version_id == before[0].version_id
            else:
                new += 1
            assert stub.CreateLabelVersion(r, metadata=service, timeout=20).version.version_id == v.version_id
        assert sum(len(repo.history(c)) for c in CASES) == total + new
        print(f"[{backend}] {total} versions intact after the kill")
        repo.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
