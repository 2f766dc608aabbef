"""Labels tells ranking about every label version, durably: the real labels and ranking
services (`atlasflow serve`, separate processes). Ranking is down while the first version is
written; the version-event outbox delivers it once ranking is up. A radiologist's revision of
the liver then takes the liver's attention out of the case priority and re-ranks the case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.clients import sync_channel
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.common.ports import free_ports
from atlasflow.common.v1 import common_pb2
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.method.prior import PopulationPrior
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.testing import auth

REPO = Path(__file__).resolve().parents[2]
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
LIVER, SPLEEN = 5, 8


def _serve(name: str, root: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    full = dict(os.environ, PYTHONUNBUFFERED="1", OTEL_SDK_DISABLED="true", OTEL_TRACES_EXPORTER="none")
    full.update(
        {
            f"ATLASFLOW_{name.upper()}_{k}": v
            for k, v in {
                "DATA_DIR": str(root / name),
                "BLOB_DIR": str(root / "blobs"),
                "SHUTDOWN_GRACE_S": "1",
                **env,
            }.items()
        }
    )
    full.update(auth.auth_env(f"ATLASFLOW_{name.upper()}_"))
    return subprocess.Popen(
        [sys.executable, "-m", "atlasflow.cli.main", "serve", name],
        cwd=REPO,
        env=full,
        stdout=open(root / f"{name}.log", "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )


def _wait_serving(target: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"{target} did not become ready"
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _until(fn, timeout_s: float = 40.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def _ref(blobs: LocalBlobStore, data: bytes) -> common_pb2.BlobRef:
    info = blobs.put(data)
    return common_pb2.BlobRef(digest=info.digest, size_bytes=info.size_bytes)


def test_revision_reaches_ranking_and_reranks(tmp_path: Path) -> None:
    labels_port, ranking_port, m1, m2 = free_ports(4)
    ranking_target = f"127.0.0.1:{ranking_port}"
    labels = _serve(
        "labels", tmp_path, {"GRPC_PORT": str(labels_port), "METRICS_PORT": str(m1), "RANKING_TARGET": ranking_target}
    )
    ranking = None
    try:
        _wait_serving(f"127.0.0.1:{labels_port}", labels, tmp_path / "labels.log")
        blobs = LocalBlobStore(tmp_path / "blobs")
        ct = np.full((24, 20, 10), -100, np.int16)
        label_map = np.zeros(ct.shape, np.uint8)
        label_map[2:12, 2:12, 2:8] = LIVER
        label_map[14:20, 4:10, 3:7] = SPLEEN
        ct_ref = _ref(blobs, to_nifti_bytes(ct, AFFINE))
        lstub = labels_pb2_grpc.LabelServiceStub(sync_channel(f"127.0.0.1:{labels_port}"))  # all-roles token
        v1 = lstub.CreateLabelVersion(
            labels_pb2.CreateLabelVersionRequest(
                case_id="case-a",
                label_map=_ref(blobs, to_nifti_bytes(label_map, AFFINE)),
                ct=ct_ref,
                provenance=labels_pb2.Provenance(
                    source=labels_pb2.LABEL_SOURCE_AI, model_version="trio", job_id="job-1"
                ),
                request_id="ai-1",
            ),
            timeout=30,
        ).version
        time.sleep(1.5)  # the outbox tries (and fails) while ranking is down

        ranking = _serve("ranking", tmp_path, {"GRPC_PORT": str(ranking_port), "METRICS_PORT": str(m2)})
        _wait_serving(ranking_target, ranking, tmp_path / "ranking.log")
        rstub = ranking_pb2_grpc.RankingServiceStub(sync_channel(ranking_target))

        def organ(o: int, ml: float) -> ranking_pb2.OrganAttention:
            return ranking_pb2.OrganAttention(organ=o, attention_ml=ml, heatmap_ml=ml / 2, volume_ml=50.0)

        for case, organs in (("case-b", [organ(LIVER, 7.0)]), ("case-a", [organ(LIVER, 10.0), organ(SPLEEN, 4.0)])):
            rstub.SubmitAttention(
                ranking_pb2.SubmitAttentionRequest(
                    case_id=case, series_id="s-" + case, source_job_id="job-1", organs=organs
                ),
                metadata=auth.service_metadata("segmentation"),  # segmentation's hand-off
                timeout=10,
            )

        def item(case: str) -> ranking_pb2.WorklistItem:
            return rstub.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id=case), timeout=10).item

        # version 1 (AI) arrives after ranking came up; nothing human yet
        got = _until(lambda: item("case-a").label_version_id == v1.version_id)
        assert got, (tmp_path / "labels.log").read_text()[-3000:]
        a = item("case-a")
        assert a.priority == pytest.approx(14.0) and a.rank == 1 and not a.human_decided_organs

        # a radiologist leases the case and revises the liver (a revision needs the lease)
        dr_x = auth.metadata("reviewer", subject="dr.x")
        rstub.LeaseCase(ranking_pb2.LeaseCaseRequest(case_id="case-a"), metadata=dr_x, timeout=10)
        liver = (label_map == LIVER).astype(np.uint8)
        liver[2:4] = 0
        v2 = lstub.ReviseLabels(
            labels_pb2.ReviseLabelsRequest(
                case_id="case-a",
                expected_parent_version_id=v1.version_id,
                request_id="rev-1",
                revisions=[labels_pb2.OrganRevision(organ=LIVER, mask_blob=_ref(blobs, to_nifti_bytes(liver, AFFINE)))],
            ),
            metadata=dr_x,
            timeout=30,
        ).version
        rstub.ReleaseLease(ranking_pb2.ReleaseLeaseRequest(case_id="case-a"), metadata=dr_x, timeout=10)
        assert _until(lambda: item("case-a").label_version_id == v2.version_id)
        a = item("case-a")
        assert list(a.human_decided_organs) == [LIVER]
        assert a.priority == pytest.approx(4.0) and a.rank == 2  # below case-b (7 ml)
        assert a.status == ranking_pb2.WORKLIST_STATUS_PENDING
        # the organ filter no longer finds case-a by its (answered) liver
        listed = rstub.ListWorklist(ranking_pb2.ListWorklistRequest(organs=[LIVER]), timeout=10)
        assert [i.case_id for i in listed.items] == ["case-b"]
        # the revised liver (a human decision) teaches ranking's population prior; AI organs do not
        prior = rstub.GetPopulationPrior(ranking_pb2.GetPopulationPriorRequest(), timeout=10)
        assert prior.learned_cases == 1
        learned = PopulationPrior.from_dict(json.loads(prior.prior_json))
        bundled = PopulationPrior.load()
        assert learned.cases == bundled.cases + 1

        def count(prior: PopulationPrior, organ: int) -> int:
            run = prior.log_volume.get(organ)
            return 0 if run is None else run.n

        assert count(learned, LIVER) == count(bundled, LIVER) + 1  # the revised liver
        assert count(learned, SPLEEN) == count(bundled, SPLEEN)  # the AI spleen: not learned
    finally:
        _stop(ranking)
        _stop(labels)
