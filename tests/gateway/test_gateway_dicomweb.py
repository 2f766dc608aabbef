"""DICOMweb on the gateway with a real DICOMweb client (dicomweb-client) against a stack as
`atlasflow up` starts it: search, retrieve (identical pixel data), STOW, bearer auth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from tests.gateway.conftest import http

from atlasflow.cli.local import LocalDeployment
from atlasflow.testing import peers

N = 3


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
