"""Limits of the ingest SCP (`atlasflow.ingest.scp`), in-process against dcmtk's storescu and
pynetdicom peers: idle TCP connections from one peer (the outside review's "16 idle TCP
connections block every new association") no longer lock anyone out, associations are
limited per source address and in all (A-ASSOCIATE-RJ transient "local limit exceeded",
counted), a P-DATA-TF over the announced maximum PDU length is aborted, and the idle, ACSE and
DIMSE timeouts end stalled peers."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.sop_class import CTImageStorage, Verification

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.metrics import Metrics
from atlasflow.ingest.reception import Reception
from atlasflow.ingest.scp import ScpConfig, StoreScp
from atlasflow.ingest.store import IngestStore
from atlasflow.testing import peers
from atlasflow.testing.data import TEST_DATA

CT_SLICE = TEST_DATA / "pydicom_ct_singles" / "pydicom" / "CT_small.dcm"  # ~39 KB
AET = "LIMITSCU"


def start_scp(root: Path, **config: Any) -> StoreScp:
    store = IngestStore(root / "data", LocalBlobStore(root / "blobs"), spool_segment_bytes=1 << 20, spool_spares=1)
    scp = StoreScp(
        ScpConfig(port=0, accepted_calling_aets=(AET, "STORESCU"), **config),
        Reception(store, Metrics("ingest")),
    )
    scp.start()
    return scp


def events(scp: StoreScp, name: str) -> float:
    return scp.metrics.registry.get_sample_value("atlasflow_events_total", {"service": "ingest", "event": name}) or 0.0


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreScp]:
    # a long ACSE timeout: what frees the idle connections below is the pending-connection
    # limit, not ARTIM
    server = start_scp(
        tmp_path_factory.mktemp("scp"),
        max_associations=4,
        max_associations_per_peer=2,
        max_pdu=16384,
        acse_timeout_s=60,
    )
    yield server
    server.stop()


def associate(port: int, source: str = "127.0.0.1", **kwargs: Any) -> Any:
    ae = AE(ae_title=AET)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, pydicom.dcmread(CT_SLICE).file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    received: list[Any] = []
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="ATLASFLOW",
        bind_address=(source, 0),
        evt_handlers=[(evt.EVT_ACSE_RECV, lambda e: received.append(e.primitive))],
        **kwargs,
    )
    assoc.answer = received[0] if received else None
    return assoc


def assert_local_limit(assoc: Any) -> None:
    assert assoc.is_rejected, "the association over the limit was not rejected"
    # PS3.8 9.3.4: result 2 rejected-transient, source 3 service-provider (presentation),
    # reason 2 local-limit-exceeded
    rj = assoc.answer
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)


def wait_until(check: Any, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_idle_tcp_connections_do_not_block_a_new_association(scp: StoreScp, tmp_path: Path) -> None:
    """40 TCP connections from one peer that never send an A-ASSOCIATE-RQ (ten times the
    association limit), then storescu from the same address: it associates and stores at
    once; the idle sockets beyond the peer's pending limit were closed by the SCP."""
    closed_before = events(scp, "dicom_pending_connections_closed")
    idle = [socket.create_connection(("127.0.0.1", scp.port), timeout=10) for _ in range(40)]
    try:
        files = peers.build_ct_series(tmp_path / "s", 2, seed="idle-conns")
        t0 = time.monotonic()
        r = peers.storescu(files, scp.port, aet="STORESCU")
        elapsed = time.monotonic() - t0
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-3000:]
        assert len(peers.acknowledged_files(out)) == 2, out[-3000:]
        assert elapsed < 30  # not waiting for the 60 s ACSE timeout
        assert events(scp, "dicom_pending_connections_closed") - closed_before >= 40 - 2
        # the oldest idle sockets were closed by the SCP (EOF), not left hanging
        assert idle[0].recv(1) == b""
    finally:
        for s in idle:
            s.close()


def test_a_peer_over_its_limit_is_rejected_while_another_peer_gets_through(scp: StoreScp) -> None:
    rejected_peer = events(scp, "dicom_associations_rejected_peer_limit")
    rejected_total = events(scp, "dicom_associations_rejected_total_limit")
    held = [associate(scp.port, "127.0.0.1") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        over = associate(scp.port, "127.0.0.1")
        assert_local_limit(over)
        assert events(scp, "dicom_associations_rejected_peer_limit") == rejected_peer + 1
        # another source address (the client socket bound to 127.0.0.2) still associates
        other = [associate(scp.port, "127.0.0.2") for _ in range(2)]
        held += other
        assert all(a.is_established for a in other)
        assert other[0].send_c_echo().Status == 0x0000
        # 4 associations = max_associations: a third address is over the total
        third = associate(scp.port, "127.0.0.3")
        assert_local_limit(third)
        assert events(scp, "dicom_associations_rejected_total_limit") == rejected_total + 1
    finally:
        for a in held:
            a.release()
    # released: the slots are free again
    wait_until(lambda: (a := associate(scp.port, "127.0.0.3")).is_established and a.release() is None)


class _BigPdus(DIMSEServiceProvider):
    """Ignores the SCP's announced maximum PDU length (sends up to 1 MiB per P-DATA-TF)."""

    @property
    def maximum_pdu_size(self) -> int:
        return 1 << 20


def test_p_data_over_the_maximum_pdu_length_is_aborted(scp: StoreScp) -> None:
    ds = pydicom.dcmread(CT_SLICE)
    ok = associate(scp.port)
    assert ok.is_established and ok.acceptor.maximum_length == 16384  # announced
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.543.900"
    assert ok.send_c_store(ds).Status == 0x0000  # fragments of <= 16 KiB are taken
    ok.release()

    before = events(scp, "dicom_pdu_too_long")
    bad = associate(scp.port)
    assert bad.is_established
    bad.dimse.__class__ = _BigPdus
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.543.901"
    status = bad.send_c_store(ds)
    assert not status  # no response: aborted
    wait_until(lambda: bad.is_aborted)
    assert events(scp, "dicom_pdu_too_long") == before + 1


def test_acse_idle_and_dimse_timeouts(tmp_path: Path) -> None:
    scp = start_scp(tmp_path, acse_timeout_s=1, idle_timeout_s=1.5, dimse_timeout_s=1.5, max_pdu=4096)
    try:
        # ACSE (ARTIM): a connection that sends no A-ASSOCIATE-RQ is closed
        raw = socket.create_connection(("127.0.0.1", scp.port), timeout=10)
        t0 = time.monotonic()
        assert raw.recv(1) == b""
        assert time.monotonic() - t0 < 8
        raw.close()

        # idle: an association with no traffic is aborted
        idle = associate(scp.port)
        assert idle.is_established
        wait_until(lambda: idle.is_aborted, timeout_s=10)

        # DIMSE: one C-STORE sent as 4 KiB PDUs, 0.2 s apart (never idle for 1.5 s), takes
        # ~2 s: aborted once its fragments have taken longer than 1.5 s
        before = events(scp, "dicom_dimse_timeouts")
        slow = associate(scp.port)
        assert slow.is_established

        def pause(event: Any) -> None:
            if event.pdu.pdu_type == 0x04:
                time.sleep(0.2)

        slow.bind(evt.EVT_PDU_SENT, pause)
        ds = pydicom.dcmread(CT_SLICE)
        assert not slow.send_c_store(ds)
        wait_until(lambda: slow.is_aborted, timeout_s=10)
        assert events(scp, "dicom_dimse_timeouts") == before + 1

        # a normal C-STORE under the same settings goes through
        fast = associate(scp.port)
        ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.543.902"
        assert fast.send_c_store(ds).Status == 0x0000
        fast.release()
    finally:
        scp.stop()
