"""The DICOM SCP's audit records (`atlasflow.ingest.scp_audit`), in-process, with dcmtk's
storescu and pynetdicom peers: a stored study leaves one `import` record naming the calling AE,
the peer, the study and series UIDs and the count; an unlisted calling AE leaves a rejection
record; a flood of rejected associations is aggregated like the gRPC refusals; on the DICOM
TLS listener the record carries the client certificate's subject; while the log cannot be read
associations are refused (fail closed); and `build_app` gives the SCP the service's own log
(the one AuditService serves)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from atlasflow.common.audit import IMPORT, AuditLog, AuditQuery, AuditRecord, RefusalThrottle
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.metrics import Metrics
from atlasflow.common.tls import LocalCA
from atlasflow.ingest.reception import Reception
from atlasflow.ingest.scp import ScpConfig, StoreScp
from atlasflow.ingest.scp_audit import METHOD, AssociationAudit, ScpAudit
from atlasflow.ingest.store import IngestStore
from atlasflow.testing import peers


def start_scp(root: Path, audit: ScpAudit, **config: Any) -> StoreScp:
    store = IngestStore(root / "data", LocalBlobStore(root / "blobs"), spool_segment_bytes=1 << 20, spool_spares=1)
    config = {"port": 0, "accepted_calling_aets": ("STORESCU",), **config}
    scp = StoreScp(ScpConfig(**config), Reception(store, Metrics("ingest")), audit=audit)
    scp.start()
    return scp


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return peers.build_ct_series(tmp_path_factory.mktemp("series"), 2, seed="scp-audit")


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StoreScp, AuditLog, ScpAudit]]:
    root = tmp_path_factory.mktemp("scp")
    log = AuditLog(root / "audit.sqlite3")
    audit = ScpAudit(log, throttle=RefusalThrottle(limit=2))
    scp = start_scp(root, audit)
    yield scp, log, audit
    scp.stop()
    log.close()


def records(log: AuditLog, predicate: Any, count: int = 1, timeout_s: float = 30) -> list[AuditRecord]:
    """The records matching ``predicate``, once there are ``count`` (written when the
    association's connection closes, on its own thread)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [r for r in log.scan(AuditQuery()) if predicate(r)]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_a_stored_study_leaves_one_import_record(
    audited: tuple[StoreScp, AuditLog, ScpAudit], series: list[Path]
) -> None:
    scp, log, _ = audited
    study_uid = str(pydicom.dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    series_uid = str(pydicom.dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID)
    r = peers.storescu(series, scp.port)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    (rec,) = records(log, lambda x: ("study_uid", study_uid) in x.targets)
    targets = dict(rec.targets)
    assert (rec.action, rec.method, rec.service) == (IMPORT, METHOD, "ingest")
    assert (rec.outcome, rec.reason, rec.principal) == ("OK", "", "aet:STORESCU")
    assert targets["calling_ae"] == "STORESCU" and targets["called_ae"] == "ATLASFLOW"
    assert targets["instances_stored"] == "2" and "instances_refused" not in targets
    assert targets["series_uid"] == series_uid and targets["case_id"] and targets["series_id"]
    assert rec.peer.startswith("ipv4:127.0.0.1:") and rec.client_identity == ""
    assert log.verify_chain() is None


def test_an_unlisted_calling_ae_leaves_a_rejection_record(
    audited: tuple[StoreScp, AuditLog, ScpAudit], series: list[Path]
) -> None:
    scp, log, _ = audited
    r = peers.storescu(series[:1], scp.port, aet="INTRUDER", timeout_s=60)
    assert r.returncode != 0 and peers.acknowledged_files(r.stdout + r.stderr) == []
    (rec,) = records(log, lambda x: ("calling_ae", "INTRUDER") in x.targets)
    assert (rec.action, rec.outcome, rec.reason, rec.cause) == (
        IMPORT,
        "PERMISSION_DENIED",
        "CALLING_AE_NOT_ALLOWED",
        "calling_ae",
    )
    assert rec.principal == ""  # the title is the caller's claim, not an admitted identity
    assert dict(rec.targets)["instances_stored"] == "0"


def test_a_flood_of_rejected_associations_is_aggregated(
    audited: tuple[StoreScp, AuditLog, ScpAudit], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Throttle limit 2 per peer and minute here: 6 rejected associations from one address
    (each with another calling AE title) are at most 2 records per minute one by one, and the
    rest one aggregate record each minute, written at the latest when the SCP closes."""
    scp, log, audit = audited
    ended: list[str] = []
    recorded = audit.ended

    def counted(association: AssociationAudit) -> None:
        recorded(association)
        ended.append(association.called_ae)

    monkeypatch.setattr(audit, "ended", counted)
    newest = log.list(AuditQuery(), 1)[0]
    start = newest[0].seq if newest else 0
    ae = AE()
    ae.add_requested_context(Verification)
    ae.acse_timeout = 30
    for i in range(6):
        assoc = ae.associate("127.0.0.1", scp.port, ae_title=f"FLOOD{i}", max_pdu=16384)
        assert assoc.is_rejected
    # the connections' close handlers record them (their threads; a loaded machine took > 1 s)
    deadline = time.monotonic() + 30
    while len(ended) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    audit.close()  # the pending aggregate (as when the service stops)
    flood = [r for r in log.scan(AuditQuery()) if r.seq > start]
    single = [r for r in flood if r.reason == "CALLING_AE_NOT_ALLOWED"]
    aggregated = [r for r in flood if r.reason == "REFUSALS_AGGREGATED"]
    assert aggregated, flood
    assert len(single) + sum(r.suppressed for r in aggregated) == 6
    assert len(single) <= 4  # 2 per minute; at most two minutes
    assert all(r.action == IMPORT and r.peer.startswith("ipv4:127.0.0.1") for r in flood)


def test_tls_records_the_client_certificate_subject(tmp_path: Path, series: list[Path]) -> None:
    ca = LocalCA.create_or_load(tmp_path / "pki")
    server = ca.issue("scp")
    client = ca.issue("modality", server=False)
    log = AuditLog(tmp_path / "audit.sqlite3")
    scp = start_scp(
        tmp_path,
        ScpAudit(log),
        plaintext=False,
        tls_port=0,
        tls_cert_file=str(server.cert_file),
        tls_key_file=str(server.key_file),
        tls_ca_file=str(ca.ca_file),
        acse_timeout_s=30,
    )
    try:
        tls = ["+tls", str(client.key_file), str(client.cert_file), "+cf", str(ca.ca_file)]
        r = peers.storescu(series, scp.tls_port, extra=tls)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        (rec,) = records(log, lambda x: x.outcome == "OK")
        assert rec.client_identity == "CN=atlasflow-modality"
        assert dict(rec.targets)["instances_stored"] == "2"
    finally:
        scp.stop()
        log.close()


def test_associations_are_refused_while_the_log_cannot_be_read(tmp_path: Path, series: list[Path]) -> None:
    log = AuditLog(tmp_path / "audit.sqlite3")
    audit = ScpAudit(log)
    scp = start_scp(tmp_path, audit)
    try:
        audit.writable = lambda: False  # type: ignore[method-assign]  # an audit outage, for this test
        r = peers.storescu(series[:1], scp.port, timeout_s=60)
        assert r.returncode != 0 and peers.acknowledged_files(r.stdout + r.stderr) == []
        (rec,) = records(log, lambda x: x.reason == "AUDIT_UNAVAILABLE")
        assert (rec.outcome, rec.cause) == ("UNAVAILABLE", "audit_unavailable")
    finally:
        scp.stop()
        log.close()


def test_the_service_gives_the_scp_its_own_audit_log(tmp_path: Path, series: list[Path]) -> None:
    """`build_app`: the SCP writes into the log the service's AuditService serves
    (`<data_dir>/audit.sqlite3`), and the stop writes the pending aggregates before it closes."""
    from atlasflow.common.audit_server import audit_location
    from atlasflow.ingest.app import build_app
    from atlasflow.ingest.settings import IngestSettings

    settings = IngestSettings(
        data_dir=str(tmp_path / "data"),
        blob_dir=str(tmp_path / "blobs"),
        grpc_port=0,
        dicom_port=0,
        accepted_calling_aets=("STORESCU",),
        auth_disabled=True,
    )

    async def run() -> None:
        app = await build_app(settings)
        await app.start()
        try:
            scp = app.parts["scp"]
            r = await asyncio.to_thread(peers.storescu, series, scp.port)
            assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
            await asyncio.to_thread(peers.storescu, series[:1], scp.port, aet="NOBODY", timeout_s=60)
            await asyncio.sleep(1.0)
        finally:
            await app.stop()

    asyncio.run(run())
    log = AuditLog(audit_location(settings))
    try:
        mine = [r for r in log.scan(AuditQuery()) if r.method == METHOD]
        assert [(r.outcome, r.principal) for r in mine] == [("OK", "aet:STORESCU"), ("PERMISSION_DENIED", "")]
    finally:
        log.close()
