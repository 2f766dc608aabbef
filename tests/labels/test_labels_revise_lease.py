"""ReviseLabels is tied to the lease, and a label version's author is the verified caller: the real
labels and ranking services started as `atlasflow up` starts them (TLS, per-service tokens).

A reviewer without the case's lease is refused FAILED_PRECONDITION LEASE_NOT_HELD; the lease
holder revises; after the holder releases the lease, or after it expires, the holder is refused
too. CreateLabelVersion records the calling service's identity (svc:segmentation) or the
admin's token subject as the author, whatever provenance the request claims."""

from __future__ import annotations

import gzip
import math
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2

from atlasflow.cli.local import LocalDeployment
from atlasflow.common.auth import TokenSource
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.common.server import error_info_of
from atlasflow.common.v1 import common_pb2
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
SHAPE = (16, 12, 6)
LIVER = 5
CASE = "case-lease"


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    dep = LocalDeployment.create(tmp_path_factory.mktemp("lease"), auto_ports=True)
    names = ["labels", "ranking"]
    dep.start(names)
    try:
        dep.wait_healthy(120, names)
        yield dep
    finally:
        dep.stop(names=names)


def _as_service(dep: LocalDeployment, service: str, name: str) -> grpc.Channel:
    """A channel to ``service`` carrying service ``name``'s own token (auth/<name>.token)."""
    return dep.channel(service, token=TokenSource(path=dep.service_token_file(name)))


def _refused(call, code: grpc.StatusCode, reason: str) -> dict[str, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    info = error_info_of(err.value)
    assert (err.value.code(), info.reason if info else "") == (code, reason)
    return dict(info.metadata)


def test_revisions_need_the_lease_and_authors_are_the_callers(dep: LocalDeployment) -> None:
    blobs = LocalBlobStore(dep.blob_dir)
    label_map = np.zeros(SHAPE, np.uint8)
    label_map[2:8, 2:8, 1:4] = LIVER
    ct = np.full(SHAPE, -100, np.int16)

    def ref(data: bytes) -> common_pb2.BlobRef:
        return common_pb2.BlobRef(digest=blobs.put(data).digest)

    # segmentation's hand-offs, made with segmentation's token: the AI version and the attention
    as_seg = labels_pb2_grpc.LabelServiceStub(_as_service(dep, "labels", "segmentation"))
    v1 = as_seg.CreateLabelVersion(
        labels_pb2.CreateLabelVersionRequest(
            case_id=CASE,
            label_map=ref(to_nifti_bytes(label_map, AFFINE)),
            ct=ref(to_nifti_bytes(ct, AFFINE)),
            # a claimed author is not recorded: the verified caller is
            provenance=labels_pb2.Provenance(source=labels_pb2.LABEL_SOURCE_AI, job_id="j1", reviewer="dr.forged"),
            request_id="ai-1",
        ),
        timeout=30,
    ).version
    assert v1.provenance.reviewer == "svc:segmentation"
    ranking_seg = ranking_pb2_grpc.RankingServiceStub(_as_service(dep, "ranking", "segmentation"))
    ranking_seg.SubmitAttention(
        ranking_pb2.SubmitAttentionRequest(
            case_id=CASE,
            series_id="s-1",
            source_job_id="j1",
            organs=[ranking_pb2.OrganAttention(organ=LIVER, attention_ml=5.0, heatmap_ml=2.0, volume_ml=50.0)],
        ),
        timeout=30,
    )

    # an admin's import: the admin is the author, not the radiologist the request names
    admin = labels_pb2_grpc.LabelServiceStub(dep.channel("labels", token=dep.token_source("admin", "dr.admin")))
    imported = admin.CreateLabelVersion(
        labels_pb2.CreateLabelVersionRequest(
            case_id="case-import",
            label_map=ref(to_nifti_bytes(label_map, AFFINE)),
            ct=ref(to_nifti_bytes(ct, AFFINE)),
            provenance=labels_pb2.Provenance(source=labels_pb2.LABEL_SOURCE_RADIOLOGIST, reviewer="dr.house"),
            request_id="import-1",
        ),
        timeout=30,
    ).version
    assert imported.provenance.reviewer == "dr.admin"

    def people(who: str) -> tuple[ranking_pb2_grpc.RankingServiceStub, labels_pb2_grpc.LabelServiceStub]:
        tokens = dep.token_source("reviewer", who)
        return (
            ranking_pb2_grpc.RankingServiceStub(dep.channel("ranking", token=tokens)),
            labels_pb2_grpc.LabelServiceStub(dep.channel("labels", token=tokens)),
        )

    ranking_a, labels_a = people("dr.a")
    ranking_b, labels_b = people("dr.b")
    voxels = math.prod(SHAPE)
    parent = [v1.version_id]

    def revise(stub: labels_pb2_grpc.LabelServiceStub, request_id: str) -> labels_pb2.LabelVersion:
        return stub.ReviseLabels(
            labels_pb2.ReviseLabelsRequest(
                case_id=CASE,
                expected_parent_version_id=parent[0],
                request_id=request_id,
                revisions=[labels_pb2.OrganRevision(organ=LIVER, xor_delta=gzip.compress(bytes((voxels + 7) // 8)))],
            ),
            timeout=30,
        ).version

    fp, not_held = grpc.StatusCode.FAILED_PRECONDITION, "LEASE_NOT_HELD"
    # nobody holds the lease: refused; a case ranking does not know: refused
    assert _refused(lambda: revise(labels_b, "b-1"), fp, not_held)["cause"] == "no_lease"
    # dr.a leases; dr.b (no lease) is refused, dr.a revises
    ranking_a.LeaseCase(ranking_pb2.LeaseCaseRequest(case_id=CASE), timeout=30)
    assert _refused(lambda: revise(labels_b, "b-2"), fp, not_held)["cause"] == "other_reviewer"
    v2 = revise(labels_a, "a-1")
    assert v2.provenance.reviewer == "dr.a" and v2.parent_version_id == v1.version_id
    parent[0] = v2.version_id
    # after the release the former holder is refused too
    ranking_a.ReleaseLease(ranking_pb2.ReleaseLeaseRequest(case_id=CASE), timeout=30)
    assert _refused(lambda: revise(labels_a, "a-2"), fp, not_held)["cause"] == "no_lease"
    # an expired lease is no lease
    short = duration_pb2.Duration(seconds=1)
    ranking_a.LeaseCase(ranking_pb2.LeaseCaseRequest(case_id=CASE, lease_duration=short), timeout=30)
    time.sleep(1.5)
    assert _refused(lambda: revise(labels_a, "a-3"), fp, not_held)["cause"] == "no_lease"
    # nothing was written by the refused calls: the head is still dr.a's revision
    listed = labels_a.ListLabelVersions(labels_pb2.ListLabelVersionsRequest(case_id=CASE), timeout=30).versions
    assert [v.version_id for v in listed][0] == v2.version_id and len(listed) == 2
    # the refusals are in the audit trail
    audit = admin.ListAuditRecords(labels_pb2.ListAuditRecordsRequest(case_id=CASE), timeout=30).records
    outcomes = [(r.principal, r.outcome) for r in audit if r.method == "ReviseLabels"]
    assert ("dr.b", not_held) in outcomes and ("dr.a", not_held) in outcomes
