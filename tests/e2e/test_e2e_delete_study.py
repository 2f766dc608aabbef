"""DeleteStudy on a real local stack (every service, real Triton, dcmtk's storescu): two studies
with identical pixel data (so identical volumes, and masks) are sent and labelled; deleting
one as admin removes it from every service, its blob files disappear except those the other
study shares, its new instances are refused, and the deletion and hand-off RPCs refuse other
roles. The in-process variant with the stores: tests/ingest/test_ingest_delete_study.py."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

# the e2e pipeline test's helpers (pytest puts this folder on sys.path: tests/ has no __init__.py)
from test_e2e_pipeline import DEMO_CT, Bearer, _cstore, storescu, stubs, wait_case

from atlasflow.cli.demo_series import write_demo_series
from atlasflow.cli.local import LocalDeployment
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.server import error_info_of
from atlasflow.common.v1 import common_pb2
from atlasflow.ingest.identity import atlas_id
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    dep = LocalDeployment.create(
        tmp_path_factory.mktemp("state"),
        auto_ports=True,
        quiet_period_s=2.0,
        accepted_aets=("E2E", "E2EBAD"),
        # the sweep waits until released blobs are this old (default 300 s)
        extra_env={"ATLASFLOW_INGEST_DELETION_BLOB_GRACE_S": "1"},
    )
    dep.start()
    try:
        dep.wait_healthy(240)
        yield dep
    finally:
        dep.stop()


def as_role(dep: LocalDeployment, service: str, role: str | None):
    channel = dep.bare_channel(service)
    if role is not None:
        channel = grpc.intercept_channel(channel, Bearer(dep.mint(role, f"e2e-{role}")))
    return channel


def send(dep: LocalDeployment, tmp: Path, seed: str):
    files = write_demo_series(DEMO_CT, tmp / seed, seed_name=seed)
    result = storescu(files, dep.ports["dicom"])
    assert result.returncode == 0, result.stderr
    ingest = stubs(dep)[0]
    from pydicom import dcmread

    uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    case_id = atlas_id("case", uid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        series = [s for s in ingest.ListSeries(ingest_pb2.ListSeriesRequest()).series if s.case_id == case_id]
        if series:
            break
        time.sleep(0.5)
    version, item = wait_case(dep, case_id)
    return uid, case_id, files, version, item


def digests_of(dep: LocalDeployment, case_id: str, version, item) -> dict[str, set[str]]:
    ingest, seg, _labels, _ranking = stubs(dep)
    series = [s for s in ingest.ListSeries(ingest_pb2.ListSeriesRequest()).series if s.case_id == case_id][0]
    instances = {
        m.instance.digest
        for m in ingest.StreamSeriesInstances(
            ingest_pb2.StreamSeriesInstancesRequest(series_id=series.series_id, headers_only=True)
        )
        if m.last_chunk
    }
    job = seg.GetSegmentationJob(segmentation_pb2.GetSegmentationJobRequest(job_id=version.provenance.job_id)).job
    return {
        "instances": instances,
        "derived": {
            series.volume.digest,
            version.label_map.digest,
            version.ct.digest,
            job.result.label_map.digest,
            job.result.heatmap.digest,
            item.heatmap.digest,
        }
        - {""},
    }


def test_delete_study_removes_it_everywhere_but_shared_blobs(deployment, tmp_path):
    dep = deployment
    uid_a, case_a, files_a, version_a, item_a = send(dep, tmp_path, "delete-a")
    _uid_b, case_b, _files_b, version_b, item_b = send(dep, tmp_path, "delete-b")
    blobs_a, blobs_b = digests_of(dep, case_a, version_a, item_a), digests_of(dep, case_b, version_b, item_b)
    shared = (blobs_a["instances"] | blobs_a["derived"]) & (blobs_b["instances"] | blobs_b["derived"])
    assert version_a.ct.digest in shared  # identical pixel data: one volume blob for both studies
    store = LocalBlobStore(dep.blob_dir)
    assert all(store.exists(d) for d in blobs_a["instances"] | blobs_a["derived"])

    ingest = ingest_pb2_grpc.IngestServiceStub(as_role(dep, "ingest", "admin"))
    # refused: other roles, no token, no reason, a bad id
    for role, code in (
        ("annotator", "PERMISSION_DENIED"),
        ("connector", "PERMISSION_DENIED"),
        (None, "UNAUTHENTICATED"),
    ):
        other = ingest_pb2_grpc.IngestServiceStub(as_role(dep, "ingest", role))
        with pytest.raises(grpc.RpcError) as e:
            other.DeleteStudy(ingest_pb2.DeleteStudyRequest(study_instance_uid=uid_a, reason="x"))
        assert e.value.code().name == code, role
    for request, field in (
        (ingest_pb2.DeleteStudyRequest(study_instance_uid=uid_a), "reason"),
        (ingest_pb2.DeleteStudyRequest(study_instance_uid="../etc", reason="x"), "study_instance_uid"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            ingest.DeleteStudy(request)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info_of(e.value).metadata["field"] == field
    # the hand-offs accept only the service role
    for service, stub_cls, request in (
        ("segmentation", segmentation_pb2_grpc.SegmentationServiceStub, segmentation_pb2.PurgeStudyRequest),
        ("labels", labels_pb2_grpc.LabelServiceStub, labels_pb2.PurgeStudyRequest),
        ("ranking", ranking_pb2_grpc.RankingServiceStub, ranking_pb2.PurgeStudyRequest),
    ):
        for role, code in (("admin", "PERMISSION_DENIED"), (None, "UNAUTHENTICATED")):
            with pytest.raises(grpc.RpcError) as e:
                stub_cls(as_role(dep, service, role)).PurgeStudy(request(case_id=case_a))
            assert e.value.code().name == code, (service, role)

    deletion = ingest.DeleteStudy(
        ingest_pb2.DeleteStudyRequest(study_instance_uid=uid_a, reason="consent withdrawn (e2e)")
    ).deletion
    assert deletion.case_id == case_a and deletion.requested_by == "e2e-admin"
    again = ingest.DeleteStudy(ingest_pb2.DeleteStudyRequest(case_id=case_a, reason="again")).deletion
    assert again.deletion_id == deletion.deletion_id and again.reason == "consent withdrawn (e2e)"
    deadline = time.monotonic() + 240
    while deletion.state != common_pb2.OPERATION_STATE_SUCCEEDED:
        assert time.monotonic() < deadline, deletion
        time.sleep(1)
        deletion = ingest.GetDeletion(ingest_pb2.GetDeletionRequest(deletion_id=deletion.deletion_id)).deletion
    steps = {s.service: s for s in deletion.steps}
    assert steps["ingest"].counts["instances"] == len(files_a)
    assert steps["segmentation"].counts["jobs"] >= 1 and steps["labels"].counts["label_versions"] >= 1
    assert steps["ranking"].counts["worklist"] == 1

    # gone from every service
    admin_ingest, seg, labels, ranking = stubs(dep)
    assert case_a not in {s.case_id for s in admin_ingest.ListSeries(ingest_pb2.ListSeriesRequest()).series}
    with pytest.raises(grpc.RpcError) as e:
        seg.GetSegmentationJob(segmentation_pb2.GetSegmentationJobRequest(job_id=version_a.provenance.job_id))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert not labels.ListLabelVersions(labels_pb2.ListLabelVersionsRequest(case_id=case_a)).versions
    with pytest.raises(grpc.RpcError) as e:
        ranking.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id=case_a))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # the audit of the labels service keeps the study's records (and the purge itself)
    audit = labels.ListAuditRecords(labels_pb2.ListAuditRecordsRequest(case_id=case_a, page_size=100)).records
    assert "PurgeStudy" in {r.method for r in audit} and "CreateLabelVersion" in {r.method for r in audit}
    # blob files: the study's own are gone, those study B shares stay
    own = (blobs_a["instances"] | blobs_a["derived"]) - shared
    assert own and not [d for d in own if store.exists(d)]
    assert all(store.exists(d) for d in shared)
    # study B is untouched
    assert labels.ListLabelVersions(labels_pb2.ListLabelVersionsRequest(case_id=case_b)).versions
    assert ranking.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id=case_b)).item.case_id == case_b
    # the tombstone: the study's instances sent again are refused (0x0124 Refused: Not authorized)
    from pydicom import dcmread

    assert _cstore(dep.ports["dicom"], [dcmread(files_a[0])]) == [0x0124]
    # GetDeletion is admin only
    with pytest.raises(grpc.RpcError) as e:
        ingest_pb2_grpc.IngestServiceStub(as_role(dep, "ingest", "annotator")).GetDeletion(
            ingest_pb2.GetDeletionRequest(deletion_id=deletion.deletion_id)
        )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # the CLI deletes study B (by case id) and follows it to the end; the blobs the two studies
    # shared have no reference left and go too
    token_file = tmp_path / "admin.token"
    token_file.write_text(dep.mint("admin", "e2e-cli"))
    from atlasflow.cli.main import main as cli

    code = cli(
        ["delete-study", "--state-dir", str(dep.state_dir), "--token-file", str(token_file), case_b]
        + ["--reason", "end of the e2e test", "--wait", "--timeout", "240"]
    )
    assert code == 0
    assert not labels.ListLabelVersions(labels_pb2.ListLabelVersionsRequest(case_id=case_b)).versions
    assert not [d for d in shared | blobs_b["instances"] | blobs_b["derived"] if store.exists(d)]
