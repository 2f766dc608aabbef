"""DICOMweb on the gateway with a real DICOMweb client (dicomweb-client) against a stack as
`atlasflow up` starts it: search, retrieve (identical pixel data), STOW (parsed as a stream:
several instances, one over the gateway's MAX_INSTANCE_BYTES refused, the others stored), one
instance of a series retrieved (ingest logs no error), the
study's DICOM SEG (labels StreamLabelVersionSeg) as a SEG series, bearer auth and roles."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from tests.gateway.conftest import NAMES, http

from atlasflow.cli.local import LocalDeployment
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.organs import ORGANS
from atlasflow.common.v1 import common_pb2
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.testing import peers

N = 3
#: the gateway's per-instance STOW limit in this stack (a CT slice here is ~0.5 MiB)
MAX_INSTANCE_BYTES = 1 << 20
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    """The conftest stack, with a small STOW per-instance limit."""
    dep = LocalDeployment.create(
        tmp_path_factory.mktemp("gw"),
        auto_ports=True,
        quiet_period_s=1.0,
        extra_env={"ATLASFLOW_GATEWAY_MAX_INSTANCE_BYTES": str(MAX_INSTANCE_BYTES)},
    )
    dep.start(NAMES)
    try:
        dep.wait_healthy(180, NAMES)
        yield dep
    finally:
        dep.stop(names=NAMES)


def _as(stack: LocalDeployment, role: str, subject: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {stack.mint(role, subject)}"),)


def _client(stack: LocalDeployment, token: str) -> DICOMwebClient:
    return DICOMwebClient(f"{stack.gateway_url()}/dicomweb", session=http(stack, token))


@pytest.fixture(scope="module")
def sent(stack: LocalDeployment, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small CT series stored through STOW-RS by a connector."""
    files = peers.build_ct_series(tmp_path_factory.mktemp("ct"), N, seed="gateway-dicomweb")
    client = _client(stack, stack.mint("connector", "pacs-bridge"))
    result = client.store_instances([pydicom.dcmread(f) for f in files])
    assert len(result.ReferencedSOPSequence) == N
    assert "FailedSOPSequence" not in result
    return files


def test_search_finds_the_study_series_and_instances(stack: LocalDeployment, sent: list[Path]) -> None:
    first = pydicom.dcmread(sent[0])
    client = _client(stack, stack.mint("admin", "dr.admin"))
    studies = client.search_for_studies(search_filters={"StudyInstanceUID": first.StudyInstanceUID})
    assert len(studies) == 1
    study = pydicom.Dataset.from_json(studies[0])
    assert study.NumberOfStudyRelatedInstances == N
    assert client.search_for_studies(search_filters={"PatientID": "no-such-patient"}) == []
    series = client.search_for_series(first.StudyInstanceUID)
    assert [pydicom.Dataset.from_json(s).SeriesInstanceUID for s in series] == [first.SeriesInstanceUID]
    instances = client.search_for_instances(first.StudyInstanceUID, first.SeriesInstanceUID)
    uids = {pydicom.Dataset.from_json(i).SOPInstanceUID for i in instances}
    assert uids == {pydicom.dcmread(f).SOPInstanceUID for f in sent}


def test_retrieve_returns_the_sent_instances_with_identical_pixels(stack: LocalDeployment, sent: list[Path]) -> None:
    first = pydicom.dcmread(sent[0])
    client = _client(stack, stack.mint("admin", "dr.admin"))
    got = {ds.SOPInstanceUID: ds for ds in client.retrieve_series(first.StudyInstanceUID, first.SeriesInstanceUID)}
    assert len(got) == N
    for f in sent:
        src = pydicom.dcmread(f)
        assert np.array_equal(got[src.SOPInstanceUID].pixel_array, src.pixel_array)
    one = client.retrieve_instance(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)
    assert np.array_equal(one.pixel_array, first.pixel_array)
    meta = client.retrieve_series_metadata(first.StudyInstanceUID, first.SeriesInstanceUID)
    assert len(meta) == N
    frames = client.retrieve_instance_frames(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID, [1])
    assert frames[0] == first.PixelData


def test_stow_of_a_new_instance_becomes_searchable(stack: LocalDeployment, sent: list[Path], tmp_path: Path) -> None:
    new = peers.build_ct_series(tmp_path, 1, seed="gateway-stow-new")[0]
    ds = pydicom.dcmread(new)
    admin = _client(stack, stack.mint("admin", "dr.admin"))
    assert admin.search_for_instances(ds.StudyInstanceUID) == []
    result = admin.store_instances([ds])
    assert result.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    found = admin.search_for_instances(ds.StudyInstanceUID)
    assert [pydicom.Dataset.from_json(i).SOPInstanceUID for i in found] == [ds.SOPInstanceUID]


@pytest.mark.parametrize("path", ["/studies", "/series", "/instances"])
def test_no_token_is_401_and_a_reviewer_may_not_read_dicom(stack: LocalDeployment, path: str) -> None:
    url = f"{stack.gateway_url()}/dicomweb{path}"
    assert http(stack).get(url).status_code == 401
    assert http(stack, "not-a-jwt").get(url).status_code == 401
    refused = http(stack, stack.mint("reviewer", "dr.demo")).get(url)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["reason"] == "ROLE_NOT_ALLOWED"


def test_stow_needs_a_sending_role(stack: LocalDeployment, tmp_path: Path) -> None:
    new = peers.build_ct_series(tmp_path, 1, seed="gateway-stow-refused")[0]
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + new.read_bytes() + b"\r\n--b--\r\n"
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    url = f"{stack.gateway_url()}/dicomweb/studies"
    assert http(stack).post(url, data=body, headers=headers).status_code == 401
    assert http(stack, stack.mint("reviewer", "dr.demo")).post(url, data=body, headers=headers).status_code == 403


def _multipart(parts: list[tuple[str, bytes]], boundary: str) -> Iterator[bytes]:
    """A STOW-RS body in 64 KiB pieces (sent chunked: the gateway cannot see its length)."""
    for ctype, content in parts:
        data = f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + content + b"\r\n"
        for i in range(0, len(data), 64 * 1024):
            yield data[i : i + 64 * 1024]
    yield f"--{boundary}--\r\n".encode()


def test_stow_streams_several_instances_and_refuses_one_too_large(stack: LocalDeployment, tmp_path: Path) -> None:
    files = peers.build_ct_series(tmp_path, 4, seed="gateway-stow-stream")
    big = pydicom.dcmread(files[0])
    big.SOPInstanceUID = "2.25." + str(uuid.uuid4().int)
    big.add_new(0x00091010, "LO", "atlasflow test")  # private creator, then a large private value
    big.add_new(0x00091011, "OB", b"\0" * (MAX_INSTANCE_BYTES + 1000))
    big_path = tmp_path / "big.dcm"
    big.save_as(big_path, enforce_file_format=True)
    parts = [("application/dicom", f.read_bytes()) for f in files[:2]]
    parts += [("application/dicom", big_path.read_bytes()), ("text/plain", b"not an instance")]
    parts += [("application/dicom", f.read_bytes()) for f in files[2:]]
    boundary = uuid.uuid4().hex
    r = http(stack, stack.mint("connector", "pacs-bridge")).post(
        f"{stack.gateway_url()}/dicomweb/studies",
        data=_multipart(parts, boundary),
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
    )
    assert r.status_code == 202, r.text
    doc = pydicom.Dataset.from_json(r.json())
    stored = [i.ReferencedSOPInstanceUID for i in doc.ReferencedSOPSequence]
    assert stored == [pydicom.dcmread(f).SOPInstanceUID for f in files]
    reasons = {str(i.get("ReferencedSOPInstanceUID", "")): i.FailureReason for i in doc.FailedSOPSequence}
    assert reasons == {big.SOPInstanceUID: 0xA700, "": 0xC000}
    first = pydicom.dcmread(files[0])
    admin = _client(stack, stack.mint("admin", "dr.admin"))
    got = {ds.SOPInstanceUID: ds for ds in admin.retrieve_series(first.StudyInstanceUID, first.SeriesInstanceUID)}
    assert set(got) == set(stored)
    for f in files:
        src = pydicom.dcmread(f)
        assert np.array_equal(got[src.SOPInstanceUID].pixel_array, src.pixel_array)


def _log_errors(path: Path, start: int) -> list[str]:
    lines = path.read_bytes()[start:].decode(errors="replace").splitlines()
    return [line for line in lines if "rpc crashed" in line or '"level": "ERROR"' in line]


def test_one_instance_of_a_series_is_served_and_ingest_logs_no_error(stack: LocalDeployment, sent: list[Path]) -> None:
    log = stack.state_dir / "logs" / "ingest.log"
    start = log.stat().st_size
    client = _client(stack, stack.mint("admin", "dr.admin"))
    for f in (sent[0], sent[-1]):
        ds = pydicom.dcmread(f)
        one = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert one.SOPInstanceUID == ds.SOPInstanceUID and np.array_equal(one.pixel_array, ds.pixel_array)
    time.sleep(1.0)  # the cancelled streams' ends reach ingest's log
    assert _log_errors(log, start) == []


@pytest.fixture(scope="module")
def labelled(stack: LocalDeployment, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], str]:
    """A CT series stored by STOW, assembled by ingest, and a label version of its case made by an
    admin (liver on the first two slices, spleen on the third) on the assembled CT's grid."""
    files = peers.build_ct_series(tmp_path_factory.mktemp("segct"), 3, seed="gateway-seg")
    _client(stack, stack.mint("connector", "pacs-bridge")).store_instances([pydicom.dcmread(f) for f in files])
    series_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    deadline = time.monotonic() + 120
    series = None
    with stack.bare_channel("ingest") as ch:
        ingest = ingest_pb2_grpc.IngestServiceStub(ch)
        while series is None and time.monotonic() < deadline:
            for s in ingest.ListSeries(
                ingest_pb2.ListSeriesRequest(page_size=1000), metadata=_as(stack, "admin", "t"), timeout=30
            ).series:
                if s.volume.digest and s.instance_count == 3:
                    msgs = list(
                        ingest.StreamSeriesInstances(
                            ingest_pb2.StreamSeriesInstancesRequest(series_id=s.series_id, headers_only=True),
                            metadata=_as(stack, "admin", "t"),
                            timeout=30,
                        )
                    )
                    head = b"".join(m.chunk for m in msgs if m.instance_index == 0)
                    if pydicom.dcmread(io.BytesIO(head), force=True).SeriesInstanceUID == series_uid:
                        series = s
            time.sleep(0.5)
    assert series is not None, "ingest did not assemble the series"
    blobs = LocalBlobStore(stack.blob_dir)
    ct, affine = from_nifti_bytes(blobs.get(series.volume.digest))
    labels = np.zeros(np.asarray(ct).shape, np.uint8)
    labels[100:200, 100:200, 0:2] = 5  # liver
    labels[300:350, 300:350, 2] = 8  # spleen
    with stack.bare_channel("labels") as ch:
        labels_pb2_grpc.LabelServiceStub(ch).CreateLabelVersion(
            labels_pb2.CreateLabelVersionRequest(
                case_id=series.case_id,
                label_map=common_pb2.BlobRef(digest=blobs.put(to_nifti_bytes(labels, affine)).digest),
                ct=common_pb2.BlobRef(digest=series.volume.digest),
                provenance=labels_pb2.Provenance(source=labels_pb2.LABEL_SOURCE_AI, model_version="test-v1"),
                request_id=uuid.uuid4().hex,
            ),
            metadata=_as(stack, "admin", "admin-writer"),
            timeout=30,
        )
    return files, series.case_id


def test_the_study_lists_and_serves_its_dicom_seg(stack: LocalDeployment, labelled: tuple[list[Path], str]) -> None:
    files, _case = labelled
    ct = pydicom.dcmread(files[0])
    client = _client(stack, stack.mint("admin", "dr.admin"))
    series = [pydicom.Dataset.from_json(s) for s in client.search_for_series(ct.StudyInstanceUID)]
    by_modality = {s.Modality: s for s in series}
    assert set(by_modality) == {"CT", "SEG"}
    seg_series = by_modality["SEG"].SeriesInstanceUID
    assert by_modality["SEG"].NumberOfSeriesRelatedInstances == 1
    study = pydicom.Dataset.from_json(
        client.search_for_studies(search_filters={"StudyInstanceUID": ct.StudyInstanceUID})[0]
    )
    assert list(study.ModalitiesInStudy) == ["CT", "SEG"] and study.NumberOfStudyRelatedSeries == 2
    only_ct = client.search_for_series(ct.StudyInstanceUID, search_filters={"Modality": "CT"})
    assert [pydicom.Dataset.from_json(s).Modality for s in only_ct] == ["CT"]
    # WADO-RS: the SEG series, valid for highdicom, referencing the CT series, organs as segments
    (ds,) = client.retrieve_series(ct.StudyInstanceUID, seg_series)
    assert ds.SOPClassUID == SEG_STORAGE and ds.StudyInstanceUID == ct.StudyInstanceUID
    seg = hd.seg.Segmentation.from_dataset(ds)
    assert [r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence] == [ct.SeriesInstanceUID]
    refs = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert sorted(str(d.SegmentLabel) for d in seg.SegmentSequence) == sorted([ORGANS[5], ORGANS[8]])
    liver = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ct.SOPInstanceUID], segment_numbers=[1], skip_overlap_checks=True
    )
    assert liver.sum() > 0
    one = client.retrieve_instance(ct.StudyInstanceUID, seg_series, ds.SOPInstanceUID)
    assert one.SOPInstanceUID == ds.SOPInstanceUID
    meta = client.retrieve_series_metadata(ct.StudyInstanceUID, seg_series)
    assert [m["00080060"]["Value"] for m in meta] == [["SEG"]]
    # the whole study: the CT instances and the SEG
    assert sorted(d.Modality for d in client.retrieve_study(ct.StudyInstanceUID)) == ["CT"] * 3 + ["SEG"]


def test_the_seg_rpc_is_refused_without_a_token_and_to_a_reviewer(
    stack: LocalDeployment, labelled: tuple[list[Path], str]
) -> None:
    _files, case = labelled
    request = labels_pb2.StreamLabelVersionSegRequest(case_id=case, headers_only=True)
    with stack.bare_channel("labels") as ch:
        stub = labels_pb2_grpc.LabelServiceStub(ch)
        for metadata, code in (
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer e30.e30.e30"),), grpc.StatusCode.UNAUTHENTICATED),
            (_as(stack, "reviewer", "dr.demo"), grpc.StatusCode.PERMISSION_DENIED),
            (_as(stack, "service", "svc:ingest"), grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.StreamLabelVersionSeg(request, metadata=metadata, timeout=30))
            assert err.value.code() == code
        msgs = list(stub.StreamLabelVersionSeg(request, metadata=_as(stack, "admin", "dr.admin"), timeout=60))
        assert msgs[0].version.case_id == case and msgs[-1].last_chunk
        with pytest.raises(grpc.RpcError) as err:
            list(
                stub.StreamLabelVersionSeg(
                    labels_pb2.StreamLabelVersionSegRequest(case_id=case, version_id="v"),
                    metadata=_as(stack, "admin", "dr.admin"),
                    timeout=30,
                )
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # through the gateway: a reviewer may not read DICOM (the SEG included)
    url = f"{stack.gateway_url()}/dicomweb/studies"
    assert http(stack, stack.mint("reviewer", "dr.demo")).get(url).status_code == 403
