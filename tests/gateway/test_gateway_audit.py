"""Audit at the web gateway, on a stack as `atlasflow up` starts it: a DICOMweb WADO retrieve is
recorded by ingest (StreamSeriesInstances, `phi-read`) with the user's subject (the gateway calls
as the user); the gateway's own log (gateway/audit.py) records logins (success with the user,
failure with the name tried and the client address), CT and label downloads with the case id,
and 401s; `GET /api/v1/audit` serves it to admins only (401 without or with a wrong token, 403
for a reviewer) as JSON or FHIR AuditEvents."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from tests.gateway.conftest import http

from atlasflow.cli.local import LocalDeployment
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.common.users import PASSWORDS_FILE
from atlasflow.common.v1 import audit_pb2, audit_pb2_grpc, common_pb2
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.testing import peers


def _as(stack: LocalDeployment, role: str, subject: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {stack.mint(role, subject)}"),)


def _passwords(stack: LocalDeployment) -> dict[str, str]:
    lines = (stack.auth_dir / PASSWORDS_FILE).read_text().splitlines()
    return {u: p for u, p, _roles in (line.split("\t") for line in lines if not line.startswith("#"))}


def _gateway_records(stack: LocalDeployment, **params: str) -> list[dict]:
    r = http(stack, stack.mint("admin", "auditor")).get(
        f"{stack.gateway_url()}/api/v1/audit", params={"page_size": "1000", **params}
    )
    assert r.status_code == 200, r.text
    return r.json()["records"]


def test_a_wado_retrieve_is_audited_by_ingest_with_the_users_subject(
    stack: LocalDeployment, tmp_path_factory: pytest.TempPathFactory
) -> None:
    files = peers.build_ct_series(tmp_path_factory.mktemp("ct"), 2, seed="gateway-audit")
    session = http(stack, stack.mint("connector", "pacs-bridge"))
    DICOMwebClient(f"{stack.gateway_url()}/dicomweb", session=session).store_instances(
        [pydicom.dcmread(f) for f in files]
    )
    first = pydicom.dcmread(files[0])
    reader = DICOMwebClient(f"{stack.gateway_url()}/dicomweb", session=http(stack, stack.mint("admin", "dr.wado")))
    assert len(reader.retrieve_series(first.StudyInstanceUID, first.SeriesInstanceUID)) == 2
    with stack.bare_channel("ingest") as ch:
        records = (
            audit_pb2_grpc.AuditServiceStub(ch)
            .ListAuditRecords(
                audit_pb2.ListAuditRecordsRequest(filter=audit_pb2.AuditFilter(principal="dr.wado"), page_size=100),
                metadata=_as(stack, "admin", "auditor"),
                timeout=30,
            )
            .records
        )
    streams = [r for r in records if r.method.endswith("/StreamSeriesInstances")]
    assert streams and all(r.action == "phi-read" for r in streams)
    # the series is read to its end (OK); finding the study's series reads each one's first
    # header and cancels the rest of its stream (CANCELLED, recorded all the same)
    outcomes = [r.outcome for r in streams]
    assert "OK" in outcomes and set(outcomes) <= {"OK", "CANCELLED"}, outcomes
    assert list(streams[0].roles) == ["admin"]


def test_logins_are_recorded_with_the_user_and_the_client_address(stack: LocalDeployment) -> None:
    url = stack.gateway_url()
    s = http(stack)
    assert s.post(f"{url}/login", json={"username": "dr.demo", "password": "wrong"}).status_code == 401
    ok = s.post(f"{url}/login", json={"username": "dr.demo", "password": _passwords(stack)["dr.demo"]})
    assert ok.status_code == 200, ok.text
    logins = [r for r in _gateway_records(stack, action="auth") if r["method"] == "POST /login"]
    good = [r for r in logins if r["outcome"] == "OK"]
    bad = [r for r in logins if r["reason"] == "LOGIN_FAILED"]
    assert good and good[-1]["principal"] == "dr.demo" and good[-1]["roles"] == ["reviewer"]
    assert bad and bad[-1]["outcome"] == "UNAUTHENTICATED" and ["username", "dr.demo"] in bad[-1]["targets"]
    assert all(r["peer"].startswith("ipv4:127.0.0.1:") and r["service"] == "gateway" for r in good + bad)


def test_downloads_are_recorded_with_the_case_id(stack: LocalDeployment) -> None:
    blobs = LocalBlobStore(stack.blob_dir)
    affine, shape = np.diag([2.0, 2.0, 3.0, 1.0]), (8, 8, 4)
    labels = np.zeros(shape, np.uint8)
    labels[2:5, 2:5, 1:3] = 5
    case = f"case-{uuid.uuid4().hex[:8]}"
    with stack.bare_channel("labels") as ch:
        labels_pb2_grpc.LabelServiceStub(ch).CreateLabelVersion(
            labels_pb2.CreateLabelVersionRequest(
                case_id=case,
                label_map=common_pb2.BlobRef(digest=blobs.put(to_nifti_bytes(labels, affine)).digest),
                ct=common_pb2.BlobRef(digest=blobs.put(to_nifti_bytes(np.zeros(shape, np.int16), affine)).digest),
                provenance=labels_pb2.Provenance(source=labels_pb2.LABEL_SOURCE_AI),
                request_id=uuid.uuid4().hex,
            ),
            metadata=_as(stack, "admin", "admin-writer"),
            timeout=30,
        )
    s = http(stack, stack.mint("reviewer", "dr.reader"))
    base = f"{stack.gateway_url()}/api/v1/cases/{case}"
    assert s.get(f"{base}/ct.nii.gz").status_code == 200
    assert s.get(f"{base}/labels.nii.gz").status_code == 200
    assert s.get(f"{base}/attention.nii.gz").status_code == 404  # no worklist item: recorded too
    mine = [r for r in _gateway_records(stack, principal="dr.reader") if ["case_id", case] in r["targets"]]
    got = {(r["method"].rsplit("/", 1)[-1], r["action"], r["outcome"]) for r in mine}
    assert ("ct.nii.gz", "pixel-read", "OK") in got
    assert ("labels.nii.gz", "label-read", "OK") in got
    assert any(m == "attention.nii.gz" and o != "OK" for m, _a, o in got), got


def test_only_admins_read_the_gateway_audit(stack: LocalDeployment) -> None:
    url = f"{stack.gateway_url()}/api/v1/audit"
    assert http(stack).get(url).status_code == 401
    wrong = http(stack, "e30.e30.e30").get(url)
    assert wrong.status_code == 401
    refused = http(stack, stack.mint("reviewer", "dr.curious")).get(url)
    assert refused.status_code == 403 and refused.json()["error"]["reason"] == "ROLE_NOT_ALLOWED"
    # the refusals are in the log, and reading it is too
    records = _gateway_records(stack)
    assert any(r["principal"] == "dr.curious" and r["reason"] == "ROLE_NOT_ALLOWED" for r in records)
    assert any(r["method"] == "GET /api/v1/audit" and r["outcome"] == "UNAUTHENTICATED" for r in records)
    assert any(r["action"] == "audit-read" and r["principal"] == "auditor" for r in records)
    fhir = http(stack, stack.mint("admin", "auditor")).get(url, params={"format": "fhir-ndjson", "action": "auth"})
    assert fhir.status_code == 200
    events = [json.loads(line) for line in fhir.text.splitlines()]
    assert events and all(e["resourceType"] == "AuditEvent" for e in events)
    bad = http(stack, stack.mint("admin", "auditor")).get(url, params={"action": "nonsense"})
    assert bad.status_code == 400 and bad.json()["error"]["reason"] == "INVALID_AUDIT_ACTION"
