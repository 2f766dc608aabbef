"""The audit log (`atlasflow.common.audit`, `atlasflow.common.audit_server`): every RPC has an
audit decision; the log is append-only on SQLite and on a real PostgreSQL 15 and its hash chain
finds a row edited behind the triggers' back; refusal floods are aggregated; and on a stack
started the way `atlasflow up` starts it, reads, uploads and refusals are recorded with who,
what, when, where and outcome, exported as FHIR AuditEvent / ATNA JSON, listed by admins only,
and an audited call fails closed when its record cannot be written."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psycopg
import pytest

from atlasflow.cli.local import LocalDeployment
from atlasflow.common.audit import (
    ACTIONS,
    AUDITED,
    AUTH,
    PHI_READ,
    AuditLog,
    AuditQuery,
    AuditRecord,
    RefusalThrottle,
    export_lines,
)
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.nifti import to_nifti_bytes
from atlasflow.common.policy import POLICY
from atlasflow.common.server import error_info_of
from atlasflow.common.v1 import audit_pb2, audit_pb2_grpc, common_pb2
from atlasflow.ingest.client import resumable_requests, upload_id_of
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.testing.data import TEST_DATA

PG_BIN = Path("/usr/lib/postgresql/15/bin")
CT_FILE = TEST_DATA / "pydicom_ct_singles" / "pydicom" / "CT_small.dcm"
_INGEST = "/atlasflow.ingest.v1.IngestService"
_LABELS = "/atlasflow.labels.v1.LabelService"


def test_every_rpc_has_an_audit_decision() -> None:
    """A new RPC forces a decision: every policy RPC is in AUDITED (a category or None)."""
    missing = set(POLICY) - set(AUDITED)
    assert not missing, f"add these RPCs to atlasflow.common.audit.AUDITED: {sorted(missing)}"
    assert {a for a in AUDITED.values() if a is not None} <= set(ACTIONS)
    assert AUDITED[f"{_INGEST}/StreamSeriesInstances"] == PHI_READ


# --------------------------------------------------------------------------- append-only store


def _record(i: int, **kw: object) -> AuditRecord:
    fields: dict = dict(service="labels", action="label-read", method=f"{_LABELS}/GetLabelVersion", principal="dr")
    fields |= dict(outcome="OK", peer="ipv4:127.0.0.1:1", targets=(("case_id", f"c{i}"),))
    return AuditRecord(**(fields | kw))


def _exercise_append_only(audit: AuditLog, raw_update: object, errors: tuple[type[BaseException], ...]) -> None:
    stored = [audit.append(_record(i)) for i in range(3)]
    assert [r.seq for r in stored] == sorted(r.seq for r in stored)
    assert stored[1].prev_hash == stored[0].hash and audit.verify_chain() is None
    for sql in ("UPDATE audit_log SET principal = 'mallory'", "DELETE FROM audit_log"):
        with pytest.raises(errors, match="append-only"):
            raw_update(sql)  # type: ignore[operator]
    records, _ = audit.list(AuditQuery(principal="dr"))
    assert [r.record_id for r in records] == [r.record_id for r in reversed(stored)]


def test_sqlite_log_is_append_only_and_chained(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    audit = AuditLog(path)
    raw = sqlite3.connect(path, isolation_level=None)
    _exercise_append_only(audit, raw.execute, (sqlite3.IntegrityError,))
    # someone with file access drops the triggers and edits a row: the chain shows where
    raw.execute("DROP TRIGGER audit_log_no_update")
    raw.execute("UPDATE audit_log SET principal = 'mallory' WHERE seq = 2")
    assert audit.verify_chain() == 2
    audit.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(*args: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL 15 cluster (as tests/labels/conftest.py starts one) and a database."""
    root = Path(tempfile.mkdtemp(prefix="atlasflow-pg-audit-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    run = dict(check=True, capture_output=True, env=env, cwd=root)
    subprocess.run(_as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"), **run)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c shared_buffers=16MB"
    subprocess.run(
        _as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "-t", "60", "start"
        ),
        **run,
    )
    try:
        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE audit_test")
        yield admin.rsplit("/", 1)[0] + "/audit_test"
    finally:
        subprocess.run(_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"), **run)
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_log_is_append_only_and_chained(pg_url: str) -> None:
    audit = AuditLog(pg_url)
    AuditLog(pg_url).close()  # a second replica starting on the same database: no error
    with psycopg.connect(pg_url, autocommit=True) as raw:
        _exercise_append_only(audit, raw.execute, (psycopg.errors.RaiseException,))
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            raw.execute("TRUNCATE audit_log")
        raw.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
        first = raw.execute("SELECT MIN(seq) FROM audit_log").fetchone()[0]
        raw.execute("DELETE FROM audit_log WHERE seq = %s", (first + 1,))
    assert audit.verify_chain() == first + 2  # the row after the removed one no longer links
    audit.close()


def test_a_refusal_flood_is_aggregated_per_peer_and_minute() -> None:
    throttle = RefusalThrottle(limit=3)
    refusal = _record(0, action=AUTH, outcome="UNAUTHENTICATED", reason="MISSING_TOKEN", principal="")
    t0 = 600.0  # start of a minute
    written = [r for _ in range(10) for r in throttle.admit(refusal, now=t0 + 1)]
    assert len(written) == 3  # the limit, one by one
    other = _record(0, action=AUTH, outcome="UNAUTHENTICATED", peer="ipv4:10.0.0.9:5")
    assert throttle.admit(other, now=t0 + 2) == [other]  # another peer has its own budget
    later = throttle.admit(refusal, now=t0 + 61)  # next minute: the aggregate, then the refusal
    aggregates = [r for r in later if r.suppressed]
    assert [r.suppressed for r in aggregates] == [7] and aggregates[0].reason == "REFUSALS_AGGREGATED"
    assert refusal in later
    assert throttle.flush() == []  # nothing suppressed in the new minute


def test_exports_are_fhir_and_atna_json(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "a.sqlite3")
    audit.append(_record(1))
    audit.append(_record(2, action=AUTH, outcome="PERMISSION_DENIED", reason="ROLE_NOT_ALLOWED", roles=("reviewer",)))
    records = list(audit.scan(AuditQuery()))
    lines = "".join(export_lines(records, "fhir-ndjson")).splitlines()
    events = [json.loads(line) for line in lines]
    _check_fhir(events)
    assert [e["type"]["code"] for e in events] == ["110103", "110114"]
    assert events[1]["outcome"] == "4" and "ROLE_NOT_ALLOWED" in events[1]["outcomeDesc"]
    bundle = json.loads("".join(export_lines(records, "fhir-bundle")))
    assert bundle["resourceType"] == "Bundle" and len(bundle["entry"]) == 2
    atna = json.loads("".join(export_lines(records, "atna-json")))
    assert atna[1]["EventIdentification"]["EventID"]["csd-code"] == "110114"
    assert atna[0]["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == "c1"
    audit.close()


def _check_fhir(events: list[dict]) -> None:
    """Structural checks of FHIR R4 AuditEvent resources (the required elements and codes)."""
    assert events
    for e in events:
        assert e["resourceType"] == "AuditEvent"
        assert e["type"]["system"] == "http://dicom.nema.org/resources/ontology/DCM"
        assert e["type"]["code"].startswith("1101") and len(e["type"]["code"]) == 6
        assert e["action"] in {"C", "R", "U", "D", "E"}
        assert e["outcome"] in {"0", "4", "8", "12"}
        assert e["recorded"].endswith("Z")
        assert e["agent"] and e["agent"][0]["requestor"] is True and "who" in e["agent"][0]
        assert e["source"]["observer"]["display"].startswith("atlasflow-")
        assert e["entity"] and all("what" in x for x in e["entity"])
        assert all(s.get("system") and s.get("code") for s in e["subtype"])


# ------------------------------------------------------------------------------------- on a stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    """Labels, ranking and ingest as `atlasflow up` starts them (no call here needs the others)."""
    dep = LocalDeployment.create(tmp_path_factory.mktemp("stack"), auto_ports=True)
    names = ["labels", "ranking", "ingest"]
    dep.start(names)
    try:
        dep.wait_healthy(180, names)
        yield dep
    finally:
        dep.stop(names=names)


def _channel(stack: LocalDeployment, service: str) -> grpc.Channel:
    """TLS with the command line's client certificate (mTLS), no token (each call sets one)."""
    return stack.bare_channel(service)


def _as(stack: LocalDeployment, role: str, subject: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {stack.mint(role, subject)}"),)


def _records(stack: LocalDeployment, service: str, **filter_: str) -> list[audit_pb2.AuditRecord]:
    with _channel(stack, service) as ch:
        stub = audit_pb2_grpc.AuditServiceStub(ch)
        request = audit_pb2.ListAuditRecordsRequest(filter=audit_pb2.AuditFilter(**filter_), page_size=1000)
        return list(stub.ListAuditRecords(request, metadata=_as(stack, "admin", "auditor"), timeout=30).records)


def _label_version(stack: LocalDeployment) -> tuple[str, str]:
    """(case id, version id) of a label version the admin created on the stack."""
    blobs = LocalBlobStore(stack.blob_dir)
    affine, shape = np.diag([2.0, 2.0, 3.0, 1.0]), (16, 12, 6)
    ct = np.full(shape, -100, np.int16)
    labels = np.zeros(shape, np.uint8)
    labels[2:8, 2:8, 1:4] = 5
    case = f"case-{uuid.uuid4().hex[:8]}"
    with _channel(stack, "labels") as ch:
        version = (
            labels_pb2_grpc.LabelServiceStub(ch)
            .CreateLabelVersion(
                labels_pb2.CreateLabelVersionRequest(
                    case_id=case,
                    label_map=common_pb2.BlobRef(digest=blobs.put(to_nifti_bytes(labels, affine)).digest),
                    ct=common_pb2.BlobRef(digest=blobs.put(to_nifti_bytes(ct, affine)).digest),
                    provenance=labels_pb2.Provenance(source=labels_pb2.LABEL_SOURCE_AI),
                    request_id=uuid.uuid4().hex,
                ),
                metadata=_as(stack, "admin", "admin-writer"),
                timeout=30,
            )
            .version
        )
    return case, version.version_id


def _uploaded_series(stack: LocalDeployment) -> tuple[str, str]:
    """(series id, upload id) of a real CT instance uploaded by an admin."""
    data = CT_FILE.read_bytes()
    upload_id = upload_id_of(data)
    with _channel(stack, "ingest") as ch:
        answer = ingest_pb2_grpc.IngestServiceStub(ch).UploadInstances(
            resumable_requests(CT_FILE.name, data, upload_id), metadata=_as(stack, "admin", "uploader"), timeout=60
        )
    return answer.receipts[0].series_id, upload_id


def _peer_ok(peer: str) -> bool:
    return peer.startswith(("ipv4:127.0.0.1:", "ipv6:[::1]:"))


def test_a_label_read_and_a_phi_read_are_recorded(stack: LocalDeployment) -> None:
    case, version = _label_version(stack)
    with _channel(stack, "labels") as ch:
        labels_pb2_grpc.LabelServiceStub(ch).GetLabelVersion(
            labels_pb2.GetLabelVersionRequest(version_id=version),
            metadata=_as(stack, "reviewer", "dr.house"),
            timeout=30,
        )
    (read,) = _records(stack, "labels", principal="dr.house")
    assert (read.method, read.action, read.outcome) == (f"{_LABELS}/GetLabelVersion", "label-read", "OK")
    assert list(read.roles) == ["reviewer"] and _peer_ok(read.peer) and read.service == "labels"
    assert "cli" in read.client_identity  # the TLS client certificate (the stack is mTLS)
    assert [(t.kind, t.value) for t in read.targets] == [("version_id", version)]
    assert read.time.seconds > 0 and len(read.hash) == 64
    (write,) = _records(stack, "labels", principal="admin-writer")
    assert (write.action, write.outcome) == ("label-write", "OK") and ("case_id", case) in {
        (t.kind, t.value) for t in write.targets
    }

    series_id, upload_id = _uploaded_series(stack)
    with _channel(stack, "ingest") as ch:
        stream = ingest_pb2_grpc.IngestServiceStub(ch).StreamSeriesInstances(
            ingest_pb2.StreamSeriesInstancesRequest(series_id=series_id, headers_only=True),
            metadata=_as(stack, "admin", "dr.admin"),
            timeout=60,
        )
        assert len(list(stream)) >= 1
    (phi,) = _records(stack, "ingest", principal="dr.admin")
    assert (phi.method, phi.action, phi.outcome) == (f"{_INGEST}/StreamSeriesInstances", "phi-read", "OK")
    assert [(t.kind, t.value) for t in phi.targets] == [("series_id", series_id)]
    assert list(phi.roles) == ["admin"] and _peer_ok(phi.peer)
    (upload,) = _records(stack, "ingest", principal="uploader")
    assert (upload.action, upload.outcome) == ("import", "OK")
    assert [(t.kind, t.value) for t in upload.targets] == [("upload_id", upload_id)]  # seen in the stream


def test_refusals_are_recorded_and_a_flood_is_rate_limited(stack: LocalDeployment) -> None:
    flood = 45
    with _channel(stack, "ranking") as ch:
        stub = ranking_pb2_grpc.RankingServiceStub(ch)
        for _ in range(flood):
            with pytest.raises(grpc.RpcError) as err:
                stub.ListWorklist(ranking_pb2.ListWorklistRequest(), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.StartRound(ranking_pb2.StartRoundRequest(), metadata=_as(stack, "reviewer", "dr.nosy"), timeout=30)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    refused = _records(stack, "ranking", action="auth", outcome="UNAUTHENTICATED")
    missing = [r for r in refused if r.reason == "MISSING_TOKEN"]
    assert missing and all(r.principal == "" and _peer_ok(r.peer) for r in missing)
    assert all(r.method == "/atlasflow.ranking.v1.RankingService/ListWorklist" for r in missing)
    # 20 per peer and minute; a flood that straddles a minute gets two budgets and one aggregate
    assert len(missing) <= 2 * 20 + 1 < flood
    (denied,) = _records(stack, "ranking", action="auth", principal="dr.nosy")
    assert (denied.outcome, denied.reason, list(denied.roles)) == (
        "PERMISSION_DENIED",
        "ROLE_NOT_ALLOWED",
        ["reviewer"],
    )


def test_the_stack_exports_fhir_audit_events(stack: LocalDeployment) -> None:
    with _channel(stack, "labels") as ch:
        stub = audit_pb2_grpc.AuditServiceStub(ch)
        chunks = stub.ExportAuditRecords(
            audit_pb2.ExportAuditRecordsRequest(format=audit_pb2.AUDIT_FORMAT_FHIR_NDJSON),
            metadata=_as(stack, "admin", "auditor"),
            timeout=30,
        )
        events = [json.loads(line) for line in b"".join(c.data for c in chunks).decode().splitlines()]
        bundle = json.loads(
            b"".join(
                c.data
                for c in stub.ExportAuditRecords(
                    audit_pb2.ExportAuditRecordsRequest(format=audit_pb2.AUDIT_FORMAT_FHIR_BUNDLE),
                    metadata=_as(stack, "admin", "auditor"),
                    timeout=30,
                )
            )
        )
    _check_fhir(events)
    assert bundle["resourceType"] == "Bundle" and len(bundle["entry"]) >= len(events)
    reads = [e for e in events if e["agent"][0]["who"]["identifier"]["value"] == "dr.house"]
    assert reads and reads[0]["type"]["code"] == "110103" and reads[0]["outcome"] == "0"
    assert reads[0]["agent"][0]["network"]["type"] == "2"


def test_only_admins_read_the_audit(stack: LocalDeployment) -> None:
    request = audit_pb2.ListAuditRecordsRequest()
    for service in ("ingest", "labels", "ranking"):
        with _channel(stack, service) as ch:
            stub = audit_pb2_grpc.AuditServiceStub(ch)
            for metadata, code in (
                ((), grpc.StatusCode.UNAUTHENTICATED),
                (_as(stack, "reviewer", "dr.nosy"), grpc.StatusCode.PERMISSION_DENIED),
                (_as(stack, "service", "svc"), grpc.StatusCode.PERMISSION_DENIED),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    stub.ListAuditRecords(request, metadata=metadata, timeout=30)
                assert err.value.code() == code, service
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.ExportAuditRecords(audit_pb2.ExportAuditRecordsRequest(), metadata=metadata, timeout=30))
                assert err.value.code() == code, service


def test_the_audit_command_prints_fhir_for_an_admin_only(
    stack: LocalDeployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from atlasflow.cli.exitcodes import ExitCode
    from atlasflow.cli.main import main

    tokens = {}
    for role in ("admin", "reviewer"):
        tokens[role] = tmp_path / f"{role}.token"
        tokens[role].write_text(stack.mint(role, f"cli-{role}"))
    base = ["audit", "--state-dir", str(stack.state_dir), "--service", "labels", "--since", "1h"]
    capsys.readouterr()
    assert main([*base, "--token-file", str(tokens["admin"]), "--format", "fhir"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    _check_fhir(events)
    assert any(e["agent"][0]["who"]["identifier"]["value"] == "dr.house" for e in events)
    assert main([*base, "--token-file", str(tokens["reviewer"]), "--format", "json"]) == ExitCode.PERMISSION


def test_an_audited_call_fails_closed_when_its_record_cannot_be_written(stack: LocalDeployment) -> None:
    """Last test of the module: it breaks the labels and ingest logs (their table dropped)."""
    case, version = _label_version(stack)
    series_id, _ = _uploaded_series(stack)
    for service in ("labels", "ingest"):
        with sqlite3.connect(stack.state_dir / "data" / service / "audit.sqlite3", isolation_level=None) as raw:
            raw.execute("DROP TABLE audit_log")
    with _channel(stack, "labels") as ch, pytest.raises(grpc.RpcError) as err:
        labels_pb2_grpc.LabelServiceStub(ch).GetLabelVersion(
            labels_pb2.GetLabelVersionRequest(version_id=version),
            metadata=_as(stack, "reviewer", "dr.house"),
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info_of(err.value).reason == "AUDIT_UNAVAILABLE"
    received = []
    with _channel(stack, "ingest") as ch, pytest.raises(grpc.RpcError) as err:
        for message in ingest_pb2_grpc.IngestServiceStub(ch).StreamSeriesInstances(
            ingest_pb2.StreamSeriesInstancesRequest(series_id=series_id),
            metadata=_as(stack, "admin", "dr.admin"),
            timeout=60,
        ):
            received.append(message)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and received == []  # no PHI left
    assert error_info_of(err.value).reason == "AUDIT_UNAVAILABLE"
